"""A batch of trajectories held as tensors (SPEC.md §4.4's `Trajectory` and `TrajectoryStep`, batched),
and the views derived from it: positions of queries and values in the final context, the pairs
available at each step, the reward's split into adapter and query parts. Built by `rollout`; read by
the update, the run directory, the evaluation and the accounting. Imports attnrl_core.data and
.distributed.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .data import KeyValueBatch
from .distributed import Ranks


@dataclass
class Trajectory:
    """B trajectories of P steps rolled out together, held as tensors (SPEC.md §4.4's `Trajectory` and
    `TrajectoryStep`, batched: row b of every tensor is one trajectory, column t one step)."""

    tokens: torch.Tensor  # [B, L] final context: every query sits at the exact state it was sampled in
    queries: torch.Tensor  # [B, P, Tq] the policy's queries
    counterfactuals: torch.Tensor  # [B, P, Tq] the base model's queries from the same contexts
    choices: torch.Tensor  # [B, P] index of the chosen pair (1..N-1)
    choice_probs: torch.Tensor  # [B, P] its probability under the similarity distribution
    probabilities: torch.Tensor  # [B, P, N] the distributions (0 for pairs not available)
    policy_logprob: torch.Tensor  # [B, P] mean log p_policy(value tokens)
    base_logprob: torch.Tensor  # [B, P] mean log p_base(value tokens | counterfactual query)
    rewards: torch.Tensor  # [B, P] calculate_reward: policy_logprob - base_logprob
    base_same_logprob: torch.Tensor  # [B, P] mean log p_base(value tokens | the policy's own query and context)
    initial_length: int  # L0: tokens of [BOS] ` Query:` key_0 ` Response:` value_0
    step_length: int  # tokens appended per step: Sq + Tq + Sr + Tv
    query_offset: int  # Sq: where a step's query starts within the step
    batch: KeyValueBatch
    query_logits: torch.Tensor | None = None  # [B, P*Tq, V] the policy's logits each query token was drawn from
    candidate_rewards: torch.Tensor | None = None  # [B, P, N] the reward each pair left would have earned (oracle)
    candidate_logprobs: torch.Tensor | None = None  # [B, P, N] its policy_logprob term: mean log p_policy(its value)

    def __post_init__(self) -> None:
        B, P, Tq = self.queries.shape
        N = self.probabilities.shape[2]
        assert self.tokens.shape == (B, self.initial_length + P * self.step_length), self.tokens.shape
        assert self.counterfactuals.shape == (B, P, Tq), self.counterfactuals.shape
        assert self.probabilities.shape == (B, P, N) and N == self.batch.key_tokens.shape[1], self.probabilities.shape
        for name in ("choices", "choice_probs", "policy_logprob", "base_logprob", "rewards", "base_same_logprob"):
            assert getattr(self, name).shape == (B, P), (name, getattr(self, name).shape)
        if self.query_logits is not None:
            assert self.query_logits.shape[:2] == (B, P * Tq), self.query_logits.shape
        for name in ("candidate_rewards", "candidate_logprobs"):
            assert getattr(self, name) is None or getattr(self, name).shape == (B, P, N), (name, getattr(self, name).shape)

    @classmethod
    def concat(cls, parts: list["Trajectory"], batch: KeyValueBatch,
               query_logits: torch.Tensor | None = None) -> "Trajectory":
        """Join trajectories rolled out in row chunks of `batch` (all chunks have the same lengths). `query_logits`:
        the whole batch's buffer the chunks wrote their kept logits into (then not copied again)."""
        first = parts[0]
        tensors = {f: torch.cat([getattr(p, f) for p in parts]) for f in _ROW_FIELDS}
        optional = {f: None if getattr(first, f) is None else torch.cat([getattr(p, f) for p in parts])
                    for f in ("candidate_rewards", "candidate_logprobs")}
        optional["query_logits"] = query_logits if query_logits is not None or first.query_logits is None else \
            torch.cat([p.query_logits for p in parts])
        return cls(**tensors, initial_length=first.initial_length, step_length=first.step_length,
                   query_offset=first.query_offset, batch=batch, **optional)

    def gathered(self, batch: KeyValueBatch, ranks: Ranks) -> "Trajectory":
        """The global batch `batch`'s trajectories, from every rank's rows of it (this one's own when there
        is one rank): what the selection, the metrics and the records read. The policy's sampling logits
        and the oracle's rewards stay on their rank (the update reads them there)."""
        if ranks.world == 1:
            return self
        tensors = {f: ranks.gather_rows(getattr(self, f)) for f in _ROW_FIELDS}
        batch = dataclasses.replace(batch, key_embeddings=ranks.gather_rows(self.batch.key_embeddings))
        return Trajectory(**tensors, initial_length=self.initial_length, step_length=self.step_length,
                          query_offset=self.query_offset, batch=batch)

    @property
    def batch_size(self) -> int:
        return self.queries.shape[0]

    @property
    def num_steps(self) -> int:
        return self.queries.shape[1]

    @property
    def avg_reward(self) -> torch.Tensor:  # [B]
        return self.rewards.mean(dim=1)

    @property
    def adapter_reward(self) -> torch.Tensor:  # [B, P] what the adapter alone adds: policy vs base, same context
        return self.policy_logprob - self.base_same_logprob

    @property
    def query_reward(self) -> torch.Tensor:  # [B, P] what the policy's query adds over the counterfactual, base model
        return self.base_same_logprob - self.base_logprob

    @property
    def available(self) -> torch.Tensor:
        """[B, P, N] bool: the pairs left to choose from at each step (the pool less earlier choices)."""
        B, P, N = self.probabilities.shape
        device = self.choices.device
        in_pool = torch.zeros(B, N, dtype=torch.bool, device=device)
        in_pool[torch.arange(B, device=device)[:, None], self.batch.pool.to(device)] = True
        taken = F.one_hot(self.choices, N).bool().cumsum(dim=1) > 0  # [B, P, N]: chosen at or before step t
        earlier = torch.cat([torch.zeros_like(taken[:, :1]), taken[:, :-1]], dim=1)
        return in_pool[:, None, :] & ~earlier

    @property
    def value_positions(self) -> torch.Tensor:
        """[P*Tv] positions of the chosen values in `tokens` (the same for every row)."""
        P, Tv = self.num_steps, self.batch.value_tokens.shape[2]
        starts = self.initial_length + self.step_length * (torch.arange(P) + 1) - Tv
        return (starts[:, None] + torch.arange(Tv)[None, :]).reshape(-1)

    @property
    def query_positions(self) -> torch.Tensor:
        """[P*Tq] positions of the query tokens in `tokens` (the same for every row)."""
        P, Tq = self.queries.shape[1:]
        starts = self.initial_length + self.step_length * torch.arange(P) + self.query_offset
        return (starts[:, None] + torch.arange(Tq)[None, :]).reshape(-1)

    @property
    def query_tokens(self) -> torch.Tensor:  # [B, P*Tq], in the order of `query_positions`
        return self.queries.flatten(1)

    def candidate_scores(self, score: str = "reward") -> tuple[torch.Tensor, torch.Tensor]:
        """(chosen [B, P], candidates [B, P, N], NaN where a pair was not left) of one score of every pair left:
        `reward` (SPEC's, `rewards` and `candidate_rewards`) or `logprob` (its policy term alone,
        `policy_logprob` and `candidate_logprobs`). Rolled out with oracle=True."""
        chosen, cand = {"reward": (self.rewards, self.candidate_rewards),
                        "logprob": (self.policy_logprob, self.candidate_logprobs)}[score]
        assert cand is not None, "roll out with oracle=True"
        return chosen, cand

    def candidate_best_and_mean(self, score: str = "reward") -> tuple[torch.Tensor, torch.Tensor]:
        """([B, P], [B, P]): the best and the mean `score` (`candidate_scores`) of the pairs left at each step
        (the per-step oracle and a uniformly random choice)."""
        cand = self.candidate_scores(score)[1].float()
        return cand.nan_to_num(float("-inf")).amax(dim=2), cand.nanmean(dim=2)

    @property
    def available_counts(self) -> torch.Tensor:  # [B, P] pairs to choose from at each step: P, P-1, .., 1
        return torch.arange(self.num_steps, 0, -1, device=self.probabilities.device).expand(self.batch_size, -1)


_ROW_FIELDS = ("tokens", "queries", "counterfactuals", "choices", "choice_probs", "probabilities", "policy_logprob",
               "base_logprob", "rewards", "base_same_logprob")
