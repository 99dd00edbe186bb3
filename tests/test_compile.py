"""`--compile`: the rollout's single-token decode steps as one fixed-shape function of tensors
(`decoding.static_decode_step`, the cache's whole buffers and a position tensor), compiled once by
`torch.compile(fullgraph=True)` and reused by every rollout of the same length, with the plain forward passes'
tokens and rewards (greedy, float32)."""

from __future__ import annotations

import pytest
import torch
import torch._dynamo
from torch._dynamo.utils import counters

from attnrl_core.decoding import DecodeStep
from attnrl_core.model import head_geometry
from attnrl_core.resilience import FallbackState, rollout_resilient
from attnrl_core.rollout import rollout

from .conftest import SEP, make_batch, tiny_config


def _rollout(policy, cfg, decode_step=None, seed=0):
    return rollout(policy, make_batch(policy, cfg, seed=seed), SEP, head_geometry(policy),
                   tokens_per_query=cfg.tokens_per_query, greedy=True, decode_step=decode_step)


def _same(a, b):
    assert torch.equal(a.tokens, b.tokens) and torch.equal(a.choices, b.choices)
    torch.testing.assert_close(a.rewards, b.rewards, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(a.query_logits, b.query_logits, rtol=1e-4, atol=1e-4)


def test_fixed_shape_steps_give_the_plain_steps_numbers(policy, monkeypatch):
    import transformers.integrations.sdpa_attention as sdpa

    repeats = []
    repeat_kv = sdpa.repeat_kv
    monkeypatch.setattr(sdpa, "repeat_kv", lambda x, n: repeats.append(n) or repeat_kv(x, n))
    cfg = tiny_config()
    step = DecodeStep(compiled=False, device=torch.device("cpu"))
    _same(_rollout(policy, cfg, step), _rollout(policy, cfg))
    # the steps' mask covers the whole buffer; the grouped KV heads still reach the kernel unrepeated (a
    # repeated copy of the whole cache in every layer at every step made the compiled rollout 0.7x eager)
    assert repeats == []
    buffers = [b.data_ptr() for pair in step.pool.values() for b in pair]
    with torch.inference_mode():  # what an earlier rollout's overflow would leave at the masked positions
        for pair in step.pool.values():
            for b in pair:
                b.fill_(float("nan"))
    _same(_rollout(policy, cfg, step, seed=1), _rollout(policy, cfg, seed=1))
    # the second rollout wrote into the first one's buffers: one allocation per run and shape
    assert [b.data_ptr() for pair in step.pool.values() for b in pair] == buffers


def test_an_out_of_memory_rollout_releases_the_pooled_buffers(policy, monkeypatch):
    """The retry in smaller chunks does not find the full-size buffers still held: they are dropped on the
    out-of-memory, and the pool ends with the chunks' shape alone."""
    import attnrl_core.resilience as res

    real = res.rollout

    def rollout_oom(model, batch, *a, **k):
        out = real(model, batch, *a, **k)  # allocates the pool's buffers of this batch size first
        if batch.batch_size > 1:
            raise torch.OutOfMemoryError("CUDA out of memory (injected)")
        return out

    monkeypatch.setattr(res, "rollout", rollout_oom)
    cfg = tiny_config()
    step = DecodeStep(compiled=False, device=torch.device("cpu"))
    batch = make_batch(policy, cfg)
    rollout_resilient(policy, batch, SEP, head_geometry(policy), FallbackState(batch.batch_size, 1, 1), str,
                      tokens_per_query=cfg.tokens_per_query, decode_step=step)
    assert step.pool and {buffer.shape[0] for pair in step.pool.values() for buffer in pair} == {2}  # policy + base


@pytest.mark.slow
def test_compiled_decode_compiles_once_per_length_and_matches_eager(policy, monkeypatch):
    import transformers.integrations.sdpa_attention as sdpa

    repeats = []
    repeat_kv = sdpa.repeat_kv
    monkeypatch.setattr(sdpa, "repeat_kv", lambda x, n: repeats.append(n) or repeat_kv(x, n))
    torch._dynamo.reset()
    counters.clear()
    cfg = tiny_config()
    step = DecodeStep(compiled=True, device=torch.device("cpu"))  # fullgraph=True: a graph break raises
    for seed in (0, 1):
        _same(_rollout(policy, cfg, step, seed), _rollout(policy, cfg, seed=seed))
    assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])  # every step of both rollouts
    longer = tiny_config(num_kv_pairs=8)  # another rollout length: its cache is another shape
    _same(_rollout(policy, longer, step), _rollout(policy, longer))
    assert counters["stats"]["unique_graphs"] == 2, dict(counters["stats"])
    assert not counters["graph_break"], dict(counters["graph_break"])
    assert repeats == []  # traced too, the grouped KV heads are never repeated (transformers' traced path does)
