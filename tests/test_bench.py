"""The benchmark's two paths do the same work: same pairs and rewards on a tiny model (no timings)."""

import os

import pytest
import torch

from attnrl_core.naive import _naive_similarity, naive_rollout
from attnrl_core.embeddings import compute_similarity
from attnrl_core.model import head_geometry
from attnrl_core.rollout import rollout

from .conftest import SEP, make_batch, tiny_config


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


@pytest.mark.skipif(not os.environ.get("ATTNRL_SLOW_TESTS"),
                    reason="opt-in (ATTNRL_SLOW_TESTS=1): builds a 3B-parameter model, 6 GiB in bf16, on the CPU")
def test_llama_3b_shape_preset_runs_on_the_cpu_at_a_tiny_size():
    """The GPU preset's shapes and dtype, at batch 2 and one step: a shape or dtype error shows without a GPU."""
    from attnrl_core.naive import run_benchmark

    result = run_benchmark("llama-3.2-3b-shape", skip_naive=True, generation_batch_size=2, training_batch_size=2,
                           num_kv_pairs=4, device="cpu", dtype="bfloat16")
    assert result["batch_size"] == 2 and result["steps"] == 1
    assert 3.0e9 < result["params"] < 3.3e9
    assert result["rollout_seconds"] > 0 and result["update_seconds"] > 0
