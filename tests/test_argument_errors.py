"""Bad arguments: every public function, op and backend option refuses them with a
TypeError (wrong type) or ValueError (wrong value) whose message names the argument;
a compiled model given the wrong feature count raises and stays usable. Corrupted packed
buffers are in test_packed_validation.py, convolution arguments in test_conv.py."""

from __future__ import annotations

import re

import pytest
import torch
from torch import nn

import torch_sparsecpu
from torch_sparsecpu import ops
from torch_sparsecpu.backend import SparseCPUOptions, sparsecpu_backend

from conftest import EAGER, assert_close_rel, compile_sparse, make_model, sparse_weight


def check_cases(cases):
    """``cases``: (exception type, regex its message must match, callable)."""
    for error, match, fn in cases:
        with pytest.raises(error, match=match):
            fn()


@pytest.mark.parametrize("dynamic", [None, True], ids=["static", "dynamic"])
def test_wrong_feature_count_to_compiled_model(dynamic):
    model = make_model()
    fast = compile_sparse(model, dynamic=dynamic, options=EAGER)
    with torch.no_grad():
        fast(torch.randn(4, 64))
        for bad in (torch.randn(4, 65), torch.randn(2, 3, 63)):
            # Dynamo traces the dense graph before the backend sees it, so this is
            # Dynamo's error; it must be an exception (not a crash) naming the 64 features.
            with pytest.raises((RuntimeError, ValueError)) as excinfo:
                fast(bad)
            message = str(excinfo.value)
            assert "64" in message and ("shape" in message or "dim" in message), message
        x = torch.randn(4, 64)  # still usable afterwards
        assert_close_rel(fast(x), model(x))


def test_pack_linear_bad_arguments():
    weight = sparse_weight(8, 16, 0.5)
    check_cases(
        [
            (TypeError, "weight", lambda: ops.pack_linear(weight.numpy())),
            (TypeError, "weight", lambda: ops.pack_linear([[1.0]])),
            (ValueError, "weight", lambda: ops.pack_linear(weight[0])),
            (ValueError, "weight", lambda: ops.pack_linear(weight.unsqueeze(0))),
            (ValueError, "weight", lambda: ops.pack_linear(weight.double())),
            (ValueError, "weight", lambda: ops.pack_linear(weight.half())),
            (ValueError, "k_block", lambda: ops.pack_linear(weight, k_block=-1)),
            (TypeError, "k_block", lambda: ops.pack_linear(weight, k_block=8.0)),
            (TypeError, "k_block", lambda: ops.pack_linear(weight, k_block=True)),
            (ValueError, "row_block", lambda: ops.pack_linear(weight, row_block=0)),
            (TypeError, "row_block", lambda: ops.pack_linear(weight, row_block="4")),
            (ValueError, "block_rows", lambda: ops.pack_linear(weight, block_rows=2)),
            (ValueError, "block_rows", lambda: ops.pack_linear(weight, block_rows=0)),
            (TypeError, "block_rows", lambda: ops.pack_linear(weight, block_rows="4")),
            (ValueError, "block_rows", lambda: ops.pack_linear(weight, row_block=6, block_rows=4)),
            (ValueError, "block_rows", lambda: ops.pack_linear(sparse_weight(6, 16, 0.5), block_rows=4)),
            (ValueError, "block_rows", lambda: torch.ops.sparsecpu.pack_linear(weight, 0, 32, 3)),
            (ValueError, "block_rows", lambda: torch.ops.sparsecpu.pack_linear(weight, 0, 6, 4)),
        ]
    )


