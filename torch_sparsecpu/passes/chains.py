"""Fuse runs of sparse linears that feed each other into one ``sparsecpu::linear_chain``
call (inference graphs only: the chain op has no autograd formula)."""

from __future__ import annotations

import logging

import torch
import torch.fx as fx

log = logging.getLogger(__name__)


def fuse_sparse_chains(graph: fx.Graph) -> list[int]:
    """Merges runs of ``sparsecpu::linear`` calls where each feeds only the next into one
    ``sparsecpu::linear_chain`` call (tensor columns). Returns the length of each chain.
    Only for inference graphs: the chain op has no autograd formula. Calls whose weight
    is transposed (GPT-2's Conv1D) stay single: the chain op takes [out, in] weights."""
    chains: list[list[fx.Node]] = []
    in_a_chain: set[fx.Node] = set()
    for node in list(graph.nodes):
        if not _chainable(node) or node in in_a_chain:
            continue
        chain = [node]
        while True:
            users = list(chain[-1].users)
            nxt = users[0] if len(users) == 1 else None
            if nxt is None or not _chainable(nxt) or nxt.args[0] is not chain[-1]:
                break
            chain.append(nxt)
        if len(chain) > 1:
            chains.append(chain)
            in_a_chain.update(chain)
    for chain in chains:
        args = [n.args + (None, "none")[len(n.args) - 3 :] for n in chain]
        with graph.inserting_before(chain[-1]):
            fused = graph.call_function(
                torch.ops.sparsecpu.linear_chain.default,
                (
                    chain[0].args[0],
                    [a[1] for a in args],
                    [a[2] for a in args],
                    [a[3] for a in args],
                    [a[4] for a in args],
                ),
            )
        fused.meta = dict(chain[-1].meta)
        chain[-1].replace_all_uses_with(fused)
        for n in reversed(chain):
            graph.erase_node(n)
        log.debug("sparsecpu: %d consecutive sparse linears fused into one chain", len(chain))
    graph.lint()
    return [len(chain) for chain in chains]


def _chainable(node: fx.Node) -> bool:
    """A ``sparsecpu::linear`` call whose weight is ``[out, in]``."""
    linear = torch.ops.sparsecpu.linear.default
    return node.op == "call_function" and node.target is linear and not node.kwargs.get("weight_transposed", False)
