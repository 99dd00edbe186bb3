"""The memory plan against the code (`memtrace` on the `meta` device), its command, and the cuts it rests on: the
loss and the scoring computed in chunks of the vocabulary-sized tensors, gradient checkpointing, with the same
numbers as the whole tensors."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from attnrl_core.__main__ import main
from attnrl_core.config import TrainConfig
from attnrl_core.decoding import head_logprobs, token_logprobs
from attnrl_core.loss import chunked_reinforce_loss, reinforce_loss
from attnrl_core.memory import (PRESET_SHAPES, ModelShape, SequenceShape, attention_kernel, card_spend, choose_sizes,
                                parse_arch, plan, use_expandable_segments)
from attnrl_core.memtrace import Allocator, OutOfMemory, card_needed, trace, trace_episodes
from attnrl_core.model import (Float32Head, _Float32Logits, adapter_parameters, attach_adapter, head_geometry,
                               set_gradient_checkpointing)
from attnrl_core.rollout import rollout
from attnrl_core.run import _episode_peak, check_card, planned_sizes
from attnrl_core.training import make_optimizer, update_policy

from .conftest import SEP, make_batch, randomize_adapter, tiny_config, tiny_llama

SPEC_3B = PRESET_SHAPES["llama-3.2-3b"]


@pytest.mark.parametrize("overrides,rows,micro,oracle,keep", [
    ({}, 64, 16, False, True),                                     # SPEC's sizes, checkpointing (the preset's)
    ({"gradient_checkpointing": 0}, 32, 8, False, True),           # chunks of 32 of 64; every layer's activations
    ({"choice_target_weight": 1.0, "generation_batch_size": 16}, 16, 4, True, True),  # the oracle's cache copies
    ({"generation_batch_size": 32}, 32, 0, True, False),           # `evaluate`'s rollouts: the oracle, nothing kept
])
def test_plan_is_within_ten_percent_of_the_code_on_meta(overrides, rows, micro, oracle, keep):
    """At 1 and 2 layers each phase, and at 28 layers by the increase per layer, within 10%."""
    cfg = TrainConfig.from_preset("llama-3.2-3b", **overrides)
    seq = SequenceShape.of(cfg)
    planned, traced = {}, {}
    for layers in (1, 2):
        shape = dataclasses.replace(SPEC_3B, layers=layers)
        measured = trace(cfg, shape, seq, layers, rows, micro, oracle=oracle, keep_query_logits=keep)
        p = plan(cfg, shape, seq, rows, micro or 1, keep_query_logits=keep, oracle=oracle)
        # the optimizer is not on `meta`; the rotary embedding's small buffers are not in the plan
        assert p.static - p.terms["optimizer"] == pytest.approx(measured.static_bytes, abs=2**16)
        planned[layers] = {"rollout": p.rollout, "update": p.update if micro else 0}
        traced[layers] = {"rollout": measured.rollout_bytes, "update": measured.update_bytes}
    for phase in ("rollout", "update"):
        for layers in (1, 2):
            assert abs(planned[layers][phase] - traced[layers][phase]) <= 0.1 * traced[layers][phase], \
                (phase, layers, planned[layers][phase] / 1e9, traced[layers][phase] / 1e9)
        # Llama-3.2-3B's 28 layers, the per-layer increase extrapolated: the plan's and the trace's
        at_28 = [d[1][phase] + 27 * (d[2][phase] - d[1][phase]) for d in (planned, traced)]
        assert abs(at_28[0] - at_28[1]) <= 0.1 * at_28[1], (phase, at_28[0] / 1e9, at_28[1] / 1e9)


def test_spec_run_fits_16gb_by_the_plan_and_the_extrapolated_trace(capsys):
    assert main(["memory", "--preset", "llama-3.2-3b", "--gpu_memory", "16GB", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert (report["chosen"]["rollout_chunk"], report["chosen"]["micro_batch"]) == (64, 16)  # SPEC's sizes
    assert report["plan"]["peak"] <= 15e9 and report["evaluate_peak"] <= 15e9
    assert set(report["other_cards"]) == {"24GB", "80GB"}
    # the trace at 1 and 2 layers, its per-layer terms extrapolated to 28, agrees
    cfg = TrainConfig.from_preset("llama-3.2-3b")
    seq = SequenceShape.of(cfg)
    p = plan(cfg, SPEC_3B)
    one, two = (trace(cfg, dataclasses.replace(SPEC_3B, layers=k), seq, k, 64, 16) for k in (1, 2))
    for phase, planned in (("rollout_bytes", p.rollout), ("update_bytes", p.update)):
        at_28 = getattr(one, phase) + 27 * (getattr(two, phase) - getattr(one, phase))
        assert p.static + at_28 <= 15e9 and abs(planned - at_28) <= 0.1 * at_28, (phase, at_28 / 1e9, planned / 1e9)


def test_choose_sizes_halves_until_a_phase_fits():
    cfg = TrainConfig.from_preset("llama-3.2-3b", gradient_checkpointing=0)
    chunk, micro, p = choose_sizes(cfg, SPEC_3B, 16 * 10**9)
    assert chunk == 64 and micro < 16 and card_spend(p)["peak"] <= 16e9  # without checkpointing the update shrinks
    assert card_spend(plan(cfg, SPEC_3B, micro_batch=micro * 2))["peak"] > 16e9
    assert choose_sizes(cfg, SPEC_3B, 10**9)[:2] == (1, 1)  # nothing fits: the fallbacks have the last word
    assert main(["memory", "--preset", "embedded", "--gpu_memory", "a lot"]) == 2


def test_chunked_loss_equals_the_whole_one_and_its_gradient():
    torch.manual_seed(0)
    n, M, H, V = 3, 10, 8, 50
    head = nn.Linear(H, V, bias=False)
    hidden = torch.randn(n, M, H, requires_grad=True)
    previous = torch.randn(n, M, V)
    tokens, rewards, choice = torch.randint(V, (n, M)), torch.randn(n), torch.randn(n)
    whole = reinforce_loss(head(hidden), previous, tokens, rewards, 0.1, 2.0, choice)
    (g_whole,) = torch.autograd.grad(whole.loss, hidden)
    chunked = chunked_reinforce_loss(hidden, head, lambda a, b: previous[:, a:b], tokens, rewards, 0.1, 2.0, choice,
                                     max_bytes=3 * n * V * 4)  # chunks of 3 positions: 3, 3, 3, 1
    (g_chunked,) = torch.autograd.grad(chunked.loss, hidden)
    for name in ("loss", "policy_loss", "kl"):
        torch.testing.assert_close(getattr(chunked, name), getattr(whole, name), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(g_chunked, g_whole, rtol=1e-5, atol=1e-7)


def test_scoring_in_row_chunks_equals_the_whole_logits():
    torch.manual_seed(0)
    head = nn.Linear(8, 50, bias=False)
    hidden, tokens = torch.randn(7, 5, 8), torch.randint(50, (7, 5))
    whole = token_logprobs(head(hidden), tokens)
    torch.testing.assert_close(head_logprobs(head, hidden, tokens, max_bytes=2 * 5 * 50 * 4), whole)  # 2 rows a chunk
    torch.testing.assert_close(whole, F.log_softmax(head(hidden), -1).gather(-1, tokens[..., None])[..., 0])


def test_gradient_checkpointing_gives_the_same_update():
    """The same losses and adapter with and without recomputation, LoRA dropout on (its masks are replayed)."""
    cfg = tiny_config(lora_dropout=0.2)
    results = []
    for on in (False, True):
        model = attach_adapter(tiny_llama(), cfg)
        randomize_adapter(model)
        set_gradient_checkpointing(model, on)
        batch = make_batch(model, cfg)
        torch.manual_seed(0)
        traj = rollout(model, batch, SEP, head_geometry(model), tokens_per_query=cfg.tokens_per_query)
        mlp, calls = model.get_base_model().model.layers[0].mlp, []
        forward = mlp.forward
        mlp.forward = lambda *a, **k: calls.append(1) or forward(*a, **k)  # counts recomputations too (hooks do not)
        torch.manual_seed(1)
        upd = update_policy(model, make_optimizer(model, cfg), traj, torch.ones(batch.batch_size, dtype=torch.bool),
                            training_batch_size=2)
        results.append((upd.loss, upd.kl, [p.detach().clone() for p in adapter_parameters(model)], len(calls)))
    (loss0, kl0, a0, calls0), (loss1, kl1, a1, calls1) = results
    assert calls1 > calls0 > 0  # the layer really ran again in the backward passes
    assert loss1 == pytest.approx(loss0, rel=1e-5, abs=1e-6) and kl1 == pytest.approx(kl0, rel=1e-5, abs=1e-7)
    for x, y in zip(a0, a1):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6)


def test_presets_gradient_checkpointing():
    assert TrainConfig.from_preset("llama-3.2-3b").gradient_checkpointing == 1  # what the plan needs for 16 GB
    assert TrainConfig.from_preset("embedded").gradient_checkpointing == 0  # CPU memory is ample there


def test_train_takes_its_sizes_from_the_plan(policy):
    """What `train` does on CUDA before the first episode (here with the memory given, not asked of a GPU): the
    plan's sizes, accumulation raised so that an optimizer step covers as many trajectories as configured."""
    cfg = tiny_config(generation_batch_size=8, training_batch_size=4, gradient_accumulation_steps=2)
    roomy = planned_sizes(cfg, policy, SEP, 10**12)
    assert (roomy.rollout_chunk, roomy.micro_batch, roomy.accumulation) == (8, 4, 2)
    shape = ModelShape.from_config(policy.config, torch.float32)
    seq = SequenceShape.of(cfg, 1, 2, 3)
    tight = card_spend(plan(cfg, shape, seq, 8, 2), context=0)  # on a card, its context already spent
    sizes = planned_sizes(cfg, policy, SEP, tight["peak"])
    assert (sizes.rollout_chunk, sizes.micro_batch, sizes.accumulation) == (8, 2, 4)


