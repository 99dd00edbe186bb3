"""How much work an episode does: tokens the model reads and useful FLOPs, from shapes alone.

Pure functions of a trajectory batch's sizes, shared by the loop's `tokens_per_second` and the
benchmark's FLOP rates, so neither the rollout nor the update has to count as it goes. The FLOP
estimate is the dense-transformer one: 2N per token read forward (N = non-embedding parameters),
2VH per position where the LM head runs; backward to the activations doubles both (the frozen
base model needs no weight gradients). Attention scores are not counted.
Imports attnrl_core.trajectory for its type only.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, NamedTuple

if TYPE_CHECKING:
    from .trajectory import Trajectory


class Work(NamedTuple):
    tokens: int  # token positions read by the model
    logit_positions: int  # positions at which the LM head ran


def rollout_work(traj: "Trajectory") -> Work:
    """The cached rollout of `traj`: policy and base rows read the initial context; per step each writes
    its query, both score the value after their own query, the policy's query is embedded, and the base
    rows re-read the policy's query and value."""
    B, P, Tq = traj.queries.shape
    Sq, Tv = traj.query_offset, traj.batch.value_tokens.shape[2]
    Sr = traj.step_length - Sq - Tq - Tv
    per_step = 2 * (Sq + Tq + Sr + Tv) + Tq + (Tq + Sr + Tv)
    tokens = 2 * B * traj.initial_length + P * B * per_step
    # LM head: one position per prefill; per step and model Tq sampling positions + Tv scored; base re-read 1
    logits = 2 * B + P * B * (2 * (Tq + Tv) + 1)
    return Work(tokens, logits)


def update_work(trajectories: int, read_length: int, query_positions: int, rescored: bool = False) -> Work:
    """An update over `trajectories` selected rows, each read up to `read_length` tokens (twice when the
    previous policy had to be re-scored), with logits at its `query_positions`."""
    passes = 2 if rescored else 1
    return Work(trajectories * read_length * passes, trajectories * query_positions * passes)


def forward_flops(work: Work, non_embedding_params: int, vocab_times_hidden: int) -> int:
    return 2 * non_embedding_params * work.tokens + 2 * vocab_times_hidden * work.logit_positions


def training_flops(work: Work, non_embedding_params: int, vocab_times_hidden: int) -> int:
    """Forward plus backward to the activations: twice the forward FLOPs."""
    return 2 * forward_flops(work, non_embedding_params, vocab_times_hidden)
