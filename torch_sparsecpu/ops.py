"""Python wrappers of the ``sparsecpu`` custom ops, with their fake kernels side by side.
Schemas are defined once, in csrc/ops/library.cpp; autograd is registered in C++
(csrc/ops/autograd.cpp)."""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor

from . import _C  # registers the schemas before the fakes below

# The activations the ops fuse, as csrc/kernels/lists.h lists them.
ACTIVATIONS: tuple[str, ...] = tuple(_C.ACTIVATIONS)

# Word index of each field of a packed buffer's header, by name (HeaderField in spmm.h;
# layout in docs/packed_format.md).
HEADER_FIELDS: dict[str, int] = dict(_C.header_fields())

# What a packed buffer's values are, as csrc/kernels/lists.h lists them: "f32", and the
# datatypes pack_linear's ``quantize`` accepts ("int8"). Indexed by the header word.
DATATYPES: tuple[str, ...] = tuple(_C.DATATYPES)
# What ``quantize`` (pack_linear's argument, the backend's option) accepts: every datatype
# but "f32", which is quantize=None.
QUANTIZED_DATATYPES: tuple[str, ...] = DATATYPES[1:]

TALL_BLOCK_ROWS = _C.TALL_BLOCK_ROWS  # rows of a 4 x 1 block (kTallBlockRows in spmm.h)
# Tall blocks pay off when this fraction of their stored values is nonzero (see
# default_block_rows).
TALL_BLOCK_MIN_FILL = 0.8

WIDE_BLOCK_COLS = _C.WIDE_BLOCK_COLS  # features of an int8 1 x 4 block (kWideBlockCols in spmm.h)
# int8 1 x 4 blocks are chosen when this fraction of their stored values is nonzero (see
# default_block_cols).
WIDE_BLOCK_MIN_FILL = 0.5
# int8 K-blocks are this many times wider than fp32's, those of 1 x 1 blocks at most
# INT8_1X1_MAX_K_BLOCK features (see default_k_block).
INT8_K_BLOCK_FACTOR = 2
INT8_1X1_MAX_K_BLOCK = 256
# int8 buffers take at most this many input features (int32 sums; kMaxInt8InFeatures).
INT8_MAX_IN_FEATURES = 131072
# Calls of at most this many tokens run the GEMV kernels (kMaxGemvTokens in lists.h).
MAX_GEMV_TOKENS = _C.MAX_GEMV_TOKENS

# Output rows per row block (the op schema's default too). 128 rows x 64 tokens make a
# 32 KiB tile, and more rows share each K-block's activations while they are in L1 than
# with 32 (measurements: docs/packed_format.md#choosing-k_block-and-row_block).
DEFAULT_ROW_BLOCK = 128


def _tall_blocks(weight: Tensor) -> Tensor:
    """[out_features / 4, in_features] bool: which 4 x 1 blocks hold a nonzero."""
    return weight.reshape(-1, TALL_BLOCK_ROWS, weight.size(1)).ne(0).any(dim=1)


def nonzero_counts(weight: Tensor) -> tuple[int, int]:
    """(nonzeros, 4 x 1 blocks holding a nonzero) of a 2-D weight, in one pass of C++:
    ``torch.count_nonzero`` and the block reductions took 4 times as long as packing
    the weight, for every weight of every build."""
    return _C.nonzero_counts(weight.detach().to(device="cpu", dtype=torch.float32))


def default_block_rows(weight: Tensor) -> int:
    """4 when the weight's nonzeros come in 4 x 1 blocks (4 consecutive output rows
    sharing an input feature) filled at least 80%, else 1.

    A 4 x 1 block loads its activations once for 4 rows but stores (and multiplies) the
    zeros inside its blocks; the 1 x 1 kernel on the same weight also finds its
    activation rows in L1, as consecutive rows share features. Below about 80% fill the
    blocks run slower than 1 x 1 (measurements: docs/packed_format.md#nonzero-blocks-block_rows).
    Unstructured weights fill their 4 x 1 blocks far less (29% at 90% sparsity) and stay 1 x 1."""
    if weight.dim() != 2 or weight.size(0) % TALL_BLOCK_ROWS or weight.numel() == 0:
        return 1
    return _block_rows_for(*nonzero_counts(weight))


