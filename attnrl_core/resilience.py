"""Surviving faults in a long run: out-of-memory fallbacks and the non-finite guard.

- Rollout OOM: free memory, roll the same batch out in row chunks of half the size, and keep that
  chunk size for later episodes. Every chunk starts from the RNG state the whole batch started from
  and draws for the whole batch (`distributed.global_draw`), so the trajectories are the same.
- Update OOM: restore the adapter and optimizer to the phase's start, halve the micro-batch and
  double gradient accumulation (same effective batch), and redo the phase.
- Below size 1 there is nothing left to halve: stop with a message that says so.
- In a data-parallel run an update OOM on one rank cannot be retried in step with the others: it
  stops with a message naming the setting to lower.
Imports attnrl_core.distributed, .host, .model, .rollout, .trajectory and .training.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass

import torch

from .distributed import Rows
from .host import free_memory
from .model import adapter_parameters
from .rollout import rollout
from .trajectory import Trajectory
from .training import (ChoiceStepResult, HindsightResult, UpdateResult, choice_target_step, hindsight_step, load_values,
                       update_policy)

log = logging.getLogger("attnrl")


def is_out_of_memory(error: BaseException) -> bool:
    return isinstance(error, torch.OutOfMemoryError) or "out of memory" in str(error).lower()


@dataclass
class FallbackState:
    """Sizes currently in use; they only ever shrink, and are logged with each episode's metrics."""

    rollout_chunk: int
    micro_batch: int
    accumulation: int
    oom_events: int = 0


def _restorer(device: torch.device, generator: torch.Generator | None):
    """A callable that puts the rollout's random generator(s) back to their state now."""
    if generator is not None:
        state = generator.get_state()
        return lambda: generator.set_state(state)
    cpu = torch.get_rng_state()
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None

    def restore() -> None:
        torch.set_rng_state(cpu)
        if cuda is not None:
            torch.cuda.set_rng_state(cuda, device)

    return restore


def rollout_resilient(model, batch, sep, geo, state: FallbackState, describe_hardware, rows: Rows | None = None,
                      **kwargs) -> Trajectory:
    """`rollout` of `batch` (rows `rows` of a global batch; default the whole of it) in chunks of
    `state.rollout_chunk` rows, halved on out-of-memory."""
    B = batch.batch_size
    rows = rows or Rows(0, B, B)
    restore = _restorer(batch.key_embeddings.device, kwargs.get("generator"))
    while True:
        chunk = min(state.rollout_chunk, B)
        try:
            parts, kept = [], None
            if chunk < B and kwargs.get("keep_query_logits", True):  # one buffer for every chunk's kept logits
                kept = torch.empty(B, batch.pool.shape[1] * kwargs["tokens_per_query"],
                                   model.get_output_embeddings().out_features, device=batch.key_embeddings.device)
            for i in range(0, B, chunk):
                if i:
                    restore()  # each chunk draws what the whole batch would, from the same state
                parts.append(rollout(model, batch.rows(i, min(i + chunk, B)), sep, geo,
                                     global_rows=rows.within(i, min(i + chunk, B)),
                                     query_logits_out=None if kept is None else kept[i:i + chunk], **kwargs))
            return parts[0] if len(parts) == 1 else Trajectory.concat(parts, batch, kept)
        except Exception as e:  # noqa: BLE001 - only out-of-memory is handled; anything else propagates
            if not is_out_of_memory(e):
                raise
            restore()
            if kwargs.get("decode_step") is not None:
                kwargs["decode_step"].release()
            free_memory()
            state.oom_events += 1
            if chunk <= 1:
                raise RuntimeError("out of memory rolling out even one trajectory: use a smaller model, dtype "
                                   "bfloat16, or fewer num_kv_pairs / tokens per chunk") from e
            state.rollout_chunk = chunk // 2
            log.warning("out of memory in rollout (%s); retrying in chunks of %d trajectories",
                        describe_hardware(), state.rollout_chunk)


def update_resilient(model, optimizer, trajectory, selected, state: FallbackState, describe_hardware,
                     choice_target: dict | None = None, hindsight: dict | None = None, **kwargs
                     ) -> tuple[UpdateResult | None, ChoiceStepResult | None, HindsightResult | None]:
    """The update phase (`update_policy` on the selected trajectories, then, with `choice_target`, the
    selection objective's step over every trajectory, `choice_target_step`, and with `hindsight` the query's
    hindsight step, `hindsight_step`), redone from its start with half the micro-batch after an out-of-memory."""
    params = adapter_parameters(model)
    saved_params = [p.detach().clone() for p in params]
    saved_optimizer = copy.deepcopy(optimizer.state_dict())
    while True:
        try:
            upd = update_policy(model, optimizer, trajectory, selected, training_batch_size=state.micro_batch,
                                gradient_accumulation_steps=state.accumulation, **kwargs)
            choice = None if choice_target is None else choice_target_step(
                model, optimizer, trajectory, training_batch_size=state.micro_batch, **choice_target,
                ranks=kwargs.get("ranks"))
            written = None if hindsight is None else hindsight_step(
                model, optimizer, trajectory, training_batch_size=state.micro_batch, **hindsight,
                ranks=kwargs.get("ranks"))
            return upd, choice, written
        except Exception as e:  # noqa: BLE001
            if not is_out_of_memory(e):
                raise
            if kwargs.get("ranks") is not None and kwargs["ranks"].world > 1:
                raise RuntimeError(
                    f"out of memory in a data-parallel update ({describe_hardware()}): the processes cannot retry in "
                    f"step; in the run's config.json halve training_batch_size (now {state.micro_batch}) and double "
                    f"gradient_accumulation_steps (the same optimizer step), then --resume") from e
            optimizer.zero_grad(set_to_none=True)
            load_values(params, saved_params)
            optimizer.load_state_dict(saved_optimizer)
            free_memory()
            state.oom_events += 1
            if state.micro_batch <= 1:
                raise RuntimeError("out of memory updating on even one trajectory: use a smaller model, dtype "
                                   "bfloat16, or fewer num_kv_pairs / tokens per chunk") from e
            state.micro_batch //= 2
            state.accumulation *= 2
            log.warning("out of memory in update (%s); retrying with micro-batches of %d x %d accumulation",
                        describe_hardware(), state.micro_batch, state.accumulation)
