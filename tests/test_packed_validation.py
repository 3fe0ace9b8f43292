"""Packed buffers the ops must refuse: a corrupted header (ValueError naming the problem),
corrupted contents (refused, never a crash: those run in a child process), and buffers
edited after they were first checked. A packed argument of the wrong dtype or shape is
in test_argument_errors.py. Header words are addressed through
``ops.HEADER_FIELDS`` and read with ``ops.packed_info``; the layout is
docs/packed_format.md's."""

from __future__ import annotations

import inspect
import textwrap

import pytest
import torch

from torch_sparsecpu import ops

from conftest import run_child, sparse_weight

HEADER_WORDS = 16  # kHeaderWords in csrc/kernels/spmm.h


def packed_layout(packed):
    """Word index of each section of a packed buffer, and its segment and value counts.
    An int8 buffer's values section starts with its row scales and sums (out_features
    words each), then nnz int8 values four to a word."""
    info = ops.packed_info(packed)
    segments = info.out_features // info.block_rows * info.num_k_blocks
    seg_ptr = HEADER_WORDS
    seg_rows = seg_ptr + segments + 1
    values = seg_rows + segments
    value_words = 2 * info.out_features + (info.nnz + 3) // 4 if info.datatype == "int8" else info.nnz
    return {
        "seg_ptr": seg_ptr,
        "seg_rows": seg_rows,
        "values": values,
        "offsets": values + value_words,
        "segments": segments,
        "nnz": info.nnz,
    }


# What a child process runs first: the ops, HEADER_WORDS and packed_layout.
_CHILD_PRELUDE = (
    "import sys, torch\nfrom torch_sparsecpu import ops\n"
    f"HEADER_WORDS = {HEADER_WORDS}\n" + inspect.getsource(packed_layout)
) + textwrap.dedent("""
    def report(name, call):  # one line per case: refused with a ValueError, or accepted
        try:
            call()
        except ValueError as exc:
            print(name, "REFUSED:", exc, flush=True)
        else:
            print(name, "ACCEPTED", flush=True)
""")


def _set_field(name, value):
    def corrupt(bad):
        bad[ops.HEADER_FIELDS[name]] = value(int(bad[ops.HEADER_FIELDS[name]]))
        return bad

    return corrupt


# name -> (the corruption of a good buffer, what the error says)
HEADER_CORRUPTIONS = {
    "magic": (_set_field("magic", lambda v: v ^ 0x01000000), "bad magic"),
    "version": (_set_field("version", lambda v: v + 1), r"format version \d+, this build reads version"),
    "truncated": (lambda bad: bad[:-1].clone(), "inconsistent header"),
    "extended": (lambda bad: torch.cat([bad, torch.zeros(3, dtype=torch.int32)]), "inconsistent header"),
    "header_only": (lambda bad: bad[:HEADER_WORDS].clone(), "packed weight rejected"),
    "empty": (lambda bad: bad[:0].clone(), "packed weight rejected"),
    "out_features": (_set_field("out_features", lambda v: v + 1), "packed weight rejected"),
    "nnz": (_set_field("nnz", lambda v: v - 1), "packed weight rejected"),
    "k_block_zero": (_set_field("k_block", lambda v: 0), "packed weight rejected"),
    "row_block_zero": (_set_field("row_block", lambda v: 0), "packed weight rejected"),
    "block_rows_unknown": (_set_field("block_rows", lambda v: 3), "packed weight rejected"),
    # 4 divides every size, but the buffer's length is for 1
    "block_rows_size": (_set_field("block_rows", lambda v: 4), "packed weight rejected"),
}


# The same for int8 buffers, and what only they hold (their words after the header:
# seg_ptr, seg_rows, then row scales, row sums, values).
def _int8_word(section, index, value):
    def corrupt(bad):
        bad[packed_layout(bad)[section] + index] = value(int(bad[packed_layout(bad)[section] + index]))
        return bad

    return corrupt


INT8_CORRUPTIONS = {
    "datatype_unknown": (_set_field("datatype", lambda v: 7), "inconsistent header"),
    "datatype_f32": (_set_field("datatype", lambda v: 0), "inconsistent header"),
    "block_cols_unknown": (_set_field("block_cols", lambda v: 3), "inconsistent header"),
    "block_rows_tall": (_set_field("block_rows", lambda v: 4), "inconsistent header"),
    "k_block_not_quads": (_set_field("k_block", lambda v: v - 2), "inconsistent header"),
    "scale_negative": (_int8_word("values", 1, lambda v: int(torch.tensor(-1.0).view(torch.int32))), "scale"),
    "scale_nan": (_int8_word("values", 2, lambda v: 0x7FC00000), "scale"),
    "wsum": (_int8_word("values", 24 + 3, lambda v: v + 1), "sum of values"),
    "value_minus_128": (_int8_word("values", 48, lambda v: (v & ~0xFF) | 0x80), "-128"),
    "offset_off_its_block": (_int8_word("offsets", 0, lambda v: v | 1), "off its block"),
}