def test_linear_bad_arguments():
    weight = sparse_weight(8, 16, 0.5)
    packed = ops.pack_linear(weight)
    bias = torch.randn(8)
    x = torch.randn(3, 16)
    check_cases(
        [
            (ValueError, "input must be a float32", lambda: ops.linear(x.double(), weight, packed, bias)),
            (ValueError, "input must be a float32", lambda: ops.linear(x.half(), weight, packed, bias)),
            (ValueError, "input .* in_features=16", lambda: ops.linear(torch.randn(3, 15), weight, packed, bias)),
            (ValueError, "input .* in_features=16", lambda: ops.linear(torch.tensor(1.0), weight, packed, bias)),
            (
                ValueError,
                "weight .* does not match the packed weight",
                lambda: ops.linear(x, weight[:, :8], packed, bias),
            ),
            (ValueError, "weight .* does not match the packed weight", lambda: ops.linear(x, weight.t(), packed, bias)),
            (
                ValueError,
                "weight .* does not match the packed weight",
                lambda: ops.linear(x, weight, packed, bias, weight_transposed=True),
            ),
            (ValueError, "bias", lambda: ops.linear(x, weight, packed, torch.randn(7))),
            (ValueError, "bias", lambda: ops.linear(x, weight, packed, bias.double())),
            (ValueError, "bias", lambda: ops.linear(x, weight, packed, torch.randn(8, 1))),
            (ValueError, "activation must be one of none, relu", lambda: ops.linear(x, weight, packed, bias, "tanh")),
            # the op itself, without the Python wrapper's check
            (
                ValueError,
                "unknown activation 'tanh'",
                lambda: torch.ops.sparsecpu.linear(x, weight, packed, bias, "tanh"),
            ),
            (ValueError, "packed .*int32", lambda: ops.linear(x, weight, packed.float(), bias)),
            (ValueError, "packed must be a contiguous", lambda: ops.linear(x, weight, packed[::2], bias)),
            (ValueError, "packed .*1-D", lambda: ops.linear(x, weight, packed.view(1, -1), bias)),
        ]
    )


def test_linear_non_tensor_arguments_raise_type_error():
    weight = sparse_weight(8, 16, 0.5)
    packed = ops.pack_linear(weight)
    x = torch.randn(3, 16)
    check_cases(
        [
            (TypeError, "input", lambda: ops.linear(x.tolist(), weight, packed)),
            (TypeError, "weight", lambda: ops.linear(x, None, packed)),
            (TypeError, "packed", lambda: ops.linear(x, weight, packed.tolist())),
            (TypeError, "activation", lambda: ops.linear(x, weight, packed, None, 1)),
            (TypeError, "weight_transposed", lambda: ops.linear(x, weight, packed, None, "none", 1)),
        ]
    )


def test_linear_chain_bad_arguments():
    weights = [sparse_weight(24, 16, 0.8), sparse_weight(8, 24, 0.5)]
    packed = [ops.pack_linear(w) for w in weights]
    check_cases(
        [
            (
                ValueError,
                "same length",
                lambda: ops.linear_chain(torch.randn(2, 16), weights, packed[:1], [None, None], ["none", "none"]),
            ),
            (
                ValueError,
                "layer 1 takes 16 features but layer 0 gives 24",
                lambda: ops.linear_chain(
                    torch.randn(2, 16), [weights[0], weights[0]], [packed[0], packed[0]], [None, None], ["none", "none"]
                ),
            ),
            (
                TypeError,
                "weights must be a list",
                lambda: ops.linear_chain(torch.randn(2, 16), weights[0], packed, [None, None], ["none", "none"]),
            ),
            (
                TypeError,
                r"weights\[1\] must be a torch.Tensor",
                lambda: ops.linear_chain(torch.randn(2, 16), [weights[0], 1], packed, [None, None], ["none", "none"]),
            ),
            (
                TypeError,
                r"packed\[0\] must be a torch.Tensor",
                lambda: ops.linear_chain(torch.randn(2, 16), weights, [1, packed[1]], [None, None], ["none", "none"]),
            ),
            (
                TypeError,
                r"biases\[0\] must be a torch.Tensor or None",
                lambda: ops.linear_chain(torch.randn(2, 16), weights, packed, [0.0, None], ["none", "none"]),
            ),
            (
                TypeError,
                r"activations\[1\] must be a str",
                lambda: ops.linear_chain(torch.randn(2, 16), weights, packed, [None, None], ["none", 1]),
            ),
            (
                TypeError,
                "input",
                lambda: ops.linear_chain([[1.0] * 16], weights, packed, [None, None], ["none", "none"]),
            ),
        ]
    )


