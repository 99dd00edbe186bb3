"""The update's loss: SPEC.md §3.1.5 as settled by DESIGN.md §2.7, and the research levers' terms.

Per selected trajectory, with R its reward (less a baseline, `advantages`):
    loss = -R * sum_{steps, query tokens} log pi(token | state)  [+ log p(chosen pair | query), choice_in_loss]
           + beta * sum_{steps, query tokens} KL(reference(.|state) || pi(.|state))
           [+ value_nll_weight * mean NLL of the chosen values]
averaged over trajectories; and, with choice_target_weight, the selection objective `choice_target_kl`
over every rolled-out trajectory. Pure functions of tensors; imports attnrl_core.decoding (log-probs of tokens).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from .decoding import LOGITS_CHUNK_BYTES, chunk_length, token_logprobs


def advantages(rewards: torch.Tensor, baseline: str, running_mean: float = 0.0, per_article: int = 1) -> torch.Tensor:
    """The factor R of the REINFORCE term [B]: the raw reward (SPEC's "none"), minus the running mean of the
    rewards before this batch ("running_mean"; RunningStats' mean is 0 while it is empty), or minus the mean
    of the other `per_article` - 1 trajectories of the same article ("leave_one_out"; rows of an article
    are consecutive)."""
    if baseline == "none":
        return rewards
    if baseline == "running_mean":
        return rewards - running_mean
    if baseline == "leave_one_out":
        K = per_article
        assert K >= 2 and rewards.shape[0] % K == 0, (rewards.shape, K)
        group = rewards.view(-1, K)
        return (group - (group.sum(dim=1, keepdim=True) - group) / (K - 1)).reshape(-1)
    raise ValueError(f"reward_baseline {baseline!r} is unknown: use none, running_mean or leave_one_out")


# -- the loss --------------------------------------------------------------------------------------
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
    value_nll: torch.Tensor | None = None


def _token_terms(current_logits: torch.Tensor, previous_logits: torch.Tensor, tokens: torch.Tensor,
                 query_temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """([n] sum over positions of log pi(token), [n] sum over positions of KL(previous || pi)) from logits [n, m, V]."""
    current, previous = current_logits.float(), previous_logits.float()
    if query_temperature != 1.0:  # at 1 the division would only copy two [n, m, V] tensors
        current, previous = current / query_temperature, previous / query_temperature
    current_logp = F.log_softmax(current, dim=-1)  # one [n, m, V] log-softmax serves both terms
    logp = current_logp.gather(-1, tokens[..., None]).squeeze(-1).sum(dim=1)
    return logp, _kl(current_logp, F.log_softmax(previous, dim=-1)).sum(dim=1)


def _combine(logp: torch.Tensor, kl: torch.Tensor, rewards: torch.Tensor, beta: float,
             choice_logprob: torch.Tensor | None) -> LossTerms:
    assert choice_logprob is None or choice_logprob.shape == rewards.shape, choice_logprob.shape
    if choice_logprob is not None:
        logp = logp + choice_logprob
    policy_loss = -(rewards * logp).mean()
    kl = kl.mean()
    return LossTerms(policy_loss + beta * kl, policy_loss, kl)


def reinforce_loss(current_logits: torch.Tensor, previous_logits: torch.Tensor, tokens: torch.Tensor,
                   rewards: torch.Tensor, beta: float, query_temperature: float = 1.0,
                   choice_logprob: torch.Tensor | None = None) -> LossTerms:
    """The update's loss on n trajectories: logits [n, M, V] at the M query positions, tokens [n, M], rewards [n].

    The policy is the distribution queries were sampled from, softmax(logits / query_temperature);
    `previous_logits` are the KL's reference. `choice_logprob` [n], when given, is each trajectory's
    sum over steps of log p(chosen pair | query), added to its action log-prob (`choice_in_loss`).
    """
    n, M, _ = current_logits.shape
    assert previous_logits.shape == current_logits.shape and tokens.shape == (n, M) and rewards.shape == (n,)
    return _combine(*_token_terms(current_logits, previous_logits, tokens, query_temperature), rewards, beta,
                    choice_logprob)


def chunked_reinforce_loss(hidden: torch.Tensor, head: Callable[[torch.Tensor], torch.Tensor],
                           previous: Callable[[int, int], torch.Tensor], tokens: torch.Tensor, rewards: torch.Tensor,
                           beta: float, query_temperature: float = 1.0, choice_logprob: torch.Tensor | None = None,
                           max_bytes: int = LOGITS_CHUNK_BYTES) -> LossTerms:
    """`reinforce_loss` from the LM head's input, hidden [n, M, H], with the head (`head`: [n, m, H] -> [n, m, V]
    logits) and the reference (`previous(a, b)`: its logits [n, b - a, V] at positions a..b-1) applied in chunks of
    positions whose logits take at most `max_bytes`: each chunk's logits, log-softmaxes and KL terms are freed
    once its sums are taken and recomputed in the backward pass (activation checkpointing), so none of the
    [n, M, V] float32 tensors the loss reads exists whole. Batches that fit in one chunk take `reinforce_loss`'s
    own single pass (no recomputation); the same numbers either way, to float32 summation order."""
    n, M, _ = hidden.shape
    assert tokens.shape == (n, M) and rewards.shape == (n,), (hidden.shape, tokens.shape, rewards.shape)
    step = chunk_length(n * head.out_features * 4, M, max_bytes)
    if step >= M:
        return reinforce_loss(head(hidden), previous(0, M), tokens, rewards, beta, query_temperature, choice_logprob)

    def chunk(h: torch.Tensor, a: int) -> tuple[torch.Tensor, torch.Tensor]:
        b = a + h.shape[1]
        return _token_terms(head(h), previous(a, b), tokens[:, a:b], query_temperature)

    parts = [checkpoint(chunk, hidden[:, a:a + step], a, use_reentrant=False) for a in range(0, M, step)]
    return _combine(sum(p[0] for p in parts), sum(p[1] for p in parts), rewards, beta, choice_logprob)


def choice_target_kl(select_probs: torch.Tensor, candidate_rewards: torch.Tensor, temperature: float) -> torch.Tensor:
    """The selection objective [n]: sum over steps of KL(softmax(r / temperature) || p_select), where r [n, P, N]
    is the reward each pair left would have earned (NaN for pairs not available) and p_select [n, P, N] the
    distribution the step's pair was drawn from. The target does not depend on which pair was drawn: an
    exact expected gradient over the choice (REPLUG's LM-supervised retrieval), not one sampled draw. A step
    with one pair left contributes 0."""
    assert select_probs.shape == candidate_rewards.shape and select_probs.ndim == 3, (select_probs.shape,
                                                                                        candidate_rewards.shape)
    available = ~torch.isnan(candidate_rewards)
    scores = (candidate_rewards.float() / temperature).masked_fill(~available, float("-inf"))
    target_logp = F.log_softmax(scores, dim=-1)
    target = target_logp.exp()  # exactly 0 where not available
    log_p = select_probs.float().clamp_min(1e-30).log()
    # 0 * (-inf - log p) would be nan: only the available pairs enter the sum
    terms = torch.where(available, target * (target_logp - log_p), torch.zeros_like(log_p))
    return terms.sum(dim=(1, 2))


def value_nll(logits: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """Mean negative log-likelihood [n] of value tokens [n, P*Tv] under logits [n, P*Tv, V] predicting them."""
    return -token_logprobs(logits, values).mean(dim=1)


