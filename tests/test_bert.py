"""A real model nobody here wrote: HF transformers BERT-base, random weights."""

from __future__ import annotations

import pytest
import torch

import torch_sparsecpu

from conftest import assert_close_rel
from test_backend import sparse_calls_in_inductor_code

transformers = pytest.importorskip("transformers")


def pruned_bert():
    config = transformers.BertConfig()  # BERT-base: 12 layers x 6 linears
    model = transformers.BertModel(config, add_pooling_layer=False).eval()
    torch_sparsecpu.magnitude_prune_(model, 0.9, name_filter=lambda name: name.startswith("encoder."))
    return model


@pytest.mark.slow
def test_bert_base_all_encoder_linears_sparse():
    model = pruned_bert()
    input_ids = torch.randint(0, model.config.vocab_size, (2, 16))
    compiled = torch.compile(model, backend="sparsecpu")
    with torch.inference_mode():
        expected = model(input_ids).last_hidden_state
        output, calls = sparse_calls_in_inductor_code(lambda ids: compiled(ids).last_hidden_state, input_ids)
    assert calls == 72
    assert_close_rel(output, expected, rel=1e-4)