def test_prune_and_sparsify_bad_arguments():
    model = make_model()
    check_cases(
        [
            (TypeError, "module", lambda: torch_sparsecpu.magnitude_prune_(torch.randn(3), 0.5)),
            (ValueError, "sparsity", lambda: torch_sparsecpu.magnitude_prune_(model, 1.5)),
            (ValueError, "sparsity", lambda: torch_sparsecpu.magnitude_prune_(model, -0.1)),
            (TypeError, "sparsity", lambda: torch_sparsecpu.magnitude_prune_(model, "0.5")),
            (TypeError, "sparsity", lambda: torch_sparsecpu.magnitude_prune_(model, True)),
            (TypeError, "name_filter", lambda: torch_sparsecpu.magnitude_prune_(model, 0.5, name_filter="0")),
            (ValueError, "block_rows", lambda: torch_sparsecpu.magnitude_prune_(model, 0.5, block_rows=2)),
            (TypeError, "block_rows", lambda: torch_sparsecpu.magnitude_prune_(model, 0.5, block_rows=4.0)),
            (ValueError, "layer_types", lambda: torch_sparsecpu.magnitude_prune_(model, 0.5, layer_types=(nn.ReLU,))),
            (TypeError, "layer_types", lambda: torch_sparsecpu.magnitude_prune_(model, 0.5, layer_types=(3,))),
            (TypeError, "model", lambda: torch_sparsecpu.sparsify(lambda x: x)),
            (ValueError, "min_sparsity", lambda: torch_sparsecpu.sparsify(model, min_sparsity=2)),
            (ValueError, "min_sparsity", lambda: torch_sparsecpu.sparsify(model, min_sparsity=-1e-3)),
            (TypeError, "min_sparsity", lambda: torch_sparsecpu.sparsify(model, min_sparsity=None)),
            (TypeError, "linear", lambda: torch_sparsecpu.SparseLinear(nn.Conv2d(2, 2, 1))),
            (ValueError, "activation", lambda: torch_sparsecpu.SparseLinear(nn.Linear(4, 4), "tanh")),
            (ValueError, "isa_name", lambda: torch_sparsecpu.force_isa("sse2").__enter__()),
            (TypeError, "model", lambda: torch_sparsecpu.explain(3, torch.randn(2, 64))),
            (ValueError, "bogus", lambda: torch_sparsecpu.explain(model, torch.randn(2, 64), bogus=1)),
        ]
    )


COMPILE_OPTION_CASES = [
    ({"bogus": 1}, ValueError, "unknown option 'bogus'.*valid options: min_sparsity"),
    ({"min_sparsity_": 0.5}, ValueError, "unknown option 'min_sparsity_'"),
    ({"inner": "tvm"}, ValueError, "'inner' must be one of 'inductor', 'eager'"),
    ({"inner": None}, ValueError, "'inner'"),
    ({"min_sparsity": 1.5}, ValueError, "'min_sparsity' must be in"),
    ({"min_sparsity": -0.5}, ValueError, "'min_sparsity' must be in"),
    ({"min_sparsity": "0.5"}, TypeError, "'min_sparsity'"),
    ({"fuse_activations": 1}, TypeError, "'fuse_activations'"),
    ({"fuse_activations": "yes"}, TypeError, "'fuse_activations'"),
    ({"verbose": None}, TypeError, "'verbose'"),
    ({"fuse_layers": 0}, TypeError, "'fuse_layers'"),
    ({"fold_batch_norm": 1}, TypeError, "'fold_batch_norm'"),
]


def backend_error(excinfo) -> BaseException:
    """The package's own exception behind Dynamo's BackendCompilerFailed wrapper."""
    exc = excinfo.value
    return getattr(exc, "inner_exception", None) or exc.__cause__ or exc


@pytest.mark.parametrize("options,error,match", COMPILE_OPTION_CASES)
def test_compile_bad_options(options, error, match):
    # Directly through the backend's option parser ...
    with pytest.raises(error, match=match):
        SparseCPUOptions.from_mapping(options)
    # ... and through torch.compile, where Dynamo wraps it in BackendCompilerFailed.
    model = make_model()
    with pytest.raises(Exception, match=match) as excinfo:
        compile_sparse(model, options=options)(torch.randn(2, 64))
    inner = backend_error(excinfo)
    assert isinstance(inner, error), f"{type(inner).__name__}: {inner}"
    assert re.search(match, str(inner)), str(inner)


def test_backend_options_not_a_mapping():
    with pytest.raises(TypeError, match="options"):
        sparsecpu_backend(torch.fx.symbolic_trace(make_model()), [], options=["inner"])
