"""Hugging Face drop-in on 2 gloo ranks: a tiny random Llama (from a config, no download) with FlashCP attention.

Reference: the same weights with transformers' own SDPA attention, run on every
piece of the packed micro-batch as its own sequence (at its document
positions). Loss and every gradient must agree after ``cp_loss`` +
``all_reduce_gradients``.
"""

from __future__ import annotations

import pytest
from dist_harness import assert_group_ok, run_group

pytest.importorskip("transformers")

N = 2
JOIN_TIMEOUT_S = 180


def _checks(rank, n, record):
    import copy
    import random

    import torch
    import torch.nn.functional as F
    from transformers import LlamaConfig, LlamaForCausalLM

    from flashcp_client import PackedCPDataset, all_reduce_gradients, cp_context, cp_loss, global_mean, packed_labels
    from flashcp_client.hf import register_hf_attention

    name = register_hf_attention()
    config = LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    reference = LlamaForCausalLM(copy.deepcopy(config))
    reference.load_state_dict(model.state_dict())
    model.set_attn_implementation(name)
    reference.set_attn_implementation("sdpa")

    rng = random.Random(0)
    docs = [[rng.randrange(128) for _ in range(rng.randint(1, 90))] for _ in range(20)]
    dataset = PackedCPDataset(docs, context_size=128, cp_size=n, rank=rank)
    for step, item in zip(range(2), dataset, strict=False):
        model.zero_grad(set_to_none=True)
        reference.zero_grad(set_to_none=True)
        with cp_context(item["plan"]):
            logits = model(input_ids=item["input_ids"][None], position_ids=item["position_ids"][None]).logits[0]
            loss = cp_loss(logits, item["labels"])
            loss.backward()
        all_reduce_gradients(model)

        packed = item["packed"]
        labels = packed_labels(packed["tokens"], packed["doc_lengths"], next_tokens=packed["next_tokens"])
        total, offset = 0.0, 0
        for length, start in zip(packed["doc_lengths"], packed["starts"], strict=True):
            ids = packed["tokens"][offset:offset + length]
            piece = reference(input_ids=ids[None], position_ids=torch.arange(start, start + length)[None]).logits[0]
            total = total + F.cross_entropy(piece.float(), labels[offset:offset + length], reduction="sum")
            offset += length
        ref_loss = total / (labels != -100).sum()
        ref_loss.backward()
        grad_diff = max((p.grad - r.grad).abs().max().item()
                        for p, r in zip(model.parameters(), reference.parameters(), strict=True))
        largest = max(r.grad.abs().max().item() for r in reference.parameters())
        record(f"step{step}", True, {"loss": global_mean(loss), "ref_loss": ref_loss.item(), "grad_diff": grad_diff,
                                     "largest": largest})


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    hung, res = run_group(_checks, N, tmp_path_factory.mktemp("hf"), join_timeout_s=JOIN_TIMEOUT_S)
    assert_group_ok(hung, res, JOIN_TIMEOUT_S)
    return res


def test_hf_llama_with_flashcp_attention_matches_its_sdpa_per_document(results):
    for r in range(N):
        for step in ("step0", "step1"):
            got = results[r][step]["detail"]
            assert got["loss"] == pytest.approx(got["ref_loss"], rel=1e-5), got
            assert got["grad_diff"] <= 1e-4 * got["largest"], got
