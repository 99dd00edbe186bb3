"""Filtering and the policy update: SPEC.md §3.1.4-5 as settled by DESIGN.md §2.6-2.8.

  4. Trajectory filtering: Welford statistics over every trajectory reward seen so far; after the
     warm-up, a trajectory is selected when its reward > mean + num_sd * SD of the statistics as they
     were *before* its batch was added.
  5. Policy update: the previous policy is the one that rolled the batch out (its logits at the query
     positions come with the trajectory, so it costs no forward pass); per micro-batch of selected
     trajectories
        loss = -mean_traj[ R * sum_{steps, query tokens} log pi(token | state) ]
               + beta * mean_traj[ sum_{steps, query tokens} KL(pi_prev(.|state) || pi(.|state)) ]
     with one teacher-forced pass over each trajectory's final sequence (logits only at query
     positions), 8-bit Adam on the adapter, gradient norm clipped.

The maths (`RunningStats`, `select_trajectories`, `kl_penalty`, `reinforce_loss`) is pure; `update_policy`
is the thin stateful shell, and `make_optimizer` builds the 8-bit Adam it steps.
Imports attnrl_core.config, attnrl_core.model and attnrl_core.rollout.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import bitsandbytes as bnb
import torch
import torch.nn.functional as F
from torch import nn

from .config import TrainConfig
from .model import adapter_parameters
from .rollout import Trajectory


# -- 4. filtering -----------------------------------------------------------------------------------
@dataclass
class RunningStats:
    """Mean and (population) standard deviation of every value seen, by Welford's algorithm."""

    count: int = 0
    mean: float = 0.0
    m2: float = 0.0

    @property
    def std(self) -> float:
        return math.sqrt(self.m2 / self.count) if self.count else 0.0

    def update(self, values: torch.Tensor | list[float]) -> None:
        for x in torch.as_tensor(values, dtype=torch.float64).flatten().tolist():
            self.count += 1
            delta = x - self.mean
            self.mean += delta / self.count
            self.m2 += delta * (x - self.mean)

    def state_dict(self) -> dict:
        return {"count": self.count, "mean": self.mean, "m2": self.m2}

    def load_state_dict(self, state: dict) -> None:
        self.count, self.mean, self.m2 = int(state["count"]), float(state["mean"]), float(state["m2"])


def selection_threshold(stats: RunningStats, warmup: int, num_sd: float = 1.0) -> float | None:
    """mean + num_sd * SD, or None while fewer than `warmup` rewards (and fewer than 2) are in the statistics."""
    if stats.count < max(warmup, 2):
        return None
    return stats.mean + num_sd * stats.std


def filter_batch(rewards: torch.Tensor, stats: RunningStats, warmup: int,
                 num_sd: float = 1.0) -> tuple[torch.Tensor, float | None]:
    """(BoolTensor [B]: reward > threshold, the threshold or None in warm-up); `stats` is not modified."""
    threshold = selection_threshold(stats, warmup, num_sd)
    if threshold is None:
        return torch.zeros(rewards.shape, dtype=torch.bool, device=rewards.device), None
    return rewards > threshold, threshold


def select_trajectories(rewards: torch.Tensor, stats: RunningStats, warmup: int,
                        num_sd: float = 1.0) -> torch.Tensor:
    """BoolTensor [B]: reward > mean + num_sd * SD of `stats` (call before adding this batch to `stats`).

    Nothing is selected until the statistics hold at least `warmup` rewards: the first batches only
    establish the statistics. `stats` is not modified.
    """
    return filter_batch(rewards, stats, warmup, num_sd)[0]


# -- 5. the loss --------------------------------------------------------------------------------------
def kl_penalty(current_logits: torch.Tensor, previous_logits: torch.Tensor) -> torch.Tensor:
    """KL(previous || current) summed over the vocabulary: [..., V] -> [...]."""
    return _kl(F.log_softmax(current_logits.float(), dim=-1), F.log_softmax(previous_logits.float(), dim=-1))


