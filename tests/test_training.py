from dataclasses import replace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from attnrl_core.model import adapter_parameters, head_geometry
from attnrl_core.rollout import rollout
from attnrl_core.filtering import RunningStats, select_trajectories, selection_threshold
from attnrl_core.loss import kl_penalty, reinforce_loss
from attnrl_core.training import load_values, make_optimizer, query_logits, read_length, update_policy

from .conftest import SEP, logits_tolerance, make_batch, tiny_config


# -- filter ---------------------------------------------------------------------------------------------
def test_running_stats_is_welford_over_all_history():
    rng = np.random.default_rng(0)
    values = rng.normal(size=57)
    stats = RunningStats()
    for chunk in np.array_split(values, 5):
        stats.update(torch.tensor(chunk))
    assert stats.count == 57
    assert stats.mean == pytest.approx(values.mean(), abs=1e-12)
    assert stats.std == pytest.approx(values.std(), abs=1e-12)  # population SD, no window, no weights
    restored = RunningStats()
    restored.load_state_dict(stats.state_dict())
    assert restored == stats


def test_warmup_selects_nothing():
    stats = RunningStats()
    stats.update([0.0] * 14)
    assert not select_trajectories(torch.tensor([100.0, 5.0]), stats, warmup=15).any()
    assert selection_threshold(stats, 15) is None


def test_threshold_uses_stats_before_the_batch_and_leaves_them_alone():
    stats = RunningStats()
    stats.update([0.0, 2.0] * 10)  # mean 1, SD 1
    before = stats.state_dict()
    rewards = torch.tensor([1.5, 2.0, 2.01, 3.0, -4.0])
    assert selection_threshold(stats, 15) == pytest.approx(2.0)
    assert select_trajectories(rewards, stats, warmup=15).tolist() == [False, False, True, True, False]
    assert select_trajectories(rewards, stats, warmup=15, num_sd=0.5).tolist() == [False, True, True, True, False]
    assert stats.state_dict() == before
    stats.update(rewards)
    assert stats.count == 25


# -- KL and loss ------------------------------------------------------------------------------------------
def test_kl_penalty_is_kl_previous_to_current():
    torch.manual_seed(0)
    cur, prev = torch.randn(3, 4, 11), torch.randn(3, 4, 11)
    p_prev, p_cur = F.softmax(prev, -1), F.softmax(cur, -1)
    expected = (p_prev * (p_prev.log() - p_cur.log())).sum(-1)
    torch.testing.assert_close(kl_penalty(cur, prev), expected, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(kl_penalty(prev, cur), expected)  # direction matters
    assert torch.all(kl_penalty(cur, cur).abs() < 1e-6)


def test_reinforce_loss_gradient_matches_formula():
    torch.manual_seed(0)
    n, M, V, beta = 3, 4, 7, 0.1
    logits = torch.randn(n, M, V, requires_grad=True)
    prev = torch.randn(n, M, V)
    tokens = torch.randint(0, V, (n, M))
    rewards = torch.tensor([0.5, -1.0, 2.0])
    reinforce_loss(logits, prev, tokens, rewards, beta).loss.backward()
    got = logits.grad.clone()

    logits.grad = None
    plain = 0.0
    for i in range(n):  # the formula, written out
        logp = sum(torch.log_softmax(logits[i, m], -1)[tokens[i, m]] for m in range(M))
        kl = sum((F.softmax(prev[i, m], -1) * (F.log_softmax(prev[i, m], -1) - F.log_softmax(logits[i, m], -1))).sum()
                 for m in range(M))
        plain = plain + (-rewards[i] * logp + beta * kl) / n
    plain.backward()
    torch.testing.assert_close(got, logits.grad, rtol=1e-5, atol=1e-6)


# -- the update phase -------------------------------------------------------------------------------------
def _trajectory(policy, **overrides):
    cfg = tiny_config(**overrides)
    torch.manual_seed(0)
    batch = make_batch(policy, cfg)
    return cfg, rollout(policy, batch, SEP, head_geometry(policy), tokens_per_query=cfg.tokens_per_query)


def test_kl_zero_on_first_micro_batch_then_positive(policy):
    cfg, traj = _trajectory(policy, learning_rate=1e-2)
    opt = make_optimizer(policy, cfg)
    res = update_policy(policy, opt, traj, torch.tensor([True, True, True, True]), training_batch_size=2)
    assert res.optimizer_steps == 2 and len(res.micro_batch_kl) == 2
    assert abs(res.micro_batch_kl[0]) < 1e-6  # the rollout's logits and the teacher-forced ones differ by rounding
    assert res.micro_batch_kl[1] > 1e-4


def test_rollout_logits_are_the_previous_policy(policy):
    """The logits kept by the rollout are the teacher-forced ones, and an update from them equals one
    that re-scores the trajectories with the previous adapter (the fallback without kept logits)."""
    cfg, traj = _trajectory(policy, learning_rate=1e-2)
    with torch.no_grad():
        forced = query_logits(policy, traj.tokens, traj.query_positions)
    torch.testing.assert_close(traj.query_logits, forced, **logits_tolerance(torch.float32))
    start = [p.detach().clone() for p in adapter_parameters(policy)]
    selected = torch.tensor([True, False, True, True])
    kept = update_policy(policy, make_optimizer(policy, cfg), traj, selected, training_batch_size=2)
    after_kept = [p.detach().clone() for p in adapter_parameters(policy)]
    load_values(adapter_parameters(policy), start)
    rescored = update_policy(policy, make_optimizer(policy, cfg), replace(traj, query_logits=None), selected,
                             training_batch_size=2)
    assert rescored.micro_batch_kl[1] == pytest.approx(kept.micro_batch_kl[1], rel=1e-3)
    for a, b in zip(after_kept, adapter_parameters(policy)):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-5)


