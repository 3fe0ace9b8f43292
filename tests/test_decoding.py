"""Hugging Face causal LMs decoding with ``generate()`` while their forward is compiled
with the backend: Llama (nn.Linear) and GPT-2 (Conv1D: ``addmm(bias, x, weight)`` with
an ``[in, out]`` weight). Greedy tokens equal eager's, prefill and decode compile once
each whatever the prompt length, decode runs the sparse GEMV kernels, and a Conv1D
weight edited after compiling is seen. Small random-weight configs; never downloaded."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import torch_sparsecpu
from torch_sparsecpu.backend import sparsecpu_backend

from conftest import EAGER, assert_close_rel, sparse_op_calls

transformers = pytest.importorskip("transformers")
from transformers.pytorch_utils import Conv1D  # noqa: E402

SPARSITY = 0.7
NEW_TOKENS = 6


def with_static_cache(model: nn.Module) -> nn.Module:
    """The Hugging Face recipe for compiled decoding: a static KV cache, so that the
    decode graph's shapes do not grow with every token."""
    model.generation_config.cache_implementation = "static"
    return model


def small_llama() -> nn.Module:
    """2 decoder layers, hidden 128: their linears pruned, embeddings and LM head dense."""
    config = transformers.LlamaConfig(
        hidden_size=128, intermediate_size=352, num_hidden_layers=2, num_attention_heads=4, vocab_size=512
    )
    model = transformers.LlamaForCausalLM(config).eval()
    torch_sparsecpu.magnitude_prune_(model.model.layers, SPARSITY)
    return with_static_cache(model)


def small_gpt2() -> nn.Module:
    """2 blocks, hidden 128: their Conv1D layers pruned, embeddings (and the tied head) dense."""
    config = transformers.GPT2Config(
        n_layer=2, n_embd=128, n_head=4, vocab_size=512, n_positions=128, bos_token_id=0, eos_token_id=0
    )
    model = transformers.GPT2LMHeadModel(config).eval()
    torch_sparsecpu.magnitude_prune_(model.transformer.h, SPARSITY, layer_types=(Conv1D,))
    return with_static_cache(model)


def prompt(length: int) -> torch.Tensor:
    return torch.randint(1, 512, (1, length), generator=torch.Generator().manual_seed(length))


