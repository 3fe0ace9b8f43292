"""nn.TransformerEncoderLayer's fused fast path (torch._transformer_encoder_layer_fwd,
taken in eval mode with batch_first=True and no gradients) under the backend: its four
linears go sparse once passes/transformer.py opens it up (issue #16, case 6), with or
without masks, and a call it leaves fused says why for each linear."""

from __future__ import annotations

from collections import Counter

import pytest
import torch
from test_passes import dynamo_graph, targets
from torch import nn

import torch_sparsecpu
from torch_sparsecpu.passes.static import source_name
from torch_sparsecpu.passes.transformer import FAST_PATH, decompose_encoder_layers

from conftest import assert_close_rel

LINEARS = ("self_attn.in_proj_weight", "self_attn.out_proj.weight", "linear1.weight", "linear2.weight")


def encoder(norm_first=False, activation="relu", num_layers=2, sparsity=0.9) -> nn.TransformerEncoder:
    """A 90%-pruned encoder, every linear pruned (magnitude_prune_ prunes nn.Linear
    modules; the attention's in_proj_weight is a parameter of nn.MultiheadAttention)."""
    layer = nn.TransformerEncoderLayer(
        d_model=64, nhead=4, dim_feedforward=256, batch_first=True, norm_first=norm_first, activation=activation
    )
    model = nn.TransformerEncoder(layer, num_layers=num_layers, enable_nested_tensor=False).eval()
    torch_sparsecpu.magnitude_prune_(model, sparsity)
    with torch.no_grad():
        for name, weight in model.named_parameters():
            if name.endswith("in_proj_weight"):
                weight.view(-1)[weight.abs().flatten().argsort()[: int(sparsity * weight.numel())]] = 0.0
    return model


def sparse_op_calls(compiled, *args, **kwargs) -> tuple[torch.Tensor, Counter]:
    """Runs ``compiled`` and counts the sparsecpu ops it ran (torch.profiler events)."""
    with torch.profiler.profile() as profile:
        output = compiled(*args, **kwargs)
    return output, Counter(e.name for e in profile.events() if e.name.startswith("sparsecpu::"))


def test_fast_path_hides_the_linears_from_the_matcher():
    """What the pass is for: Dynamo's graph holds one fused call per layer, no linear."""
    graph, _ = dynamo_graph(encoder(), torch.randn(2, 10, 64))
    assert targets(graph) == [torch._transformer_encoder_layer_fwd] * 2


def test_pass_replaces_the_fast_path_by_plain_ops():
    graph, static = dynamo_graph(encoder(norm_first=True, activation="gelu"), torch.randn(2, 10, 64))
    kept = decompose_encoder_layers(graph, static, min_sparsity=0.6, autocast=False)
    assert kept == {}
    assert torch._transformer_encoder_layer_fwd not in targets(graph)
    linears = [n for n in graph.nodes if n.op == "call_function" and n.target is torch._C._nn.linear]
    # Each layer's linears read the model's own parameters (Dynamo's sources kept: they name the layers).
    assert [source_name(n.args[1]) for n in linears] == [f"layers.{i}.{w}" for i in range(2) for w in LINEARS]
    ops = Counter(
        n.target if n.op == "call_method" else n.target.__name__
        for n in graph.nodes
        if n.op in ("call_function", "call_method")
    )
    assert ops == Counter(
        {
            "linear": 8,
            "layer_norm": 4,
            "scaled_dot_product_attention": 2,
            "gelu": 2,
            "add": 4,
            "chunk": 2,
            "getitem": 6,
            "unflatten": 6,
            "transpose": 8,
            "flatten": 2,
        }
    ), ops
    graph.lint()