def _kl(current_logp: torch.Tensor, previous_logp: torch.Tensor) -> torch.Tensor:
    """KL(previous || current) from log-probabilities [..., V] -> [...].

    `F.kl_div(input, target, log_target=True)` computes sum target.exp() * (target - input), i.e.
    KL(target || input), so the current policy is the input and the previous one the target.
    """
    return F.kl_div(current_logp, previous_logp, reduction="none", log_target=True).sum(dim=-1)


@dataclass
class LossTerms:
    loss: torch.Tensor
    policy_loss: torch.Tensor
    kl: torch.Tensor


def reinforce_loss(current_logits: torch.Tensor, previous_logits: torch.Tensor, tokens: torch.Tensor,
                   rewards: torch.Tensor, beta: float, query_temperature: float = 1.0) -> LossTerms:
    """The update's loss on n trajectories: logits [n, M, V] at the M query positions, tokens [n, M], rewards [n].

    The policy is the distribution queries were sampled from, softmax(logits / query_temperature).
    """
    n, M, _ = current_logits.shape
    assert previous_logits.shape == current_logits.shape and tokens.shape == (n, M) and rewards.shape == (n,)
    current, previous = current_logits.float(), previous_logits.float()
    if query_temperature != 1.0:  # at 1 the division would only copy two [n, M, V] tensors
        current, previous = current / query_temperature, previous / query_temperature
    current_logp = F.log_softmax(current, dim=-1)  # one [n, M, V] log-softmax serves both terms
    logp = current_logp.gather(-1, tokens[..., None]).squeeze(-1)  # [n, M]
    policy_loss = -(rewards * logp.sum(dim=1)).mean()
    kl = _kl(current_logp, F.log_softmax(previous, dim=-1)).sum(dim=1).mean()
    return LossTerms(policy_loss + beta * kl, policy_loss, kl)


def query_logits(model: nn.Module, tokens: torch.Tensor, query_positions: torch.Tensor) -> torch.Tensor:
    """Teacher-forced logits [n, M, V] predicting the tokens at `query_positions` [M] of `tokens` [n, L].

    Reads `tokens` only up to the last query token (`read_length`): the causal model's logits there do not
    depend on the value after it (its share of the work is in BENCHMARKS.md).
    """
    end = read_length(query_positions)
    return model(input_ids=tokens[:, :end], use_cache=False, logits_to_keep=query_positions - 1).logits


def read_length(query_positions: torch.Tensor) -> int:
    """Tokens a teacher-forced pass must read to predict every query token: up to the last one's position."""
    return int(query_positions.max())


@torch.no_grad()
def load_values(params: list[nn.Parameter], values: list[torch.Tensor]) -> None:
    """Copy `values` into `params` in place (optimizer references stay valid)."""
    for p, v in zip(params, values):
        p.copy_(v)


@contextlib.contextmanager
def swapped_parameters(params: list[nn.Parameter], values: list[torch.Tensor]):
    """Temporarily load `values` into `params` (the previous policy), restoring them on exit."""
    saved = [p.detach().clone() for p in params]
    load_values(params, values)
    try:
        yield
    finally:
        load_values(params, saved)


def previous_policy_logits(model: nn.Module, trajectory: Trajectory, rows: torch.Tensor, tokens: torch.Tensor,
                           positions: torch.Tensor, params: list[nn.Parameter],
                           previous: list[torch.Tensor] | None) -> torch.Tensor:
    """[n, M, V] logits of the previous policy (SPEC.md §3.1.6: the one that rolled the batch out) at the
    query positions of trajectories `rows`.

    The rollout kept the logits each query token was drawn from: they are exactly these, so the
    update needs no extra forward pass. A trajectory without them (built by hand) is re-scored with
    the previous adapter weights `previous` swapped in.
    """
    if trajectory.query_logits is not None:
        return trajectory.query_logits[rows.to(trajectory.query_logits.device)]  # a copy: an ordinary tensor
    with torch.no_grad(), swapped_parameters(params, previous):
        model.eval()  # the previous policy without dropout
        return query_logits(model, tokens, positions)


