"""Graph passes of the sparsecpu backend: each a small function over a torch.fx graph."""

from .rewrite import LayerDecision, find_static_tensors, fuse_sparse_chains, pack_weight, rewrite_sparse_layers

__all__ = ["LayerDecision", "find_static_tensors", "fuse_sparse_chains", "pack_weight", "rewrite_sparse_layers"]