def greedy(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return model.generate(ids, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False)


class CountingBackend:
    """The sparsecpu backend, counting the graphs it compiles."""

    def __init__(self, options: dict):
        self.options, self.graphs = options, 0

    def __call__(self, gm, example_inputs):
        self.graphs += 1
        return sparsecpu_backend(gm, example_inputs, options=self.options)


def compile_forward(model: nn.Module, options: dict = EAGER) -> CountingBackend:
    """``model.forward = torch.compile(model.forward, backend=..., dynamic=True)``: one
    prefill graph for every prompt length."""
    backend = CountingBackend(options)
    model.forward = torch.compile(model.forward, backend=backend, dynamic=True)
    return backend


# Sparse layers per forward call: Llama's 7 linears per layer, GPT-2's 4 Conv1D per block.
@pytest.mark.parametrize(
    "make_model, sparse_per_call", [(small_llama, 2 * 7), (small_gpt2, 2 * 4)], ids=["llama", "gpt2"]
)
def test_generate_matches_eager_token_for_token(make_model, sparse_per_call):
    model = make_model()
    ids = prompt(13)
    expected = greedy(model, ids)
    compile_forward(model)
    assert torch.equal(greedy(model, ids), expected)  # compiles prefill and decode
    tokens, sparse_layers = sparse_op_calls(greedy, model, prompt(13))
    assert torch.equal(tokens, expected), f"compiled {tokens.tolist()} != eager {expected.tolist()}"
    assert sparse_layers == sparse_per_call * NEW_TOKENS, "a layer of some forward call did not run sparse"


def test_three_prompt_lengths_compile_prefill_and_decode_once():
    """Prefill (any prompt length) and decode (one token, any position) are one graph
    each: three prompt lengths in a row compile two graphs, one recompile, and decoding
    never recompiles per token."""
    model = small_llama()
    backend = compile_forward(model)
    for length in (13, 21, 27):
        greedy(model, prompt(length))
        assert backend.graphs == 2, f"{backend.graphs} graphs after a prompt of {length} tokens"


def test_decode_runs_the_gemv_kernels():
    """Every sparse call of a decode step has one token, which the ops run on the GEMV
    kernels (inputs of 1..MAX_GEMV_TOKENS tokens, sparse_layer.h's is_gemv)."""
    model = small_llama()
    compile_forward(model)
    greedy(model, prompt(13))  # compiles prefill and decode
    with torch.inference_mode(), torch.profiler.profile(record_shapes=True) as profile:
        model.generate(prompt(17), max_new_tokens=2, min_new_tokens=2, do_sample=False)
    tokens_per_call = [
        torch.Size(event.input_shapes[0][:-1]).numel()
        for event in profile.events()
        if event.name == "sparsecpu::linear" and event.input_shapes and event.input_shapes[0]
    ]
    assert set(tokens_per_call) == {17, 1}, tokens_per_call  # the prefill's 17 tokens, then decode's 1
    assert 1 <= torch_sparsecpu._C.MAX_GEMV_TOKENS < 17  # decode on the GEMV kernels, prefill on the panels


def test_every_gpt2_conv1d_takes_the_sparse_path():
    model = small_gpt2()
    ids = prompt(9)
    decisions = torch_sparsecpu.explain(model, ids)
    conv1d = [d for d in decisions if ".h." in d.name]
    assert len(conv1d) == 4 * 2 and all(d.taken for d in conv1d), "\n".join(map(str, decisions))
    assert {d.name.split(".h.")[1].split(".", 1)[1] for d in conv1d} == {
        "attn.c_attn.weight",
        "attn.c_proj.weight",
        "mlp.c_fc.weight",
        "mlp.c_proj.weight",
    }
    c_attn = next(d for d in conv1d if d.name.endswith("c_attn.weight"))
    assert (c_attn.out_features, c_attn.in_features) == (3 * 128, 128)  # [out x in], as a linear's
    compiled = torch.compile(model, backend="sparsecpu", options=EAGER)
    with torch.inference_mode():
        compiled(ids)
        logits, sparse_layers = sparse_op_calls(lambda: compiled(ids).logits)
        assert_close_rel(logits, model(ids).logits, what="logits")
    assert sparse_layers == 4 * 2


class Conv1DBlock(nn.Module):
    """GPT-2's MLP in miniature: Conv1D -> GELU -> Conv1D."""

    def __init__(self):
        super().__init__()
        self.c_fc, self.c_proj = Conv1D(96, 48), Conv1D(48, 96)

    def forward(self, x):
        return self.c_proj(torch.nn.functional.gelu(self.c_fc(x)))


@pytest.mark.parametrize("inner", ["eager", "inductor"])
@pytest.mark.parametrize("edit", ["mul_", "data_assign"])
def test_conv1d_weight_edit_after_compiling_is_honoured(inner, edit):
    """The op receives the Conv1D weight itself, not a view: a view made in the graph
    reaches the op without the weight's version counter under Inductor, and an in-place
    edit would go unseen."""
    block = torch_sparsecpu.magnitude_prune_(Conv1DBlock().eval(), SPARSITY, layer_types=(Conv1D,))
    compiled = torch.compile(block, backend="sparsecpu", options={"inner": inner})
    x = torch.randn(2, 5, 48)
    with torch.no_grad():
        assert_close_rel(compiled(x), block(x), what="before the edit")
        if edit == "mul_":
            block.c_fc.weight.mul_(3)
        else:
            block.c_proj.weight.data = block.c_proj.weight.data * -2
        expected = block(x)
        actual, sparse_layers = sparse_op_calls(compiled, x)
    assert_close_rel(actual, expected, what=f"after {edit}")
    assert sparse_layers == 2


def test_conv1d_gradients_equal_eager():
    """With grad mode on, a compiled Conv1D's gradients (weight in its own [in, out]
    layout) are eager's."""
    block = torch_sparsecpu.magnitude_prune_(Conv1DBlock(), SPARSITY, layer_types=(Conv1D,))
    reference = Conv1DBlock()
    reference.load_state_dict(block.state_dict())
    compiled = torch.compile(block, backend="sparsecpu", options=EAGER)
    x = torch.randn(3, 48)
    grad = torch.randn(3, 48)
    output, sparse_layers = sparse_op_calls(compiled, x)
    output.backward(grad)
    reference(x).backward(grad)
    assert sparse_layers == 2
    for name, parameter in reference.named_parameters():
        actual = dict(block.named_parameters())[name].grad
        assert actual.shape == parameter.grad.shape, name
        assert_close_rel(actual, parameter.grad, rel=1e-4, what=f"grad of {name}")


def test_prefill_and_decode_graphs_share_packed_weights():
    """The decode graph reuses the prefill graph's packed buffers: one pack per weight."""
    model = small_llama()
    compile_forward(model)
    with torch.profiler.profile() as profile:
        greedy(model, prompt(13))
    packs = sum(event.count for event in profile.key_averages() if event.key == "sparsecpu::pack_linear")
    assert packs == 2 * 7, f"{packs} packs for 14 sparse weights"