@pytest.mark.parametrize("corruption", list(INT8_CORRUPTIONS))
def test_corrupted_int8_buffer_is_refused(corruption):
    weight = (torch.randn(24, 16, 4) * (torch.rand(24, 16, 1) > 0.5)).reshape(24, 64)
    packed = ops.pack_linear(weight, quantize="int8", block_cols=4, k_block=16, row_block=8)
    assert ops.packed_info(packed).datatype == "int8"
    ops.linear(torch.randn(4, 64), weight, packed)  # the good buffer runs
    corrupt, message = INT8_CORRUPTIONS[corruption]
    bad = corrupt(packed.clone())
    with pytest.raises(ValueError, match="packed weight rejected") as excinfo:
        ops.linear(torch.randn(4, 64), weight, bad)
    assert excinfo.match(message)


@pytest.mark.parametrize("corruption", list(HEADER_CORRUPTIONS))
def test_corrupted_packed_header_is_refused(corruption):
    weight = sparse_weight(32, 64, 0.9)
    packed = ops.pack_linear(weight, k_block=16, row_block=8)
    assert ops.packed_info(packed).block_rows == 1
    corrupt, message = HEADER_CORRUPTIONS[corruption]
    bad = corrupt(packed.clone())
    with pytest.raises(ValueError, match="packed") as excinfo:
        ops.linear(torch.randn(4, 64), weight, bad)
    assert excinfo.match(message)


def test_tall_block_segment_off_its_row_group_is_refused():
    """A 4 x 1 block segment must start on a row group (a multiple of 4 in its block)."""
    weight = (torch.randn(8, 1, 64) * (torch.rand(8, 1, 64) > 0.8)).expand(8, 4, 64).reshape(32, 64).contiguous()
    packed = ops.pack_linear(weight, k_block=16, row_block=8, block_rows=4)
    packed[packed_layout(packed)["seg_rows"]] = 2  # the first segment's row
    with pytest.raises(ValueError, match="row group"):
        ops.linear(torch.randn(4, 64), weight, packed)


# Corrupted contents run in a child process: a regression would be a segfault.
_CORRUPT_CHILD = _CHILD_PRELUDE + textwrap.dedent("""
    torch.manual_seed(0)
    weight = torch.randn(32, 64) * (torch.rand(32, 64) > 0.9)
    good = ops.pack_linear(weight, k_block=16, row_block=8)
    layout = packed_layout(good)
    seg_ptr, seg_rows, offsets = layout["seg_ptr"], layout["seg_rows"], layout["offsets"]
    x = torch.randn(4, 64)
    for corruption in sys.argv[1:]:
        packed = good.clone()
        where = {"offset_huge": offsets + 3, "offset_negative": offsets + 3,
                 "seg_ptr_huge": seg_ptr + 5, "seg_ptr_decreasing": seg_ptr + 5,
                 "seg_rows_huge": seg_rows + 2}[corruption]
        packed[where] = {"offset_negative": -(1 << 28), "seg_ptr_decreasing": -1}.get(corruption, 1 << 28)
        report(corruption, lambda: ops.linear(x, weight, packed))
""")

CONTENT_CORRUPTIONS = ["offset_huge", "offset_negative", "seg_ptr_huge", "seg_ptr_decreasing", "seg_rows_huge"]


def test_corrupted_packed_contents_never_crash():
    out = run_child(_CORRUPT_CHILD, *CONTENT_CORRUPTIONS)
    for corruption in CONTENT_CORRUPTIONS:
        assert f"{corruption} REFUSED" in out, out


# One kind of corruption (argv[1]) written into the middle of a good buffer after its first
# use, by each edit mode (argv[2:]): a mode that bumps the version counter (setitem) or not.
_EDIT_AFTER_CHECK_CHILD = _CHILD_PRELUDE + textwrap.dedent("""
    torch.manual_seed(0)
    weight = torch.randn(32, 64) * (torch.rand(32, 64) > 0.9)
    x = torch.randn(4, 64)
    kind = sys.argv[1]
    for mode in sys.argv[2:]:
        with (torch.inference_mode() if mode == "inference_mode" else torch.no_grad()):
            packed = ops.pack_linear(weight, k_block=16, row_block=8)
            layout = packed_layout(packed)
            where = {"offset": layout["offsets"] + 3, "seg_ptr": layout["seg_ptr"] + 60,
                     "seg_rows": layout["seg_rows"] + 5}[kind]
            assert 64 <= where < packed.numel() - 64  # mid-buffer: outside the fingerprint
            ops.linear(x, weight, packed)  # a good buffer, accepted
            if mode == "numpy":
                packed.numpy()[where] = 1 << 28
            elif mode == "data":
                packed.data[where] = 1 << 28
            else:
                packed[where] = 1 << 28
            report(mode, lambda: ops.linear(x, weight, packed))
""")

NO_VERSION_BUMP = ["numpy", "data", "inference_mode"]