@pytest.mark.parametrize("inner", ["eager", "inductor"])
@pytest.mark.parametrize("activation", ["relu", "gelu"])
@pytest.mark.parametrize("norm_first", [False, True])
def test_encoder_goes_sparse_and_matches_eager(norm_first, activation, inner):
    model = encoder(norm_first, activation)
    x = torch.randn(2, 10, 64)
    compiled = torch.compile(model, backend="sparsecpu", options={"inner": inner})
    with torch.no_grad():
        expected = model(x)
        compiled(x)
        actual, ops = sparse_op_calls(compiled, x)
    # The same products in another order: the sparse kernels' sums, and (inner eager)
    # the same attention kernel as the fast path's.
    assert_close_rel(actual, expected, what=f"norm_first={norm_first} {activation} {inner}")
    # Per layer: in_proj and out_proj, and linear1 -> activation -> linear2 as one chain.
    assert ops == Counter({"sparsecpu::linear": 4, "sparsecpu::linear_chain": 2}), ops

    decisions = torch_sparsecpu.explain(model, x)
    assert [d.name for d in decisions] == [f"layers.{i}.{w}" for i in range(2) for w in LINEARS]
    assert all(d.taken for d in decisions), [str(d) for d in decisions]
    assert [d.activation for d in decisions] == ["none", "none", activation, "none"] * 2


def padding(batch_tokens: list[int], tokens: int) -> torch.Tensor:
    """A key padding mask (True: padding) keeping the first n tokens of each sequence."""
    return torch.arange(tokens)[None, :] >= torch.tensor(batch_tokens)[:, None]


@pytest.mark.parametrize("inner", ["eager", "inductor"])
@pytest.mark.parametrize("masks", ["padding", "causal", "causal+padding", "float padding"])
def test_masked_encoder_goes_sparse_and_matches_eager(masks, inner):
    """The fast path with a mask (key padding: mask_type 1; an attention mask, which the
    layer expands to [batch, heads, T, T]: mask_type 2) decomposes to an explicit masked
    softmax, as the fast path computes it."""
    model = encoder()
    x = torch.randn(3, 7, 64)
    pad = padding([7, 4, 1], 7)
    kwargs = {
        "padding": {"src_key_padding_mask": pad},
        # is_causal=True: without it TransformerEncoder calls .item() on the mask (a graph break).
        "causal": {"mask": nn.Transformer.generate_square_subsequent_mask(7), "is_causal": True},
        "causal+padding": {
            "mask": nn.Transformer.generate_square_subsequent_mask(7),
            "is_causal": True,
            "src_key_padding_mask": torch.zeros(3, 7).masked_fill(pad, float("-inf")),
        },
        "float padding": {"src_key_padding_mask": torch.zeros(3, 7).masked_fill(pad, float("-inf"))},
    }[masks]
    compiled = torch.compile(model, backend="sparsecpu", options={"inner": inner})
    with torch.no_grad():
        expected = model(x, **kwargs)
        compiled(x, **kwargs)
        actual, ops = sparse_op_calls(compiled, x, **kwargs)
    assert_close_rel(actual, expected, what=masks)
    assert ops == Counter({"sparsecpu::linear": 4, "sparsecpu::linear_chain": 2}), ops
    decisions = torch_sparsecpu.explain(lambda x: model(x, **kwargs), x)
    assert len(decisions) == 8 and all(d.taken for d in decisions), [str(d) for d in decisions]


@pytest.mark.parametrize("inner", ["eager", "inductor"])
def test_sequence_masked_out_entirely_is_nan_as_in_eager(inner):
    """The fast path's masked softmax leaves NaN in a row masked out entirely (where
    scaled_dot_product_attention would give zeros); the decomposition does the same."""
    model = encoder(num_layers=1)
    x = torch.randn(2, 5, 64)
    mask = padding([5, 0], 5)
    compiled = torch.compile(model, backend="sparsecpu", options={"inner": inner})
    with torch.no_grad():
        expected = model(x, src_key_padding_mask=mask)
        compiled(x, src_key_padding_mask=mask)
        actual, ops = sparse_op_calls(compiled, x, src_key_padding_mask=mask)
    assert ops == Counter({"sparsecpu::linear": 2, "sparsecpu::linear_chain": 1}), ops
    assert expected[1].isnan().all() and not expected[0].isnan().any()
    assert actual[1].isnan().all()
    assert_close_rel(actual[0], expected[0])