def _block_rows_for(nnz: int, blocks: int) -> int:
    return TALL_BLOCK_ROWS if blocks and nnz >= TALL_BLOCK_MIN_FILL * TALL_BLOCK_ROWS * blocks else 1


def _wide_blocks(weight: Tensor) -> Tensor:
    """[out_features, ceil(in_features / 4)] bool: which 1 x 4 blocks (features 4c .. 4c + 3
    of one row) hold a nonzero."""
    pad = -weight.size(1) % WIDE_BLOCK_COLS
    padded = torch.nn.functional.pad(weight, (0, pad)) if pad else weight
    return padded.reshape(weight.size(0), -1, WIDE_BLOCK_COLS).ne(0).any(dim=2)


def default_block_cols(weight: Tensor) -> int:
    """For ``quantize="int8"``: 4 when the weight's nonzeros come in 1 x 4 blocks (4
    consecutive input features of one row) filled at least 50%, else 1.

    An int8 kernel does one 4-way dot product per stored block whatever its shape, so
    1 x 4 blocks never cost more arithmetic than 1 x 1; but a 1 x 4 block stores 6 bytes
    (4 values, a 2-byte offset) against 3 per 1 x 1 nonzero, and GEMV (few tokens) is
    bound by those bytes: half-filled blocks are where the two break even
    (docs/packed_format.md#int8-buffers)."""
    if weight.dim() != 2 or weight.numel() == 0:
        return 1
    blocks = int(_wide_blocks(weight).sum())
    nnz = int(torch.count_nonzero(weight))
    return WIDE_BLOCK_COLS if blocks and nnz >= WIDE_BLOCK_MIN_FILL * WIDE_BLOCK_COLS * blocks else 1


def int8_pays(weight: Tensor, tokens: int | None = None) -> bool:
    """The per-layer rule of the backend's ``options={"quantize": "int8"}``: whether this
    2-D weight runs faster packed as int8 than as fp32, for calls of ``tokens`` tokens
    (None: unknown, any count). True when its nonzeros come in 1 x 4 blocks at least half
    filled (:func:`default_block_cols` is 4), where the int8 kernels ran 2.5-3.7x the fp32
    ones at every token count; or, for zeros anywhere, when every call has at most
    MAX_GEMV_TOKENS tokens (batch-1 decoding), where int8's 3 bytes per nonzero against 6
    decide. With zeros anywhere and more tokens the int8 kernels do one 4-way dot product
    per nonzero for one useful product and ran 0.6-1.4x the fp32 ones: such layers stay
    fp32 (docs/kernels.md#int8-kernels)."""
    if default_block_cols(weight) == WIDE_BLOCK_COLS:
        return True
    return tokens is not None and 0 < tokens <= MAX_GEMV_TOKENS


def default_k_block(weight: Tensor, block_rows: int = 1, *, quantize: str | None = None, block_cols: int = 1) -> int:
    """K-block size for a weight: the power of two nearest above 16 / density, at least
    128 and at most 65536 (one block for inputs narrower than that). With ``block_rows``
    4 (``block_cols`` 4) the density is that of the 4 x 1 (1 x 4) blocks. An int8 buffer
    (``quantize="int8"``) gets K-blocks ``INT8_K_BLOCK_FACTOR`` times wider: its panel is a
    quarter of fp32's bytes, so as many of them stay in L1; with 1 x 1 blocks at most 256,
    so that the 1-token kernel of AVX-512 VBMI CPUs holds a K-block in four registers
    (docs/kernels.md#int8-gemv).

    A K-block of 128 features is 32 KiB of a 64-token panel: it stays in L1. But each row
    pays a fixed cost per K-block (its partial sums go to and from the tile), so at high
    sparsity, where a 128-feature segment holds only a few nonzeros, longer segments
    win even though their activations then come from L2 (measurements:
    docs/packed_format.md#choosing-k_block-and-row_block)."""
    if block_rows == 1 and block_cols == 1:
        density = max(int(torch.count_nonzero(weight)), 1) / max(weight.numel(), 1)
    else:
        blocks = _tall_blocks(weight) if block_rows != 1 else _wide_blocks(weight)
        density = max(int(blocks.sum()), 1) / max(blocks.numel(), 1)
    k_block = 128
    while k_block < 16 / density and k_block < 65536:
        k_block *= 2
    if quantize is not None:
        k_block = min(k_block * INT8_K_BLOCK_FACTOR, 65536 if block_cols != 1 else INT8_1X1_MAX_K_BLOCK)
    return k_block