def test_float32_head_without_a_float32_copy_off_the_cpu():
    """Off the CPU (here `meta`, as on CUDA) the head keeps no float32 copy of its weight and reads the bf16 one in
    a GEMM with float32 output; its function gives the float32 head's logits (the CPU's upcast, exact) and a
    gradient to the hidden state within bf16 rounding of the float32 one."""
    meta = Float32Head(nn.Linear(16, 40, bias=False, device="meta", dtype=torch.bfloat16))
    assert meta.weight_fp32 is None and [n for n, _ in meta.named_parameters()] == ["weight"]
    x = torch.empty(3, 5, 16, device="meta", dtype=torch.bfloat16, requires_grad=True)
    y = meta(x)
    y.sum().backward()
    assert y.dtype == torch.float32 and x.grad.dtype == torch.bfloat16
    torch.manual_seed(0)
    lin = nn.Linear(16, 40, bias=False).to(torch.bfloat16)
    h = torch.randn(3, 5, 16, dtype=torch.bfloat16, requires_grad=True)
    logits = _Float32Logits.apply(h, lin.weight.detach())
    torch.testing.assert_close(logits, Float32Head(lin)(h), rtol=0, atol=0)
    g = torch.randn_like(logits)
    (got,) = torch.autograd.grad(logits, h, g)
    exact = g @ lin.weight.detach().float()
    torch.testing.assert_close(got.float(), exact, rtol=2e-2, atol=2e-2 * exact.abs().max().item())