def test_query_logits_read_only_up_to_the_last_query(policy):
    """The teacher-forced pass stops at the last query token; its logits equal those of the whole sequence."""
    _, traj = _trajectory(policy)
    positions = traj.query_positions
    assert read_length(positions) == int(positions[-1]) < traj.tokens.shape[1]  # the last value is not read
    with torch.no_grad():
        whole = policy(input_ids=traj.tokens, use_cache=False).logits[:, positions - 1]
        torch.testing.assert_close(query_logits(policy, traj.tokens, positions), whole, rtol=1e-5, atol=1e-5)


def test_only_adapter_parameters_change(policy):
    cfg, traj = _trajectory(policy, learning_rate=1e-2)
    before = {k: v.clone() for k, v in policy.state_dict().items()}
    opt = make_optimizer(policy, cfg)
    update_policy(policy, opt, traj, torch.tensor([True, False, True, False]), training_batch_size=2)
    changed = {k for k, v in policy.state_dict().items() if not torch.equal(v, before[k])}
    assert changed and all("lora_" in k for k in changed)
    assert all(p.requires_grad == ("lora_" in n) for n, p in policy.named_parameters())


def test_gradient_clipping_and_accumulation(policy, monkeypatch):
    cfg, traj = _trajectory(policy)
    opt = make_optimizer(policy, cfg)
    seen = []
    real_step = opt.step

    def step(*args, **kwargs):
        grads = [p.grad for p in adapter_parameters(policy) if p.grad is not None]
        seen.append(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])).item())
        return real_step(*args, **kwargs)

    monkeypatch.setattr(opt, "step", step)
    res = update_policy(policy, opt, traj, torch.ones(4, dtype=torch.bool), training_batch_size=1,
                        gradient_accumulation_steps=2, max_grad_norm=1e-3)
    assert res.optimizer_steps == 2 and len(seen) == 2  # 4 micro-batches, 2 accumulated per step
    assert all(n <= 1e-3 * (1 + 1e-4) for n in seen)
    assert res.grad_norm > 1e-3  # the reported norm is before clipping


def test_nothing_selected_means_no_update(policy):
    cfg, traj = _trajectory(policy)
    before = [p.clone() for p in adapter_parameters(policy)]
    assert update_policy(policy, make_optimizer(policy, cfg), traj, torch.zeros(4, dtype=torch.bool),
                         training_batch_size=2) is None
    assert all(torch.equal(a, b) for a, b in zip(before, adapter_parameters(policy)))


# -- fair weighting across micro-batches and optimizer steps ----------------------------------------------
def test_optimizer_steps_are_near_equal():
    from attnrl_core.training import optimizer_step_sizes

    assert optimizer_step_sizes(17, 16) == [9, 8]
    assert optimizer_step_sizes(5, 4) == [3, 2]
    assert optimizer_step_sizes(16, 16) == [16]
    assert optimizer_step_sizes(33, 16) == [11, 11, 11]
    assert optimizer_step_sizes(1, 16) == [1]


def _step_gradients(policy, traj, selected, micro_batch, accumulation):
    """The (unclipped) adapter gradient of every optimizer step of one update phase, from the same start."""
    start = [p.detach().clone() for p in adapter_parameters(policy)]
    opt = torch.optim.SGD(adapter_parameters(policy), lr=0.0)  # lr 0: every phase starts from the same adapter
    grads = []
    real_step = opt.step

    def step(*args, **kwargs):
        grads.append(torch.cat([p.grad.flatten() for p in adapter_parameters(policy)]).clone())
        return real_step(*args, **kwargs)

    opt.step = step
    update_policy(policy, opt, traj, selected, training_batch_size=micro_batch,
                  gradient_accumulation_steps=accumulation, max_grad_norm=1e9)
    load_values(adapter_parameters(policy), start)
    return grads


def test_every_trajectory_weighs_the_same_whatever_the_micro_batches(policy):
    """3 selected in micro-batches [2, 1] accumulated into one step: each trajectory weighs a third
    (the per-micro-batch mean gave 1/4, 1/4, 1/2), the same as one micro-batch of 3."""
    _, traj = _trajectory(policy)
    selected = torch.tensor([True, True, False, True])
    whole = _step_gradients(policy, traj, selected, micro_batch=4, accumulation=1)
    split = _step_gradients(policy, traj, selected, micro_batch=2, accumulation=2)
    single = _step_gradients(policy, traj, selected, micro_batch=1, accumulation=4)
    assert len(whole) == len(split) == len(single) == 1
    torch.testing.assert_close(split[0], whole[0], rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(single[0], whole[0], rtol=1e-4, atol=1e-6)


def test_halving_the_micro_batch_keeps_the_steps_and_gradients(policy):
    """5 selected with up to 4 per step are steps of [3, 2] (not [4, 1]); the out-of-memory fallback
    (micro-batch / 2, accumulation x 2) takes the same steps with the same gradients."""
    _, traj = _trajectory(policy, generation_batch_size=6)
    selected = torch.tensor([True, True, False, True, True, True])
    full = _step_gradients(policy, traj, selected, micro_batch=4, accumulation=1)
    halved = _step_gradients(policy, traj, selected, micro_batch=2, accumulation=2)
    first_three = _step_gradients(policy, traj, torch.tensor([True, True, False, True, False, False]), 3, 1)
    assert len(full) == len(halved) == 2
    for a, b in zip(full, halved):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(full[0], first_three[0], rtol=1e-4, atol=1e-6)
