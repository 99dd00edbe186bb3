"""Trajectory filtering: SPEC.md §3.1.4 as settled by DESIGN.md §2.6.

Welford statistics over every trajectory reward seen so far; after the warm-up, a trajectory is
selected when its reward > mean + num_sd * SD of the statistics as they were *before* its batch was
added. Pure; imports nothing from attnrl_core.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


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


def warmup_message(seen: int, warmup: int) -> str:
    """What a run still in warm-up has done, for the console and the notebooks: `seen` rewards are in the
    statistics, `warmup` are needed before the filter selects anything (and so before anything trains)."""
    need = max(warmup, 2)
    return (f"warm-up: {seen} of {need} trajectories seen, nothing selected yet"
            + ("; selection starts next episode" if seen >= need else ""))


def warmup_episodes(warmup: int, batch_size: int, seen: int = 0) -> int:
    """Episodes (of `batch_size` trajectories, `seen` already in the statistics) that select nothing."""
    return max(0, math.ceil((max(warmup, 2) - seen) / batch_size))


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