class FusedCall(nn.Module):
    """Calls the fast-path op itself, with a mask of the given mask_type."""

    def __init__(self, layer: nn.TransformerEncoderLayer, mask_type: int | None):
        super().__init__()
        self.layer = layer
        self.mask_type = mask_type

    def forward(self, x, mask):
        layer, attention = self.layer, self.layer.self_attn
        return torch._transformer_encoder_layer_fwd(
            x,
            64,
            4,
            attention.in_proj_weight,
            attention.in_proj_bias,
            attention.out_proj.weight,
            attention.out_proj.bias,
            False,
            False,
            1e-5,
            layer.norm1.weight,
            layer.norm1.bias,
            layer.norm2.weight,
            layer.norm2.bias,
            layer.linear1.weight,
            layer.linear1.bias,
            layer.linear2.weight,
            layer.linear2.bias,
            mask,
            self.mask_type,
        )


@pytest.mark.parametrize("mask_type,shape", [(0, (6, 6)), (1, (2, 6)), (2, (2, 4, 6, 6))])
def test_mask_types_of_the_op(mask_type, shape):
    """The op's three mask types (0: [T, T], which nn.TransformerEncoderLayer never
    passes itself), a bool mask and a float one with finite values (the fast path
    masks every nonzero position out, not only -inf)."""
    model = FusedCall(encoder(num_layers=1).layers[0], mask_type)
    x = torch.randn(2, 6, 64)
    bool_mask = torch.rand(shape) < 0.3
    bool_mask.view(-1, 6)[:, 0] = False  # no row masked out entirely
    for mask in (bool_mask, bool_mask * -2.5):
        torch._dynamo.reset()
        with torch.no_grad():
            assert_close_rel(torch.compile(model, backend="sparsecpu")(x, mask), model(x, mask), what=str(mask.dtype))
        assert all(d.taken for d in torch_sparsecpu.explain(model, x, mask))


def test_fast_path_kept_says_why():
    """A fused call left as it is gets a decision per linear with its reason: never a
    silent []."""
    x = torch.randn(2, 6, 64)
    dense = encoder(sparsity=0.0)
    decisions = torch_sparsecpu.explain(dense, x)
    assert [d.name for d in decisions] == [f"layers.{i}.{w}" for i in range(2) for w in LINEARS]
    assert all(not d.taken and "below min_sparsity" in d.reason for d in decisions)

    # mask_type None (which the op reads as a mask of the scores' shape) is not taken.
    model = FusedCall(encoder(num_layers=1).layers[0], None)
    mask = torch.rand(2, 4, 6, 6) < 0.3
    decisions = torch_sparsecpu.explain(model, x, mask)
    assert [d.name for d in decisions] == [f"layer.{w}" for w in LINEARS]
    assert all(
        not d.taken and d.reason == f"{FAST_PATH} with a mask of type None and 4 dims stays dense" for d in decisions
    ), [str(d) for d in decisions]
    with torch.no_grad():
        assert_close_rel(torch.compile(model, backend="sparsecpu")(x, mask), model(x, mask))


def test_dynamic_shapes():
    """dynamic=True: eps reaches the graph as an input, shapes as symbols."""
    model = encoder(activation="gelu")
    compiled = torch.compile(model, backend="sparsecpu", dynamic=True)
    for batch, tokens in [(2, 7), (3, 11), (1, 5)]:
        x = torch.randn(batch, tokens, 64)
        mask = padding(torch.randint(1, tokens + 1, (batch,)).tolist(), tokens)
        with torch.no_grad():
            compiled(x)  # compiles, for the first shape
            actual, ops = sparse_op_calls(compiled, x)
            assert_close_rel(actual, model(x), what=f"{batch} x {tokens}")
            assert ops == Counter({"sparsecpu::linear": 4, "sparsecpu::linear_chain": 2}), ops
            assert_close_rel(
                compiled(x, src_key_padding_mask=mask),
                model(x, src_key_padding_mask=mask),
                what=f"{batch} x {tokens}, padded",
            )