def test_memory_json_names_what_the_card_spends_and_keeps_spec_sizes_at_16gb(capsys):
    """Issue 38: every term a card spends beside the allocated bytes is named, and SPEC's sizes (64 rows,
    micro-batch 16) still fit 16 GB with all of them counted, at sm80 and above; at sm75 (T4) a bfloat16 run is
    refused and the report says what fits in float16 and float32."""
    for arch in ("sm80", "sm86", "sm90"):
        assert main(["memory", "--preset", "llama-3.2-3b", "--gpu_memory", "16GB", "--gpu_arch", arch, "--json"]) == 0
        report = json.loads(capsys.readouterr().out)
        card = report["chosen"]["plan"]["card"]
        for phase in ("rollout", "update"):
            terms = card[phase]
            assert set(terms) == {"allocated", "allocator", "cublas_workspace", "cuda_context", "total"}
            assert terms["total"] == sum(v for k, v in terms.items() if k != "total") <= 16e9
            assert min(terms["allocator"], terms["cublas_workspace"], terms["cuda_context"]) > 0
        assert (report["chosen"]["rollout_chunk"], report["chosen"]["micro_batch"]) == (64, 16)
        assert "refused" not in report and report["attention_kernel"] == "flash"
    assert main(["memory", "--preset", "llama-3.2-3b", "--gpu_memory", "16GB", "--gpu_arch", "sm75", "--json"]) == 0
    t4 = json.loads(capsys.readouterr().out)
    assert t4["attention_kernel"] == "math" and "--dtype float16" in t4["refused"]
    assert t4["plan"]["terms"]["math_attention"] > 0  # the math kernel's float32 copies are counted
    assert t4["fits"]["float16"]["generation_batch_size"] == 64
    assert 0 < t4["fits"]["float32"]["generation_batch_size"] < 64 and t4["fits"]["float32"]["card_peak"] <= 16e9
    assert main(["memory", "--preset", "llama-3.2-3b", "--gpu_arch", "volta"]) == 2