def pack_linear(
    weight: Tensor,
    *,
    k_block: int | None = None,
    row_block: int = DEFAULT_ROW_BLOCK,
    block_rows: int | None = None,
    quantize: str | None = None,
    block_cols: int | None = None,
) -> Tensor:
    """Packs a 2-D float32 weight ``[out_features, in_features]`` into the offset-CSR
    buffer that :func:`linear` reads (a 1-D int32 tensor; layout in docs/packed_format.md).

    ``k_block`` cuts the input dimension into blocks of that many features (0: one
    block; at most 65536, as offsets are 16-bit within their block; None:
    :func:`default_k_block`); ``row_block`` groups output rows into blocks scheduled as
    one unit. ``block_rows`` is 1 (each nonzero stored alone) or 4 (nonzeros stored in
    4 x 1 blocks of consecutive output rows, zeros inside a block included; it must
    divide ``out_features`` and ``row_block``); None: :func:`default_block_rows`.

    ``quantize="int8"`` stores the weight quantized to int8 per output row (symmetric,
    zeros stay zeros); the ops then quantize each token's activations on the fly and
    return float32 as before (numerics in docs/kernels.md#int8-kernels). Its blocks are
    1 x 1 or 1 x 4 (``block_cols``: 4 consecutive input features of one row; None:
    :func:`default_block_cols`), ``block_rows`` must be None or 1, ``k_block`` a multiple
    of 4, the weight finite and at most 131072 features wide.
    """
    if not isinstance(weight, Tensor):
        raise TypeError(f"weight must be a torch.Tensor, got {type(weight).__name__}")
    if weight.dim() != 2 or weight.dtype != torch.float32 or weight.device.type != "cpu":
        raise ValueError(
            f"weight must be a 2-D float32 CPU tensor, got {weight.dtype} of shape "
            f"{tuple(weight.shape)} on {weight.device}"
        )
    for name, value, lowest, highest in (
        ("k_block", k_block, 0, 65536),
        ("row_block", row_block, 1, 2**30),
        ("block_rows", block_rows, 1, TALL_BLOCK_ROWS),
        ("block_cols", block_cols, 1, WIDE_BLOCK_COLS),
    ):
        if value is None and name != "row_block":
            continue
        if not isinstance(value, int) or isinstance(value, bool):
            raise TypeError(f"{name} must be an int, got {type(value).__name__}")
        if not lowest <= value <= highest:
            raise ValueError(f"{name} must be in [{lowest}, {highest}], got {value}")
    if quantize is not None and not isinstance(quantize, str):
        raise TypeError(f"quantize must be None or a str, got {type(quantize).__name__}")
    if quantize is not None:
        return _pack_int8(weight, k_block, row_block, block_rows, quantize, block_cols)
    if block_cols not in (None, 1):
        raise ValueError(f"block_cols={block_cols} needs quantize='int8' (fp32 blocks are 1 feature wide)")
    if block_rows is None:
        block_rows = default_block_rows(weight) if row_block % TALL_BLOCK_ROWS == 0 else 1
    if block_rows not in (1, TALL_BLOCK_ROWS):
        raise ValueError(f"block_rows must be 1 or {TALL_BLOCK_ROWS}, got {block_rows}")
    if weight.size(0) % block_rows or row_block % block_rows:
        raise ValueError(
            f"block_rows={block_rows} must divide out_features ({weight.size(0)}) and row_block ({row_block})"
        )
    if k_block is None:
        k_block = default_k_block(weight, block_rows)
    return torch.ops.sparsecpu.pack_linear(weight.detach(), k_block, row_block, block_rows)


