import math

import pytest
import torch
import torch.nn.functional as F

from attnrl_core.embeddings import (capture_output, compute_similarity, extract_embeddings, head_probabilities,
                                    key_embeddings, query_embeddings)
from attnrl_core.model import base_model, head_geometry, last_attention

from .conftest import VOCAB, tiny_llama


def reference_similarity(q, k, Hq, Hkv, temperature=1.0, available=None):
    """Straightforward loops: per head, its KV group by h // (Hq / Hkv), softmax, then mean over heads."""
    B, K, _ = k.shape
    D = q.shape[1] // Hq
    out = torch.zeros(B, K)
    for b in range(B):
        for h in range(Hq):
            g = h // (Hq // Hkv)
            scores = torch.stack([q[b, h * D:(h + 1) * D] @ k[b, j, g * D:(g + 1) * D] for j in range(K)])
            scores = scores / math.sqrt(D) * temperature
            if available is not None:
                scores = scores.masked_fill(~available[b], float("-inf"))
            out[b] += F.softmax(scores, dim=0) / Hq
    return out


def test_head_geometry_from_projections(policy):
    geo = head_geometry(policy)
    assert (geo.num_query_heads, geo.num_kv_heads, geo.head_dim, geo.group_size) == (6, 2, 16, 3)


def test_extract_embeddings_is_mean_of_module_output():
    model = tiny_llama()
    ids = torch.randint(0, VOCAB, (3, 7))
    attn = last_attention(model)
    with torch.no_grad():
        hidden = model(ids, output_hidden_states=True).hidden_states[-2]  # input of the last layer
        expected_q = attn.q_proj(model.model.layers[-1].input_layernorm(hidden)).mean(dim=1)
        got_q = extract_embeddings(model, ids, attn.q_proj)
        got_k = extract_embeddings(model, ids, attn.k_proj)
    assert got_q.shape == (3, 96) and got_k.shape == (3, 32)
    torch.testing.assert_close(got_q, expected_q, rtol=1e-5, atol=1e-5)


def test_query_uses_adapter_and_key_does_not(policy):
    ids = torch.randint(0, VOCAB, (2, 5))
    attn = last_attention(policy)
    with torch.no_grad():
        q_on = query_embeddings(policy, ids)
        with base_model(policy):
            q_off = extract_embeddings(policy, ids, attn.q_proj)
            k_off = extract_embeddings(policy, ids, attn.k_proj)
    assert not torch.allclose(q_on, q_off)  # q_proj carries the (randomised) adapter
    torch.testing.assert_close(key_embeddings(policy, ids), k_off)


def test_hooks_are_removed_even_when_forward_raises():
    model = tiny_llama()
    module = last_attention(model).q_proj
    with pytest.raises(IndexError):
        extract_embeddings(model, torch.full((1, 3), VOCAB + 5), module)  # token id out of range
    assert not module._forward_hooks
    with pytest.raises(RuntimeError):
        with capture_output(module):
            raise RuntimeError("boom")
    assert not module._forward_hooks


def test_compute_similarity_matches_reference():
    torch.manual_seed(0)
    Hq, Hkv, D, B, K = 6, 2, 8, 3, 5
    q, k = torch.randn(B, Hq * D), torch.randn(B, K, Hkv * D)
    for temp in (1.0, 2.5):
        got = compute_similarity(q, k, Hq, Hkv, temperature=temp)
        torch.testing.assert_close(got, reference_similarity(q, k, Hq, Hkv, temp), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got.sum(dim=1), torch.ones(B))


def test_masked_keys_get_exactly_zero():
    torch.manual_seed(1)
    q, k = torch.randn(2, 6 * 4), torch.randn(2, 4, 2 * 4)
    available = torch.tensor([[True, False, True, False], [False, False, False, True]])
    got = compute_similarity(q, k, 6, 2, available=available)
    assert torch.all(got[~available] == 0)
    torch.testing.assert_close(got, reference_similarity(q, k, 6, 2, available=available), rtol=1e-5, atol=1e-6)
    assert got[1, 3] == 1.0
    with pytest.raises(AssertionError):
        compute_similarity(q, k, 6, 2, available=torch.zeros(2, 4, dtype=torch.bool))


def test_gqa_head_to_group_mapping():
    """Head h must read KV group h // 3: a query aligned with group 1's key through heads 3-5 only."""
    Hq, Hkv, D = 6, 2, 4
    q = torch.zeros(1, Hq * D)
    q[0, 3 * D:6 * D] = 10.0  # heads 3, 4, 5 -> group 1
    k = torch.zeros(1, 2, Hkv * D)
    k[0, 0, 1 * D:2 * D] = 1.0  # key 0 matches through group 1
    k[0, 1, 0 * D:1 * D] = 1.0  # key 1 matches through group 0 only
    per_head = head_probabilities(q, k, Hq, Hkv)[0]  # [Hq, K]
    assert torch.allclose(per_head[:3], torch.full((3, 2), 0.5))  # heads 0-2 see zeros: uniform
    assert torch.all(per_head[3:, 0] > 0.99)
    assert compute_similarity(q, k, Hq, Hkv)[0, 0] > 0.7


def test_softmax_per_head_then_mean_not_mean_then_softmax():
    torch.manual_seed(2)
    q, k = torch.randn(1, 6 * 4) * 3, torch.randn(1, 3, 2 * 4) * 3
    per_head_first = compute_similarity(q, k, 6, 2)
    scores = torch.einsum("bhgd,bkhd->bhgk", q.view(1, 2, 3, 4), k.view(1, 3, 2, 4)) / 2
    mean_first = F.softmax(scores.reshape(1, 6, 3).mean(1), dim=-1)
    assert not torch.allclose(per_head_first, mean_first, atol=1e-3)
