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
    """Word index of each section of a packed buffer, and its segment and value counts."""
    info = ops.packed_info(packed)
    segments = info.out_features // info.block_rows * info.num_k_blocks
    seg_ptr = HEADER_WORDS
    seg_rows = seg_ptr + segments + 1
    values = seg_rows + segments
    return {"seg_ptr": seg_ptr, "seg_rows": seg_rows, "values": values, "offsets": values + info.nnz,
            "segments": segments, "nnz": info.nnz}


# What a child process runs first: the ops, HEADER_WORDS and packed_layout.
_CHILD_PRELUDE = "import sys, torch\nfrom torch_sparsecpu import ops\n" \
    f"HEADER_WORDS = {HEADER_WORDS}\n" + inspect.getsource(packed_layout)


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
        try:
            ops.linear(x, weight, packed)
        except ValueError as exc:
            print(corruption, "REFUSED:", exc, flush=True)
        else:
            print(corruption, "ACCEPTED", flush=True)
""")

CONTENT_CORRUPTIONS = ["offset_huge", "offset_negative", "seg_ptr_huge", "seg_ptr_decreasing",
                       "seg_rows_huge"]


def test_corrupted_packed_contents_never_crash():
    out = run_child(_CORRUPT_CHILD, *CONTENT_CORRUPTIONS)
    for corruption in CONTENT_CORRUPTIONS:
        assert f"{corruption} REFUSED" in out, out


_EDIT_AFTER_CHECK_CHILD = _CHILD_PRELUDE + textwrap.dedent("""
    torch.manual_seed(0)
    weight = torch.randn(32, 64) * (torch.rand(32, 64) > 0.9)
    x = torch.randn(4, 64)
    for mode in sys.argv[1:]:
        with (torch.inference_mode() if mode == "inference_mode" else torch.no_grad()):
            packed = ops.pack_linear(weight, k_block=16, row_block=8)
            where = packed_layout(packed)["offsets"] + 3  # an offset mid-buffer
            assert 64 <= where < packed.numel() - 64
            ops.linear(x, weight, packed)  # a good buffer, accepted
            if mode == "numpy":
                packed.numpy()[where] = 1 << 28
            elif mode == "data":
                packed.data[where] = 1 << 28
            else:
                packed[where] = 1 << 28
            try:
                ops.linear(x, weight, packed)
            except ValueError as exc:
                print(mode, "REFUSED:", exc, flush=True)
            else:
                print(mode, "ACCEPTED", flush=True)
""")


@pytest.mark.parametrize("modes", [
    ["setitem"],
    pytest.param(["numpy", "data", "inference_mode"], marks=pytest.mark.xfail(strict=True, reason=(
        "BUG: checked_view validates a buffer's contents once and then trusts its "
        "(data_ptr, numel, _version, hash of the first/last 64 words); an edit that bumps no "
        "version (numpy view, .data, in inference mode) in the middle of the buffer skips the "
        "check and the kernel reads out of bounds (SIGSEGV)"))),
], ids=["version_bumped", "no_version_bump"])
def test_packed_edited_after_first_use_never_crashes(modes):
    out = run_child(_EDIT_AFTER_CHECK_CHILD, *modes)
    for mode in modes:
        assert f"{mode} REFUSED" in out, out
