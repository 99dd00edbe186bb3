"""Data parallelism on torch.distributed: the process group that `torchrun` or `accelerate launch` describe
in the environment, which rows of a global batch each rank holds, and the few collectives training needs.

Launched without RANK / WORLD_SIZE in the environment, a run is one rank of one (`Ranks()`), every
collective is the identity and nothing here touches torch.distributed: a single process runs exactly
as it would without this module.

How a data-parallel run stays the same run whatever the number of ranks:
  - every rank reads the same global batch (articles and pools) and rolls out rows `Ranks.rows(B)`;
  - every random draw of a rollout is made for the whole global batch and the rank's rows taken
    (`global_draw`), so a trajectory depends on its global row, never on the number of ranks;
  - the rewards are gathered, so the statistics, threshold and selection are the global batch's and
    identical everywhere; each rank computes the loss of the selected trajectories it holds, weighted
    by its share of the global step, and the adapter's gradients are summed (`Ranks.sum_gradients`);
  - the RNG states are made rank 0's after every update (`Ranks.sync_rng`): the update's dropout is
    the only draw that differs between ranks, and with `lora_dropout 0` nothing does.
Imports nothing from attnrl_core.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Callable

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Rows:
    """Rows [start, stop) of a global batch of `total` trajectories, held by one rollout (a rank's share, an
    out-of-memory chunk of it, or both)."""

    start: int
    stop: int
    total: int

    def __post_init__(self) -> None:
        assert 0 <= self.start < self.stop <= self.total, self

    @property
    def size(self) -> int:
        return self.stop - self.start

    def within(self, start: int, stop: int) -> "Rows":
        """Rows start..stop-1 of this range, as rows of the same global batch."""
        return Rows(self.start + start, self.start + stop, self.total)


def global_draw(n: int, rows: Rows | None, draw: Callable[[int], torch.Tensor]) -> torch.Tensor:
    """The random numbers [n, ...] of `n` local rows, drawn for the whole global batch and sliced.

    `draw(m)` makes the numbers of m rows. The local rows are k = n / rows.size blocks of `rows` (a
    rollout's policy and base-model halves: k = 2), and the global draw has the same k blocks of
    `rows.total` rows each. With `rows` None, or covering the whole batch, this is `draw(n)` itself.
    """
    if rows is None:
        return draw(n)
    k = n // rows.size
    assert k * rows.size == n, (n, rows)
    full = draw(k * rows.total)
    return full.view(k, rows.total, *full.shape[1:])[:, rows.start:rows.stop].reshape(n, *full.shape[1:])


@dataclass(frozen=True)
class Ranks:
    """This process's place in the run: rank, number of ranks (world), and its GPU on this machine."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        """Rank 0 writes the run directory; the other ranks only compute."""
        return self.rank == 0

    def rows(self, total: int) -> Rows:
        """This rank's contiguous share of a global batch of `total` rows."""
        if total % self.world:
            raise ValueError(f"generation_batch_size={total} does not split over {self.world} processes: use a "
                             f"multiple of {self.world}")
        share = total // self.world
        return Rows(self.rank * share, (self.rank + 1) * share, total)

    def gather_rows(self, x: torch.Tensor) -> torch.Tensor:
        """Every rank's `x` [n, ...] (the same shape on all) joined in rank order [world * n, ...]."""
        if self.world == 1:
            return x
        parts = [torch.empty_like(x) for _ in range(self.world)]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts)

    def sum(self, values: list[float]) -> list[float]:
        """Each value summed over the ranks."""
        if self.world == 1:
            return values
        t = torch.tensor(values, dtype=torch.float64, device=self._device())
        dist.all_reduce(t)
        return t.tolist()

    def any(self, flag: bool) -> bool:
        """True on every rank when `flag` is true on any (a stop request, an error)."""
        return self.sum([float(flag)])[0] > 0 if self.world > 1 else flag

    def sum_gradients(self, params: list[torch.nn.Parameter]) -> None:
        """Sum the adapter's gradients over the ranks, in one flat buffer (a missing gradient counts as 0:
        a rank may hold none of a step's trajectories). Each rank's loss is already weighted by its share
        of the global step, so the sum is the step's gradient."""
        if self.world == 1:
            return
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat)
        for p, g in zip(params, flat.split([q.numel() for q in params])):
            p.grad = g.view_as(p).clone()

    def sync_rng(self, device: torch.device) -> None:
        """Make every rank's torch RNG state rank 0's (CPU, and this rank's GPU)."""
        if self.world == 1:
            return
        states = [torch.get_rng_state(), torch.cuda.get_rng_state(device) if device.type == "cuda" else None]
        dist.broadcast_object_list(states, src=0)
        torch.set_rng_state(states[0])
        if states[1] is not None:
            torch.cuda.set_rng_state(states[1], device)

    def agree(self, value, what: str) -> None:
        """Stop, on every rank, with one line naming `what` when the ranks do not all hold the same `value`
        (a checkpoint chosen from a stale view of the run directory, a different dataset on another machine)."""
        if self.world == 1:
            return
        values = [None] * self.world
        dist.all_gather_object(values, value)
        if any(v != values[0] for v in values):
            raise ValueError(f"the processes disagree on {what} ({', '.join(f'rank {i}: {v}' for i, v in enumerate(values))}): "
                             "give every machine the same files, with --output_dir on a filesystem they share")

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    def _device(self) -> torch.device:
        return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def launched_ranks() -> Ranks:
    """The ranks the launcher set in the environment (torchrun, `accelerate launch`), or one rank of one."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    return Ranks(int(os.environ.get("RANK", "0")), world, int(os.environ.get("LOCAL_RANK", "0")))


TIMEOUT_S = 1800  # the longest a rank waits for the others in one collective: rank 0's evaluation, a slow model load


def start(ranks: Ranks, device_type: str, timeout_s: float = TIMEOUT_S) -> bool:
    """Join the process group (NCCL on GPUs, gloo on the CPU) when there is more than one rank; True when
    this call created it (and `stop` should end it). A rank that waits longer than `timeout_s` for the
    others fails instead of waiting silently."""
    if ranks.world == 1 or dist.is_initialized():
        return False
    if device_type == "cuda":
        if ranks.local_rank >= torch.cuda.device_count():
            raise ValueError(f"process {ranks.rank} has LOCAL_RANK {ranks.local_rank} but sees "
                             f"{torch.cuda.device_count()} GPU(s): start at most one process per visible GPU")
        torch.cuda.set_device(ranks.local_rank)
    dist.init_process_group("nccl" if device_type == "cuda" else "gloo",
                            timeout=datetime.timedelta(seconds=timeout_s))
    return True


def stop(created: bool) -> None:
    """End the process group if `start` created it."""
    if created and dist.is_initialized():
        dist.destroy_process_group()
