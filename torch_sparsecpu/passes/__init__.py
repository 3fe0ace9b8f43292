"""Graph passes of the sparsecpu backend: each a small function over a torch.fx graph."""

from .linear import LayerDecision, find_static_tensors, fuse_sparse_chains, rewrite_sparse_linears

__all__ = ["LayerDecision", "find_static_tensors", "fuse_sparse_chains", "rewrite_sparse_linears"]
