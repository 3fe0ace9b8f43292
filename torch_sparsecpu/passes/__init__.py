"""Graph passes of the sparsecpu backend: each a small function over a torch.fx graph.

static.py      which nodes are parameters, buffers or constants; layer names
match.py       which linear / conv2d calls qualify, why others stay dense, activations
batch_norm.py  eval-mode batch norms after a convolution, and folding them
computed.py    weights computed from parameters and buffers alone (pruning masks)
transformer.py nn.TransformerEncoderLayer's fused fast path, opened up into plain ops
rewrite.py     the rewrite into sparsecpu::linear / conv2d (RewriteResult, pack_weight)
chains.py      runs of sparse linears fused into sparsecpu::linear_chain
conv_chains.py runs of sparse convolutions (ResNet bottlenecks, residual included) fused
               into sparsecpu::conv_chain
"""

from .batch_norm import fold_batch_norm
from .chains import fuse_sparse_chains
from .conv_chains import fuse_conv_chains
from .match import LayerDecision
from .rewrite import RewriteResult, pack_weight, rewrite_sparse_layers
from .static import fetch_attr, find_static_tensors
from .transformer import decompose_encoder_layers

__all__ = [
    "LayerDecision",
    "RewriteResult",
    "decompose_encoder_layers",
    "fetch_attr",
    "find_static_tensors",
    "fuse_conv_chains",
    "fold_batch_norm",
    "fuse_sparse_chains",
    "pack_weight",
    "rewrite_sparse_layers",
]