def test_compile_counts_its_pools_and_archs_parse():
    cfg = TrainConfig.from_preset("llama-3.2-3b")
    plain, compiled = plan(cfg, SPEC_3B), plan(cfg.replace(compile=1), SPEC_3B)
    assert compiled.terms["compile_kv_pool"] == plain.terms["kv_cache"]  # the pooled KV buffers, alive in the update
    assert compiled.update - plain.update == plain.terms["kv_cache"] and compiled.terms["cuda_graph_pool"] > 0
    assert [parse_arch(a) for a in ("sm75", "sm_80", "8.6", "sm90", "sm100")] == [(7, 5), (8, 0), (8, 6), (9, 0),
                                                                               (10, 0)]
    assert (attention_kernel(torch.bfloat16, (7, 5)), attention_kernel(torch.float16, (7, 5)),
            attention_kernel(torch.bfloat16, (9, 0))) == ("math", "efficient", "flash")


def test_expandable_segments_set_before_cuda_unless_the_user_chose():
    env = {}
    assert use_expandable_segments(env) is (not torch.cuda.is_initialized())
    assert env.get("PYTORCH_CUDA_ALLOC_CONF") in (None, "expandable_segments:True")
    users = {"PYTORCH_CUDA_ALLOC_CONF": "max_split_size_mb:128"}
    assert use_expandable_segments(users) is False and users == {"PYTORCH_CUDA_ALLOC_CONF": "max_split_size_mb:128"}


def test_a_card_without_bfloat16_refuses_before_the_model_loads():
    cuda = torch.device("cuda")
    with pytest.raises(ValueError, match=r"^Tesla T4 \(sm75\) has no bfloat16 .*--dtype float16"):
        check_card(TrainConfig.from_preset("llama-3.2-3b"), cuda, (7, 5), "Tesla T4")
    check_card(TrainConfig.from_preset("llama-3.2-3b", dtype="float16"), cuda, (7, 5), "Tesla T4")  # runs as asked
    check_card(TrainConfig.from_preset("llama-3.2-3b"), cuda, (8, 0), "A100")
    check_card(TrainConfig.from_preset("embedded"), torch.device("cpu"))


def test_second_episode_peaks_as_the_first_on_meta():
    """Issue 38 item 1 at the 3B widths (2 layers): with the first episode's trajectory released before the second
    rollout, the second episode's rollout and update peak exactly as the first's."""
    cfg = TrainConfig.from_preset("llama-3.2-3b")
    shape = dataclasses.replace(SPEC_3B, layers=2)
    first, second = trace_episodes(cfg, shape, SequenceShape.of(cfg), 2, 64, 16, episodes=2).episodes
    assert (second.rollout_bytes, second.update_bytes) == (first.rollout_bytes, first.update_bytes)


def test_allocator_model_holes_and_expandable_segments():
    """The caching allocator's model on a sequence that leaves a hole: 100 MiB allocated and freed, 30 MiB
    (best fit: cut from the freed 100 MiB segment), then 80 MiB, which the remaining 70 MiB cannot hold. The
    default allocator needs a second segment (180 MiB reserved for 110 MiB live); with expandable segments the
    80 MiB extends the free 70 MiB by one 20 MiB page."""
    mib = 2**20
    events = [(0, 100 * mib), (0, -1), (1, 30 * mib), (2, 80 * mib)]
    default, expandable = (card_needed([], events, e) for e in (False, True))
    assert default == 180 * mib and 110 * mib <= expandable <= 120 * mib
    with pytest.raises(OutOfMemory):
        Allocator(default - 4 * mib).replay([], events)
    a = Allocator().replay([], [(0, 1000), (1, 2000), (0, -1), (2, 500)])
    assert a.reserved == 2 * mib  # small requests share one 2 MiB segment


def test_the_episode_peak_is_the_larger_phase_peak_on_cuda():
    """`phase_memory` resets CUDA's peak counter after each phase, so the episode's `peak_memory_bytes` is the larger
    of the two phases' allocated peaks (the update's once missed it); on the CPU the process's peak resident size."""
    memory = {"rollout_peak_allocated_bytes": 5, "rollout_peak_reserved_bytes": 20, "update_peak_allocated_bytes": 9,
              "update_peak_reserved_bytes": 21, "outside_allocator_bytes": 30}
    assert _episode_peak(memory, torch.device("cuda")) == 9
    assert _episode_peak({}, torch.device("cpu")) > 0
