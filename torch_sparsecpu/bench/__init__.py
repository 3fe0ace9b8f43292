"""Benchmarking support, in the package so that the ``sparsecpu-bench`` command, the demo
(``benchmarks/demo.py``) and the scripts in ``benchmarks/`` share one definition of each
benchmark model and one way of timing:

- :mod:`.models`: the named models (mlp, bert-base, resnet50, mobilenet-v2, llama-tiny,
  any Hugging Face model type) built from their configs with seeded random weights, and
  which of their layers are pruned;
- :mod:`.measure`: interleaved timing rounds, percentiles, relative error, peak memory;
- :mod:`.cli`: the ``sparsecpu-bench`` command (``python -m torch_sparsecpu.bench``).

Nothing here is imported by ``import torch_sparsecpu``.
"""
