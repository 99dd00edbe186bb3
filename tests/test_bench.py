"""The benchmark's two paths do the same work: same pairs and rewards on a tiny model (no timings)."""

import math

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from attnrl_core.naive import _naive_similarity, naive_rollout
from attnrl_core.embeddings import compute_similarity
from attnrl_core.model import (Float32Head, adapter_parameters, attach_adapter, float32_head, gqa_attention,
                               head_geometry)
from attnrl_core.rollout import rollout
from attnrl_core.training import make_optimizer, query_logits, update_policy

from .conftest import SEP, logits_tolerance, make_batch, randomize_adapter, tiny_config


def test_naive_and_cached_rollouts_agree(policy):
    cfg = tiny_config(num_kv_pairs=6, subset_fraction=0.5)
    batch = make_batch(policy, cfg)
    geo = head_geometry(policy)
    traj = rollout(policy, batch, SEP, geo, tokens_per_query=cfg.tokens_per_query, greedy=True)
    chosen, rewards = naive_rollout(policy, batch, SEP, geo, cfg.tokens_per_query)
    assert torch.equal(chosen, traj.choices)
    torch.testing.assert_close(rewards, traj.rewards, rtol=1e-4, atol=1e-4)


def test_naive_head_loop_equals_batched_similarity():
    torch.manual_seed(0)
    q, k = torch.randn(3, 6 * 16), torch.randn(3, 5, 2 * 16)
    available = torch.rand(3, 5) > 0.3
    available[:, 0] = True

    class Geo:
        num_query_heads, num_kv_heads, head_dim, group_size = 6, 2, 16, 3

    torch.testing.assert_close(_naive_similarity(q, k, Geo, 1.5, available),
                               compute_similarity(q, k, 6, 2, 1.5, available), rtol=1e-5, atol=1e-6)


def test_keep_freed_memory_applies_on_a_linux_cpu_only():
    import platform

    from attnrl_core.host import keep_freed_memory

    linux_glibc = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"
    assert keep_freed_memory(torch.device("cpu")) == linux_glibc
    assert not keep_freed_memory(torch.device("cuda"))  # GPU runs leave the host allocator alone


@pytest.mark.slow
def test_llama_3b_widths_in_bf16_roll_out_and_update_on_the_cpu():
    """The GPU preset's widths and dtype (hidden 3072, 24 query / 8 KV heads of 128, vocabulary 128,256, bf16,
    `Float32Head`, peft) with two layers, a rollout and an update of 2 trajectories: a shape or dtype error shows
    without a GPU, in seconds. The rollout's kept logits match a teacher-forced pass to bf16's precision, not the
    float32 tests' 1e-4: the cached and the whole-sequence passes round their bf16 activations differently."""
    config = LlamaConfig(vocab_size=128256, hidden_size=3072, intermediate_size=8192, num_hidden_layers=2,
                         num_attention_heads=24, num_key_value_heads=8, head_dim=128, tie_word_embeddings=True,
                         max_position_embeddings=1024)
    # Built on `meta` and filled in bf16 with uniform_ (transformers' float32 normal_ init of 600M weights takes
    # most of a minute on one CPU thread; a shape and dtype test needs finite, varied weights, not that init).
    with torch.device("meta"):
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.to_empty(device="cpu")
    model.model.rotary_emb.__init__(config)  # its inverse frequencies were on `meta` too
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(1.0) if p.dim() == 1 else p.uniform_(-0.035, 0.035, generator=g)  # SD 0.02, as Llama's init
    model.eval()
    model.set_attn_implementation(gqa_attention())
    cfg = tiny_config(generation_batch_size=2, training_batch_size=2)
    model = attach_adapter(float32_head(model), cfg)
    randomize_adapter(model, scale=0.02)
    assert isinstance(model.get_output_embeddings(), Float32Head)
    batch = make_batch(model, cfg)
    traj = rollout(model, batch, SEP, head_geometry(model), tokens_per_query=cfg.tokens_per_query)
    assert traj.query_logits.dtype == torch.float32 and torch.isfinite(traj.rewards).all()
    with torch.no_grad():
        forced = query_logits(model, traj.tokens, traj.query_positions)
    scale = forced.abs().max().item()
    torch.testing.assert_close(traj.query_logits, forced, **logits_tolerance(torch.bfloat16, scale))
    start = [p.detach().clone() for p in adapter_parameters(model)]
    upd = update_policy(model, make_optimizer(model, cfg), traj, torch.ones(2, dtype=torch.bool), training_batch_size=2)
    assert upd.optimizer_steps == 1 and math.isfinite(upd.loss)
    assert any(not torch.equal(a, b) for a, b in zip(start, adapter_parameters(model)))