@dataclass
class UpdateResult:
    loss: float
    policy_loss: float
    kl: float
    grad_norm: float
    optimizer_steps: int
    skipped_steps: int  # steps whose loss or gradient was not finite (no update made)
    micro_batch_kl: list[float]  # KL term of each micro-batch in order (the first is ~0: previous = current)


def optimizer_step_sizes(n: int, max_size: int) -> list[int]:
    """Split n selected trajectories into as few optimizer steps of at most `max_size` as possible, of
    near-equal size (17 with 16 per step -> [9, 8], not [16, 1]: a lone leftover would otherwise get
    a whole step, or a micro-batch's weight, of its own)."""
    steps = math.ceil(n / max_size)
    size, extra = divmod(n, steps)
    return [size + 1] * extra + [size] * (steps - extra)


def update_policy(model: nn.Module, optimizer: torch.optim.Optimizer, trajectory: Trajectory,
                  selected: torch.Tensor, *, training_batch_size: int, gradient_accumulation_steps: int = 1,
                  beta: float = 0.1, max_grad_norm: float = 1.0, query_temperature: float = 1.0) -> UpdateResult | None:
    """One update phase over the selected trajectories; None when nothing was selected.

    An optimizer step covers up to `training_batch_size * gradient_accumulation_steps` trajectories
    (`optimizer_step_sizes`), read in micro-batches of up to `training_batch_size`; each micro-batch's
    loss is weighted by its share of the step, so every trajectory of a step weighs the same whatever
    the micro-batch sizes, and halving the micro-batch while doubling accumulation (the out-of-memory
    fallback) gives the same gradient.
    """
    index = selected.nonzero().squeeze(1).cpu()
    if index.numel() == 0:
        return None
    params = adapter_parameters(model)
    # Rollout tensors are inference tensors; clone them into ordinary ones for autograd.
    tokens_all, rewards_all = trajectory.tokens.clone(), trajectory.avg_reward.clone().float()
    positions = trajectory.query_positions.to(tokens_all.device)
    previous = None if trajectory.query_logits is not None else [p.detach().clone() for p in params]
    sums = {"loss": 0.0, "policy_loss": 0.0, "kl": 0.0}  # weighted by trajectories
    micro_kl, norms, skipped = [], [], 0
    step_sizes = optimizer_step_sizes(index.numel(), training_batch_size * gradient_accumulation_steps)
    optimizer.zero_grad(set_to_none=True)
    for step_rows in index.split(step_sizes):
        finite = True
        for mb in step_rows.split(training_batch_size):
            mb = mb.to(tokens_all.device)
            tokens, rewards = tokens_all[mb], rewards_all[mb]
            prev_logits = previous_policy_logits(model, trajectory, mb, tokens, positions, params, previous)
            model.train()
            terms = reinforce_loss(query_logits(model, tokens, positions), prev_logits, tokens[:, positions], rewards,
                                   beta, query_temperature)
            (terms.loss * (len(mb) / len(step_rows))).backward()  # the step's mean over its trajectories
            for k in sums:
                sums[k] += getattr(terms, k).item() * len(mb)
            micro_kl.append(terms.kl.item())
            finite = finite and math.isfinite(terms.loss.item())
        norm = torch.nn.utils.clip_grad_norm_(params, max_grad_norm).item()
        if finite and math.isfinite(norm):
            optimizer.step()
            norms.append(norm)
        else:
            skipped += 1
        optimizer.zero_grad(set_to_none=True)
    model.eval()
    n = index.numel()
    return UpdateResult(sums["loss"] / n, sums["policy_loss"] / n, sums["kl"] / n,
                        sum(norms) / len(norms) if norms else float("nan"), len(norms), skipped, micro_kl)


def make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """DESIGN.md §2.8: bitsandbytes' 8-bit Adam over the adapter's parameters only."""
    return bnb.optim.Adam8bit(adapter_parameters(model), lr=cfg.learning_rate)