def _pack_int8(
    weight: Tensor, k_block: int | None, row_block: int, block_rows: int | None, quantize: str, block_cols: int | None
) -> Tensor:
    """pack_linear(quantize=...) once the common arguments are checked."""
    if quantize not in QUANTIZED_DATATYPES:
        raise ValueError(f"quantize must be None or one of {', '.join(QUANTIZED_DATATYPES)}, got {quantize!r}")
    if block_rows not in (None, 1):
        raise ValueError(f"block_rows must be None or 1 with quantize={quantize!r} (1 x 1 or 1 x 4 blocks)")
    if block_cols not in (None, 1, WIDE_BLOCK_COLS):
        raise ValueError(f"block_cols must be 1 or {WIDE_BLOCK_COLS}, got {block_cols}")
    if k_block is not None and k_block % WIDE_BLOCK_COLS:
        raise ValueError(f"k_block must be a multiple of {WIDE_BLOCK_COLS} with quantize={quantize!r}, got {k_block}")
    if weight.size(1) > INT8_MAX_IN_FEATURES:
        raise ValueError(
            f"weight has {weight.size(1)} input features; quantize={quantize!r} takes at most {INT8_MAX_IN_FEATURES}"
        )
    if not bool(torch.isfinite(weight).all()):
        raise ValueError(f"weight must be finite with quantize={quantize!r} (it has a NaN or an infinity)")
    if block_cols is None:
        block_cols = default_block_cols(weight)
    if k_block is None:
        k_block = default_k_block(weight, quantize=quantize, block_cols=block_cols)
    return torch.ops.sparsecpu.pack_linear(weight.detach(), k_block, row_block, 1, quantize, block_cols)


@dataclasses.dataclass(frozen=True)
class PackedInfo:
    """The header of a buffer made by :func:`pack_linear` (fields as in HEADER_FIELDS,
    less the magic number)."""

    version: int
    out_features: int
    in_features: int
    k_block: int
    num_k_blocks: int
    row_block: int
    num_row_blocks: int
    nnz: int  # stored values: nonzero blocks x block_rows x block_cols
    block_rows: int
    datatype: str  # a name of DATATYPES: "f32", or "int8" for quantize="int8"
    block_cols: int


def packed_info(packed: Tensor) -> PackedInfo:
    """The header of ``packed`` (a buffer made by :func:`pack_linear`), read by name.
    Checks only that it is a 1-D int32 tensor that starts with the packed magic number,
    not the rest of the buffer (the ops check that)."""
    if not isinstance(packed, Tensor):
        raise TypeError(f"packed must be a torch.Tensor, got {type(packed).__name__}")
    if packed.dtype != torch.int32 or packed.dim() != 1 or packed.numel() < _C.HEADER_WORDS:
        raise ValueError(
            f"packed must be a 1-D int32 tensor of at least {_C.HEADER_WORDS} words made by "
            f"pack_linear, got {packed.dtype} of shape {tuple(packed.shape)}"
        )
    header = packed[: _C.HEADER_WORDS].tolist()
    if header[HEADER_FIELDS["magic"]] != _C.PACKED_MAGIC:
        raise ValueError("packed is not a buffer made by pack_linear (bad magic number)")
    fields = {f.name: header[HEADER_FIELDS[f.name]] for f in dataclasses.fields(PackedInfo)}
    datatype = fields["datatype"]
    fields["datatype"] = DATATYPES[datatype] if 0 <= datatype < len(DATATYPES) else f"unknown ({datatype})"
    return PackedInfo(**fields)


