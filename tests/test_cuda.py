"""What only a CUDA device can show of the GPU path (`pytest -m cuda`; skipped where there is none):
`benchmarks/gpu_proof.sh` runs these on a lent GPU. The compiled decode step replayed as a CUDA graph gives
the plain steps' tokens and rewards; the float32 head's bf16 GEMM with float32 output is a float32 head; the
token loop (sampling, the fixed-shape step, the position's increment) runs with no host synchronisation
under `torch.cuda.set_sync_debug_mode("error")`."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from attnrl_core.decoding import DecodeStep, forward_logits, sample_from_logits
from attnrl_core.model import Float32Head, head_geometry, policy_and_base
from attnrl_core.rollout import rollout

from .conftest import SEP, make_batch, tiny_config

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]
CUDA = torch.device("cuda")


def _to_cuda(batch):
    return dataclasses.replace(batch, **{f.name: getattr(batch, f.name).to(CUDA) for f in dataclasses.fields(batch)
                                         if isinstance(getattr(batch, f.name), torch.Tensor)})


def _rollout(model, cfg, decode_step=None, seed=0):
    return rollout(model, _to_cuda(make_batch(model, cfg, seed=seed)), SEP, head_geometry(model),
                   tokens_per_query=cfg.tokens_per_query, greedy=True, decode_step=decode_step)


def test_compiled_decode_replayed_as_a_cuda_graph_gives_the_plain_steps_numbers(policy):
    model, cfg = copy.deepcopy(policy).to(CUDA), tiny_config()
    step = DecodeStep(compiled=True, device=CUDA)  # reduce-overhead: captured once, replayed every step
    for seed in (0, 1):  # the second rollout replays the first one's graph over the same buffers
        a, b = _rollout(model, cfg, step, seed), _rollout(model, cfg, seed=seed)
        assert torch.equal(a.tokens, b.tokens) and torch.equal(a.choices, b.choices)
        torch.testing.assert_close(a.rewards, b.rewards, rtol=1e-4, atol=1e-4)


def test_the_float32_head_on_cuda_is_a_float32_head():
    torch.manual_seed(0)
    linear = nn.Linear(256, 1000, bias=False, device=CUDA, dtype=torch.bfloat16)
    head = Float32Head(linear)
    assert head.weight_fp32 is None  # no float32 copy of the weight on the GPU
    hidden = torch.randn(8, 5, 256, device=CUDA, dtype=torch.bfloat16, requires_grad=True)
    logits = head(hidden)
    assert logits.dtype == torch.float32
    exact = F.linear(hidden.detach().float(), linear.weight.float())  # bf16 products are exact in float32
    torch.testing.assert_close(logits, exact, rtol=1e-5, atol=1e-4)
    logits.square().mean().backward()
    assert hidden.grad.dtype == torch.bfloat16
    reference = hidden.detach().float().requires_grad_()
    F.linear(reference, linear.weight.float()).square().mean().backward()
    torch.testing.assert_close(hidden.grad.float(), reference.grad, rtol=2e-2, atol=1e-6)


@torch.inference_mode()
def test_the_token_loop_never_synchronises_with_the_host(policy):
    """`sample_tokens`' loop body with the fixed-shape step, run under the sync debug mode: a value read, a
    blocking copy or a data-dependent shape raises."""
    model, rows = copy.deepcopy(policy).to(CUDA), 4
    both = policy_and_base(model, rows, CUDA)
    for compiled in (False, True):
        decode = DecodeStep(compiled=compiled, device=CUDA)
        generator = torch.Generator(device=CUDA).manual_seed(0)
        for attempt in range(2):  # the first compiles and captures; the second is the steady state
            cache = decode.cache(model.config, 32)
            prompt = torch.randint(10, model.config.vocab_size, (2 * rows, 8), device=CUDA)
            logits = forward_logits(model, prompt, cache, 1, both)[:, -1]
            position = torch.full((1,), 8, dtype=torch.long, device=CUDA)
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode("error" if attempt else "default")
            try:
                for _ in range(6):
                    token = sample_from_logits(logits, 1.0, generator)
                    logits = decode(model, token, cache, position, both)
                    position = position + 1
            finally:
                torch.cuda.set_sync_debug_mode("default")
            assert torch.isfinite(logits).all()
