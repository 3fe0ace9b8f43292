"""Eval-mode batch norms after a sparse convolution: finding them, and folding one into
the convolution's weight and bias (for graphs that need no gradients)."""

from __future__ import annotations

import dataclasses

import torch
import torch.fx as fx
import torch.nn.functional as F


@dataclasses.dataclass
class BatchNormFold:
    """An eval-mode batch norm that reads only a convolution's output, and the static
    tensors it and the convolution's bias come from."""

    node: fx.Node
    running_stats: list[fx.Node]  # running mean and var
    parameters: list[fx.Node]  # the batch norm's weight and bias and the conv's bias, those given
    mean: torch.Tensor
    var: torch.Tensor
    gamma: torch.Tensor | None
    beta: torch.Tensor | None
    eps: float


def batch_norm_after(conv: fx.Node, bias, static: dict[fx.Node, torch.Tensor]) -> BatchNormFold | None:
    """The eval-mode ``F.batch_norm`` that is the only user of ``conv`` (whose bias is
    ``bias``), if it and its tensors can be folded: all static float32."""
    users = list(conv.users)
    bn = users[0] if len(users) == 1 else None
    if bn is None or bn.op != "call_function" or bn.target is not F.batch_norm or bn.args[:1] != (conv,):
        return None
    names = ("input", "running_mean", "running_var", "weight", "bias", "training", "momentum", "eps")
    defaults = (None, None, None, None, None, False, 0.1, 1e-5)
    args = list(bn.args) + list(defaults[len(bn.args) :])
    _, mean, var, gamma, beta, training, _, eps = [bn.kwargs.get(n, a) for n, a in zip(names, args, strict=False)]
    tensors = [t for t in (mean, var, gamma, beta, bias) if t is not None]
    if training is not False or mean is None or var is None or not isinstance(eps, float):
        return None
    if not all(isinstance(t, fx.Node) and t in static and static[t].dtype == torch.float32 for t in tensors):
        return None
    value = {t: static[t] for t in tensors}
    parameters = [t for t in (gamma, beta, bias) if t is not None]
    return BatchNormFold(bn, [mean, var], parameters, value[mean], value[var], value.get(gamma), value.get(beta), eps)


def fold_batch_norm(weight: torch.Tensor, bias: torch.Tensor | None, fold: BatchNormFold):
    """The weight and bias of conv -> batch norm as one convolution (same zeros)."""
    with torch.no_grad():
        scale = torch.rsqrt(fold.var + fold.eps)
        if fold.gamma is not None:
            scale = scale * fold.gamma
        folded_bias = -fold.mean * scale if bias is None else (bias - fold.mean) * scale
        if fold.beta is not None:
            folded_bias = folded_bias + fold.beta
        return weight * scale.view(-1, 1, 1, 1), folded_bias