@pytest.mark.parametrize("kind", ["offset", "seg_ptr", "seg_rows"])
def test_packed_edited_after_first_use_never_crashes(kind):
    """A huge offset, segment pointer or segment row written mid-buffer after the buffer's
    first use. An edit that bumps the version counter (``packed[i] = ...``) is refused: the
    contents are checked again. An edit that bumps none (through NumPy, ``.data``, or in
    inference mode) is not seen, and the call is answered: the kernels clamp segment ranges
    and rows and keep offsets inside the (padded) panel, so the answer is wrong but nothing
    outside the buffers is read or written (docs/packed_format.md, Validation). A refusal
    would be acceptable too; a crash is not (the child would die)."""
    out = run_child(_EDIT_AFTER_CHECK_CHILD, kind, "setitem", *NO_VERSION_BUMP)
    assert "setitem REFUSED" in out, out
    for mode in NO_VERSION_BUMP:
        assert f"{mode} REFUSED" in out or f"{mode} ACCEPTED" in out, out


# Every section a kernel reads, filled mid-buffer with random words after the first use
# and without a version bump, for every ISA, GEMV and panel widths, fp32 1 x 1 and 4 x 1
# blocks and int8 1 x 1 and 1 x 4 blocks, and each op (linear, a chain of two layers, a 3 x 3 convolution). Under
# `make sanitize` (ASan) any access outside an allocation would abort the child.
_SCRAMBLE_CHILD = _CHILD_PRELUDE + textwrap.dedent("""
    import torch_sparsecpu
    torch.set_num_threads(1)
    gen = torch.Generator().manual_seed(0)

    def scramble(packed, section):
        layout = packed_layout(packed)
        # seg_ptr's first and last entries are checked on every call: leave them
        end = {"seg_ptr": layout["seg_rows"] - 1, "seg_rows": layout["values"], "offsets": packed.numel()}[section]
        begin, end = max(64, layout[section]), min(end, packed.numel() - 64)  # outside the fingerprint
        if begin >= end:
            return
        words = packed.numpy()  # shares memory, bumps no version
        words[begin:end] = torch.randint(-(1 << 31), 1 << 31, (end - begin,), generator=gen).numpy()
        words[begin:end:3] = torch.randint(-2, 3, ((end - begin + 2) // 3,), generator=gen).numpy()

    def weight_of(out_features, in_features, block_rows):
        w = torch.randn(out_features // block_rows, 1, in_features, generator=gen)
        w = w * (torch.rand(w.shape, generator=gen) > 0.7)
        return w.expand(-1, block_rows, -1).reshape(out_features, in_features).contiguous()

    def runs(tokens, blocks):  # blocks: (block_rows, None) for fp32, (1, block_cols) for int8
        block_rows, block_cols = blocks
        w1, w2 = weight_of(96, 72, block_rows), weight_of(48, 96, block_rows)
        quantize = None if block_cols is None else "int8"
        pack = lambda w, **sizes: ops.pack_linear(w, block_rows=block_rows, quantize=quantize, block_cols=block_cols,
                                                  **sizes)
        pack1 = lambda: pack(w1, k_block=24, row_block=16)  # K-blocks 24, 24, 24
        pack2 = lambda: pack(w2, k_block=40, row_block=8)   # 40, 40, 16
        x = torch.randn(tokens, 72, generator=gen)
        p1 = pack1()
        yield "linear", lambda p1=p1: ops.linear(x, w1, p1), [p1]
        p1, p2 = pack1(), pack2()
        chain = lambda p1=p1, p2=p2: ops.linear_chain(x, [w1, w2], [p1, p2], [None, None], ["relu", "none"])
        yield "chain", chain, [p1, p2]
        p1, conv = pack1(), w1.reshape(96, 8, 3, 3)
        image = torch.randn(1, 8, 1, tokens + 2, generator=gen)  # `tokens` output pixels
        yield "conv", lambda p1=p1: ops.conv2d(image, conv, p1, padding=(1, 0)), [p1]

    for isa in torch_sparsecpu.available_isas():
        with torch_sparsecpu.force_isa(isa):
            for section in ("seg_ptr", "seg_rows", "offsets"):
                for tokens in (1, 3, 7, 8, 33, 131):
                    for blocks in ((1, None), (4, None), (1, 1), (1, 4)):
                        for op, call, buffers in runs(tokens, blocks):
                            call()  # good buffers: checked and remembered
                            for packed in buffers:
                                scramble(packed, section)
                            try:
                                call()
                            except ValueError:
                                print(isa, section, tokens, blocks, op, "REFUSED", flush=True)
    print("DONE", flush=True)
""")


def test_scrambled_after_first_use_stays_in_bounds():
    """Random words in seg_ptr, seg_rows or the offsets of buffers already checked, with no
    version bump: every kernel must stay inside its buffers (a crash kills the child)."""
    out = run_child(_SCRAMBLE_CHILD)
    assert out.rstrip().endswith("DONE"), out