def linear(
    input: Tensor,
    weight: Tensor,
    packed: Tensor,
    bias: Tensor | None = None,
    activation: str = "none",
    weight_transposed: bool = False,
) -> Tensor:
    """``activation(input @ weight.T + bias)`` computed from ``packed`` (made by
    :func:`pack_linear` from ``weight``). ``weight`` itself is only read for shapes and
    for gradients; ``input`` may have any rank ``[..., in_features]`` and any strides.
    An int8 ``packed`` (``pack_linear(quantize="int8")``) quantizes ``input`` per token
    and returns float32 all the same; its gradients are the fp32 layer's, through
    ``weight``.

    ``weight_transposed=True``: ``weight`` is ``[in_features, out_features]`` (GPT-2's
    ``Conv1D`` layout), the result ``activation(input @ weight + bias)`` and ``packed``
    made by ``pack_linear(weight.t())``."""
    for name, value in (("input", input), ("weight", weight), ("packed", packed)):
        if not isinstance(value, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if bias is not None and not isinstance(bias, Tensor):
        raise TypeError(f"bias must be a torch.Tensor or None, got {type(bias).__name__}")
    if not isinstance(activation, str):
        raise TypeError(f"activation must be a str, got {type(activation).__name__}")
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {', '.join(ACTIVATIONS)}, got {activation!r}")
    if not isinstance(weight_transposed, bool):
        raise TypeError(f"weight_transposed must be True or False, got {weight_transposed!r}")
    return torch.ops.sparsecpu.linear(input, weight, packed, bias, activation, weight_transposed)


def _check_chain_arguments(input, **lists) -> None:
    """The checks of a chain op's arguments: ``lists`` (weights, packed, biases,
    activations, ...) are lists of the same length >= 1 of the types the op takes."""
    for name, value in lists.items():
        if not isinstance(value, (list, tuple)):
            raise TypeError(f"{name} must be a list, got {type(value).__name__}")
    if len({len(v) for v in lists.values()}) != 1 or not lists["weights"]:
        raise ValueError(
            f"{', '.join(list(lists)[:-1])} and {list(lists)[-1]} must have the same length >= 1, got "
            + ", ".join(str(len(v)) for v in lists.values())
        )
    if not isinstance(input, Tensor):
        raise TypeError(f"input must be a torch.Tensor, got {type(input).__name__}")
    for name, accepted, what in (
        ("weights", Tensor, "torch.Tensor"),
        ("packed", Tensor, "torch.Tensor"),
        ("biases", (Tensor, type(None)), "torch.Tensor or None"),
        ("activations", str, "str"),
    ):
        for index, value in enumerate(lists[name]):
            if not isinstance(value, accepted):
                raise TypeError(f"{name}[{index}] must be a {what}, got {type(value).__name__}")
    for activation in lists["activations"]:
        if activation not in ACTIVATIONS:
            raise ValueError(f"activations must be in {', '.join(ACTIVATIONS)}, got {activation!r}")


def linear_chain(
    input: Tensor,
    weights: list[Tensor],
    packed: list[Tensor],
    biases: list[Tensor | None],
    activations: list[str],
) -> Tensor:
    """Several :func:`linear` layers in a row, each feeding the next, run as one op:
    every layer over one cache-sized panel of tokens before the next panel, so the
    intermediate activations stay in cache ("tensor columns"). Inference only: it has
    no autograd formula (the backend fuses chains only when grad mode is off)."""
    _check_chain_arguments(input, weights=weights, packed=packed, biases=biases, activations=activations)
    return torch.ops.sparsecpu.linear_chain(input, list(weights), list(packed), list(biases), list(activations))


def _pair(name: str, value, lowest: int) -> list[int]:
    pair = [value, value] if isinstance(value, int) and not isinstance(value, bool) else value
    if (
        not isinstance(pair, (list, tuple))
        or len(pair) != 2
        or not all(isinstance(v, int) and not isinstance(v, bool) for v in pair)
    ):
        raise TypeError(f"{name} must be an int or a pair of ints, got {value!r}")
    if min(pair) < lowest:
        raise ValueError(f"{name} must be >= {lowest}, got {value!r}")
    return list(pair)


def conv2d(
    input: Tensor,
    weight: Tensor,
    packed: Tensor,
    bias: Tensor | None = None,
    stride: int | tuple[int, int] = 1,
    padding: int | tuple[int, int] = 0,
    dilation: int | tuple[int, int] = 1,
    activation: str = "none",
) -> Tensor:
    """``activation(F.conv2d(input, weight, bias, stride, padding, dilation))`` (zero
    padding, no groups) computed from ``packed``, made by :func:`pack_linear` from
    ``weight.flatten(1)``. ``input`` is ``[batch, in_channels, height, width]`` with any
    strides; the output is channels-last when ``input``'s strides are channels-last-like
    (as ``F.conv2d`` decides), else contiguous NCHW."""
    for name, value in (("input", input), ("weight", weight), ("packed", packed)):
        if not isinstance(value, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if bias is not None and not isinstance(bias, Tensor):
        raise TypeError(f"bias must be a torch.Tensor or None, got {type(bias).__name__}")
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {', '.join(ACTIVATIONS)}, got {activation!r}")
    return torch.ops.sparsecpu.conv2d(
        input,
        weight,
        packed,
        bias,
        _pair("stride", stride, 1),
        _pair("padding", padding, 0),
        _pair("dilation", dilation, 1),
        activation,
    )


def conv_chain(
    input: Tensor,
    weights: list[Tensor],
    packed: list[Tensor],
    biases: list[Tensor | None],
    strides: list[int | tuple[int, int]],
    paddings: list[int | tuple[int, int] | tuple[int, int, int, int]],
    activations: list[str],
    *,
    shortcut: bool = False,
    band_rows: int = 0,
    split_channels: bool | None = None,
) -> Tensor:
    """Several :func:`conv2d` layers in a row, each feeding the next, run as one op: band
    of output rows by band, every layer computing the rows the next one needs, so the
    intermediate images stay in cache ("tensor columns"; docs/tile_planner.md). Zero
    padding, no dilation or groups; the first layer is a 1 x 1 convolution without padding.
    A padding is an int, (height, width), or (top, bottom, left, right) for one that
    differs per side (TensorFlow's "same" padding).

    A layer whose ``packed`` entry is empty (``torch.empty(0)``) runs dense as a
    depthwise convolution (``groups`` = channels): its weight is ``[C, 1, kh, kw]`` for
    the ``C`` output channels of the layer before (a MobileNet inverted residual: 1 x 1
    expand, depthwise, 1 x 1 project).

    With ``shortcut``, the last layer (1 x 1, stride 1, no padding) makes a residual block
    ``act(conv(h) + shortcut(x))`` of ``input`` sampled at the chain's stride (the product
    of the layers' strides): with a weight of only the previous layer's channels the
    shortcut is ``input`` itself (identity), added before the last activation; with a
    weight ``cat([W, W_shortcut], 1)`` and the sum of both biases, the last layer reads
    ``input`` as extra input channels after the previous layer's (a projection). ``band_rows`` (0: the tile
    planner's choice) sets the output rows per band. ``split_channels`` (None: the tile planner's choice)
    runs each image as one band that all threads take together, each layer's output channels split among
    them (True; small images, whose bands would be few rows), or only bands, one thread each (False).
    Inference only: no autograd formula."""
    layers = dict(weights=weights, packed=packed, biases=biases, activations=activations)
    _check_chain_arguments(input, **layers, strides=strides, paddings=paddings)
    if not isinstance(shortcut, bool):
        raise TypeError(f"shortcut must be True or False, got {shortcut!r}")
    if not isinstance(band_rows, int) or isinstance(band_rows, bool):
        raise TypeError(f"band_rows must be an int, got {type(band_rows).__name__}")
    if band_rows < 0:
        raise ValueError(f"band_rows must be >= 0 (0: the tile planner's choice), got {band_rows}")
    if split_channels is not None and not isinstance(split_channels, bool):
        raise TypeError(f"split_channels must be True, False or None, got {split_channels!r}")
    if split_channels and band_rows > 0:
        raise ValueError(
            f"split_channels=True runs each image as one band: it takes no band_rows, got band_rows={band_rows}"
        )
    flat_strides = [v for i, s in enumerate(strides) for v in _pair(f"strides[{i}]", s, 1)]
    flat_paddings = _chain_paddings(paddings)
    return torch.ops.sparsecpu.conv_chain(
        input,
        list(weights),
        list(packed),
        list(biases),
        flat_strides,
        flat_paddings,
        list(activations),
        shortcut,
        band_rows,
        split_channels,
    )


def _chain_paddings(paddings) -> list[int]:
    """conv_chain's paddings flattened: (height, width) per layer, or (top, bottom, left,
    right) per layer when any layer gives four."""
    if not isinstance(paddings, (list, tuple)):
        raise TypeError(f"paddings must be a list, got {type(paddings).__name__}")
    sides = [p if isinstance(p, (list, tuple)) and len(p) == 4 else None for p in paddings]
    if all(side is None for side in sides):
        return [v for i, p in enumerate(paddings) for v in _pair(f"paddings[{i}]", p, 0)]
    flat = []
    for i, (p, side) in enumerate(zip(paddings, sides, strict=True)):
        if side is None:
            height, width = _pair(f"paddings[{i}]", p, 0)
            side = (height, height, width, width)
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in side):
            raise TypeError(f"paddings[{i}] must be ints (top, bottom, left, right), got {p!r}")
        if min(side) < 0:
            raise ValueError(f"paddings[{i}] must be >= 0, got {p!r}")
        flat += list(side)
    return flat


def _conv_output_size(size: int, kernel: int, stride: int, padding: int, dilation: int = 1):
    return (size + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1


def _output_memory_format(input: Tensor) -> torch.memory_format:
    """Channels-last in, channels-last out (the rule of the C++ ops' is_channels_last)."""
    channels_last = torch._prims_common.suggest_memory_format(input) == torch.channels_last
    return torch.channels_last if channels_last else torch.contiguous_format


# The fake kernels let torch.compile / torch.export trace the ops without running them.
@torch.library.register_fake("sparsecpu::pack_linear")
def _pack_linear_fake(weight, k_block=128, row_block=DEFAULT_ROW_BLOCK, block_rows=1, quantize=None, block_cols=1):
    words = torch.library.get_ctx().new_dynamic_size()
    return weight.new_empty((words,), dtype=torch.int32)


@torch.library.register_fake("sparsecpu::linear")
def _linear_fake(input, weight, packed, bias=None, activation="none", weight_transposed=False):
    out_dim, in_dim = (1, 0) if weight_transposed else (0, 1)
    out_features, in_features = weight.size(out_dim), weight.size(in_dim)
    torch._check(input.dim() >= 1, lambda: "sparsecpu::linear: input must have at least 1 dim")
    torch._check(
        input.size(-1) == in_features,
        lambda: f"sparsecpu::linear: input ends in {input.size(-1)} features, weight expects {in_features}",
    )
    return input.new_empty((*input.shape[:-1], out_features))


@torch.library.register_fake("sparsecpu::linear_chain")
def _linear_chain_fake(input, weights, packed, biases, activations):
    torch._check(
        input.size(-1) == weights[0].size(1),
        lambda: (
            f"sparsecpu::linear_chain: input ends in {input.size(-1)} features, "
            f"the first weight expects {weights[0].size(1)}"
        ),
    )
    return input.new_empty((*input.shape[:-1], weights[-1].size(0)))


@torch.library.register_fake("sparsecpu::conv2d")
def _conv2d_fake(input, weight, packed, bias=None, stride=(1, 1), padding=(0, 0), dilation=(1, 1), activation="none"):
    torch._check(
        input.dim() == 4 and input.size(1) == weight.size(1),
        lambda: f"sparsecpu::conv2d: input must be [batch, {weight.size(1)}, height, width], got {tuple(input.shape)}",
    )
    height, width = (
        _conv_output_size(input.size(d), weight.size(d), stride[i], padding[i], dilation[i])
        for i, d in enumerate((2, 3))
    )
    return torch.empty(
        (input.size(0), weight.size(0), height, width),
        dtype=input.dtype,
        device=input.device,
        memory_format=_output_memory_format(input),
    )


@torch.library.register_fake("sparsecpu::conv_chain")
def _conv_chain_fake(
    input, weights, packed, biases, strides, paddings, activations, shortcut=False, band_rows=0, split_channels=None
):
    torch._check(input.dim() == 4, lambda: f"sparsecpu::conv_chain: input must be 4-D, got {tuple(input.shape)}")
    height, width = input.size(2), input.size(3)
    # (height, width) or (top, bottom, left, right) per layer: the sum per dimension.
    per_layer = len(paddings) // max(1, len(weights))
    for layer, weight in enumerate(weights):
        pads = paddings[per_layer * layer : per_layer * (layer + 1)]
        pad_h, pad_w = (2 * pads[0], 2 * pads[1]) if per_layer == 2 else (pads[0] + pads[1], pads[2] + pads[3])
        height = (height + pad_h - weight.size(2)) // strides[2 * layer] + 1
        width = (width + pad_w - weight.size(3)) // strides[2 * layer + 1] + 1
    return torch.empty(
        (input.size(0), weights[-1].size(0), height, width),
        dtype=input.dtype,
        device=input.device,
        memory_format=_output_memory_format(input),
    )


# Autograd for sparsecpu::linear and sparsecpu::conv2d is registered in C++ (csrc/ops/autograd.cpp): the
# gradients of the dense layer, without a Python call in grad mode. linear_chain and conv_chain have none:
# the backend fuses layers only in graphs compiled with grad mode off.
