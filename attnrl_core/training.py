"""The policy update: SPEC.md §3.1.5-6 as settled by DESIGN.md §2.7-2.8.

The previous policy is the one that rolled the batch out (its logits at the query positions come
with the trajectory, so it costs no forward pass); per micro-batch of selected trajectories the loss
of `loss.reinforce_loss` on one teacher-forced pass over each trajectory's final sequence (logits
only at query positions), 8-bit Adam on the adapter, gradient norm clipped.

Research levers (TrainConfig; each default is SPEC's): `choice_in_loss` adds log p(chosen pair |
query) to each step's log-prob (`embeddings.choice_logprob`); `choice_target_weight` adds
`choice_target_steps` optimizer steps per episode of the selection objective over every rolled-out
trajectory (`choice_target_step`); `hindsight_weight` adds `hindsight_steps` optimizer steps per episode on the
policy's NLL of the best-scored pairs' keys as its queries (`hindsight_step`); `value_nll_weight` adds the policy's
NLL of the chosen values, predicted in the same pass; `kl_reference="base"` measures the KL against
the adapter-disabled base model; the loss's R is `loss.advantages` of the reward.

In a data-parallel run (`ranks`) each rank holds its rows of the global batch: the optimizer steps
are planned over the global selection, each rank adds the loss of the step's trajectories it holds,
and the gradients are summed over the ranks before clipping, so every rank takes the same step.

`update_policy` is the thin stateful shell around the pure loss, and `make_optimizer` builds the
8-bit Adam it steps. Imports attnrl_core.config, .decoding, .distributed, .embeddings, .loss, .model and
.trajectory.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Callable

import bitsandbytes as bnb
import torch
import torch.nn.functional as F
from torch import nn

from .config import TrainConfig
from .distributed import Ranks
from .embeddings import choice_logprob, selection_probabilities
from .decoding import forward_hidden
from .loss import LossTerms, choice_target_kl, chunked_reinforce_loss, value_nll
from .model import adapter_parameters, base_model
from .trajectory import Trajectory


# -- 5. the loss: the maths is in `loss`; here what needs the model ----------------------------------
def trajectory_choice_logprob(model: nn.Module, trajectory: Trajectory, rows: torch.Tensor,
                              similarity_temperature: float, similarity_layer: int,
                              similarity_readout: str = "mean") -> torch.Tensor:
    """[n]: sum over steps of log p(chosen pair | query) of trajectories `rows`, with gradient through the
    adapter (`choice_in_loss`). Rollout tensors are cloned into ordinary ones for autograd."""
    device = trajectory.queries.device
    keys = trajectory.batch.key_embeddings.to(device)[rows.to(device)].clone()
    return choice_logprob(model, trajectory.queries[rows].clone(), keys, trajectory.available[rows].clone(),
                          trajectory.choices[rows].clone(), similarity_temperature, similarity_layer,
                          similarity_readout).sum(dim=1)


def query_logits(model: nn.Module, tokens: torch.Tensor, query_positions: torch.Tensor,
                 end: int | None = None) -> torch.Tensor:
    """Teacher-forced logits [n, M, V] predicting the tokens at `query_positions` [M] of `tokens` [n, L]
    (any positions work: the value NLL passes the value positions too).

    Reads `tokens` only up to the last position asked for (`end`, default `read_length`, which reads it from the
    positions: pass it when they are on a GPU, where that read waits for the device): the causal model's logits
    there do not depend on anything after it (its share of the work is in BENCHMARKS.md).
    """
    end = read_length(query_positions) if end is None else end
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


def micro_batch_terms(model: nn.Module, trajectory: Trajectory, rows: torch.Tensor, tokens: torch.Tensor,
                      positions: torch.Tensor, end: int, M: int, rewards: torch.Tensor, options: dict | TrainConfig,
                      params: list[nn.Parameter] | None, previous: list[torch.Tensor] | None) -> LossTerms:
    """The loss terms of one micro-batch (trajectories `rows`, their `tokens` [n, L] and loss factor `rewards`
    [n]), ready for `backward`: the KL's reference at the M query positions (the first M of `positions`, which
    go on to the value positions when the value NLL is on), one teacher-forced pass reading `end` tokens, and
    `loss.reinforce_loss` (+ the value NLL). `options`: `update_policy`'s keywords for the loss, or a config.
    Reads no value back from the device (`memtrace` runs it on `meta`)."""
    o = update_options(options) if isinstance(options, TrainConfig) else options
    params = adapter_parameters(model) if params is None else params
    reference = _reference(model, trajectory, rows, tokens, positions[:M], end, params, previous, o["kl_reference"])
    model.train()
    hidden = forward_hidden(model, tokens[:, :end], None, positions - 1)  # [n, M (+ value positions), H]
    head = model.get_output_embeddings()
    choice = (trajectory_choice_logprob(model, trajectory, rows, o["similarity_temperature"], o["similarity_layer"],
                                        o.get("similarity_readout", "mean"))
              if o["choice_in_loss"] else None)
    terms = chunked_reinforce_loss(hidden[:, :M], head, reference, tokens[:, positions[:M]], rewards, o["beta"],
                                   o["query_temperature"], choice)
    if o["value_nll_weight"]:
        terms.value_nll = value_nll(head(hidden[:, M:]), tokens[:, positions[M:]]).mean()
        terms.loss = terms.loss + o["value_nll_weight"] * terms.value_nll
    return terms


@dataclass
class UpdateResult:
    loss: float
    policy_loss: float
    kl: float
    grad_norm: float
    optimizer_steps: int
    skipped_steps: int  # steps whose loss or gradient was not finite (no update made)
    micro_batch_kl: list[float]  # KL term of each micro-batch in order (the first is ~0: previous = current); this rank's
    value_nll: float | None = None  # mean value NLL of the selected trajectories (when value_nll_weight > 0)


def optimizer_step_sizes(n: int, max_size: int) -> list[int]:
    """Split n selected trajectories into as few optimizer steps of at most `max_size` as possible, of
    near-equal size (17 with 16 per step -> [9, 8], not [16, 1]: a lone leftover would otherwise get
    a whole step, or a micro-batch's weight, of its own)."""
    steps = math.ceil(n / max_size)
    size, extra = divmod(n, steps)
    return [size + 1] * extra + [size] * (steps - extra)


def update_policy(model: nn.Module, optimizer: torch.optim.Optimizer, trajectory: Trajectory,
                  selected: torch.Tensor, *, training_batch_size: int, gradient_accumulation_steps: int = 1,
                  beta: float = 0.1, max_grad_norm: float = 1.0, query_temperature: float = 1.0,
                  rewards: torch.Tensor | None = None, kl_reference: str = "previous", value_nll_weight: float = 0.0,
                  choice_in_loss: bool = False, similarity_temperature: float = 1.0,
                  similarity_layer: int = -1, similarity_readout: str = "mean",
                  ranks: Ranks | None = None) -> UpdateResult | None:
    """One update phase over the selected trajectories; None when nothing was selected.

    An optimizer step covers up to `training_batch_size * gradient_accumulation_steps` trajectories
    (`optimizer_step_sizes`), read in micro-batches of up to `training_batch_size`; each micro-batch's
    loss is weighted by its share of the step, so every trajectory of a step weighs the same whatever
    the micro-batch sizes, and halving the micro-batch while doubling accumulation (the out-of-memory
    fallback) gives the same gradient. `rewards` [B] is the loss's R (`advantages`; default the raw
    reward); the other keywords are the research levers of the module docstring.

    With `ranks`, `trajectory` holds this rank's rows of the global batch and `selected` and `rewards`
    are the global batch's [B_global]; the result's figures are the global batch's (but the micro-batch
    KLs, which are this rank's).
    """
    ranks = ranks or Ranks()
    index = selected.nonzero().squeeze(1).cpu()  # rows of the global batch
    if index.numel() == 0:
        return None
    mine = ranks.rows(selected.shape[0])
    assert mine.size == trajectory.batch_size, (mine, trajectory.batch_size)
    params = adapter_parameters(model)
    # Rollout tensors are inference tensors; clone them into ordinary ones for autograd.
    tokens_all = trajectory.tokens.clone()
    rewards_all = (trajectory.avg_reward if rewards is None else rewards).clone().float().to(tokens_all.device)
    assert rewards_all.shape == (mine.total,), rewards_all.shape
    rewards_all = rewards_all[mine.start:mine.stop]
    positions = trajectory.query_positions
    M = positions.numel()
    if value_nll_weight:  # the same teacher-forced pass also predicts the values
        positions = torch.cat([positions, trajectory.value_positions])
    end = read_length(positions)  # read on the host, before the positions move to the device
    positions = positions.to(tokens_all.device)
    options = dict(beta=beta, query_temperature=query_temperature, kl_reference=kl_reference,
                   value_nll_weight=value_nll_weight, choice_in_loss=choice_in_loss,
                   similarity_temperature=similarity_temperature, similarity_layer=similarity_layer,
                   similarity_readout=similarity_readout)
    previous = None if trajectory.query_logits is not None else [p.detach().clone() for p in params]
    sums = {"loss": 0.0, "policy_loss": 0.0, "kl": 0.0, "value_nll": 0.0}  # weighted by trajectories
    micro_kl, norms, skipped = [], [], 0
    step_sizes = optimizer_step_sizes(index.numel(), training_batch_size * gradient_accumulation_steps)
    optimizer.zero_grad(set_to_none=True)
    for step_rows in index.split(step_sizes):
        finite = True
        held = step_rows[(step_rows >= mine.start) & (step_rows < mine.stop)] - mine.start  # this rank's rows
        for mb in held.split(training_batch_size) if held.numel() else ():
            mb = mb.to(tokens_all.device)
            terms = micro_batch_terms(model, trajectory, mb, tokens_all[mb], positions, end, M, rewards_all[mb],
                                      options, params, previous)
            (terms.loss * (len(mb) / len(step_rows))).backward()  # the step's mean over its trajectories
            for k in sums:
                term = getattr(terms, k)
                sums[k] += 0.0 if term is None else term.item() * len(mb)
            micro_kl.append(terms.kl.item())
            finite = finite and math.isfinite(terms.loss.item())
        ranks.sum_gradients(params)
        finite = not ranks.any(not finite)
        norm = torch.nn.utils.clip_grad_norm_(params, max_grad_norm).item()
        if finite and math.isfinite(norm):
            optimizer.step()
            norms.append(norm)
        else:
            skipped += 1
        optimizer.zero_grad(set_to_none=True)
    model.eval()
    n = index.numel()
    sums = dict(zip(sums, ranks.sum(list(sums.values()))))
    return UpdateResult(sums["loss"] / n, sums["policy_loss"] / n, sums["kl"] / n,
                        sum(norms) / len(norms) if norms else float("nan"), len(norms), skipped, micro_kl,
                        sums["value_nll"] / n if value_nll_weight else None)


def _fixed_target_steps(optimizer: torch.optim.Optimizer, params: list[nn.Parameter], ranks: Ranks, steps: int,
                        max_grad_norm: float, total: int,
                        accumulate: Callable[[], float]) -> tuple[float, float, bool, float]:
    """`steps` optimizer steps on a target the rollout fixed (the selection objective's, hindsight's): each zeroes
    the gradients, lets `accumulate` run the batch's backward passes and return its loss summed over this rank's
    rows, sums gradients and loss over the ranks, clips and steps; a non-finite loss or gradient ends the steps
    untaken. Returns (first loss, first gradient norm, skipped, last loss), losses as means over the `total` rows."""
    assert steps >= 1, steps
    first: tuple[float, float] | None = None
    for _ in range(steps):
        optimizer.zero_grad(set_to_none=True)
        loss_sum = accumulate()
        # only the parameters the objective reaches have a gradient (the same set on every rank):
        # summing the others as zeros would let Adam move them on old momentum in a multi-process run only
        reached = [p for p in params if p.grad is not None]
        ranks.sum_gradients(reached)
        loss_sum = ranks.sum([loss_sum])[0]
        norm = torch.nn.utils.clip_grad_norm_(reached, max_grad_norm).item()
        first = first or (loss_sum / total, norm)
        skipped = not (math.isfinite(loss_sum) and math.isfinite(norm))
        if skipped:
            break
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return first[0], first[1], skipped, loss_sum / total


@dataclass
class ChoiceStepResult:
    kl: float  # mean over the batch's trajectories of sum_steps KL(target || p_select), before the first step
    grad_norm: float  # pre-clip, of the first step
    skipped: bool  # a loss or gradient was not finite: that step and the ones after it were not taken
    kl_last: float  # the same KL measured in the last step's pass (before that step): how far K steps fit


def choice_target_step(model: nn.Module, optimizer: torch.optim.Optimizer, trajectory: Trajectory, *, weight: float,
                       target_temperature: float, training_batch_size: int, max_grad_norm: float = 1.0,
                       similarity_temperature: float = 1.0, similarity_layer: int = -1,
                       similarity_readout: str = "mean", steps: int = 1,
                       reach: str = "q_proj", score: str = "reward", ranks: Ranks | None = None) -> ChoiceStepResult:
    """The selection objective's optimizer steps (`choice_target_weight`, `choice_target_steps`): `steps` times,
    weight x the mean over *every* trajectory of the batch of `loss.choice_target_kl` (the target does not depend
    on a trajectory's own reward, so the filter does not apply), read in micro-batches of `training_batch_size`
    (one optimizer step each time: the micro-batch size alone sets its memory). The target is fixed by the
    rollout, so repeated steps fit the same supervised target (no importance ratio is needed, unlike PPO's
    epochs). p_select is computed as the rollout drew from it (same layer, temperature and pairs left, adapter
    dropout off as in the rollout); its gradient reaches the adapter on the similarity layer's q_proj only
    (`reach="q_proj"`, `choice_target_reach`'s default) or also every adapter below it (`reach="below"`), and no
    other parameter is touched. The target ranks the pairs by `score` (`Trajectory.candidate_scores`: SPEC's
    reward, or the policy's value log-prob alone). With `ranks`, `trajectory` holds this rank's rows
    and the gradients are summed over the ranks, each rank weighted by its share of the global batch. Each
    step is clipped and normalised by the 8-bit Adam it shares with the REINFORCE steps, so λ mostly sets how
    the two mix in Adam's moments."""
    ranks = ranks or Ranks()
    params = adapter_parameters(model)
    device = trajectory.queries.device
    B, total = trajectory.batch_size, trajectory.batch_size * ranks.world
    # rollout tensors are inference tensors: clone them into ordinary ones for autograd
    queries, available = trajectory.queries.clone(), trajectory.available.clone()
    keys, rewards = trajectory.batch.key_embeddings.to(device).clone(), trajectory.candidate_scores(score)[1].clone()
    model.eval()  # p_select as the rollout drew from it: no dropout, and no random draw

    def accumulate() -> float:
        kl_sum = 0.0
        for mb in torch.arange(B, device=device).split(training_batch_size):
            probs = selection_probabilities(model, queries[mb], keys[mb], available[mb], similarity_temperature,
                                            similarity_layer, reach, similarity_readout)  # [n, P, N]
            kl = choice_target_kl(probs, rewards[mb], target_temperature)  # [n]
            (weight * kl.sum() / total).backward()
            kl_sum += kl.sum().item()
        return kl_sum

    return ChoiceStepResult(*_fixed_target_steps(optimizer, params, ranks, steps, max_grad_norm, total, accumulate))


@dataclass
class HindsightResult:
    nll: float  # mean over the batch's trajectories of the sum over steps of the best key's mean NLL, before any step
    grad_norm: float  # the first step's, pre-clip
    skipped: bool  # a loss or gradient was not finite: that step and the ones after it were not taken
    nll_last: float  # the same NLL measured in the last step's pass (before that step): how far K steps fit


def hindsight_targets(trajectory: Trajectory, score: str = "reward") -> torch.Tensor:
    """[B, P, Tk]: at every step the key tokens of the pair left that scores best (`Trajectory.candidate_scores`:
    what the per-step oracle's pass measured for each pair after the policy's own query)."""
    cand = trajectory.candidate_scores(score)[1]  # [B, P, N], NaN where not left
    best = cand.nan_to_num(float("-inf")).argmax(dim=2)  # [B, P]
    keys = trajectory.batch.key_tokens.to(best.device)  # [B, N, Tk]
    return keys.gather(1, best[..., None].expand(-1, -1, keys.shape[2]))


def hindsight_step(model: nn.Module, optimizer: torch.optim.Optimizer, trajectory: Trajectory, *, weight: float,
                   training_batch_size: int, max_grad_norm: float = 1.0, score: str = "reward", steps: int = 1,
                   ranks: Ranks | None = None) -> HindsightResult:
    """Hindsight on the query (`hindsight_weight`, `hindsight_steps`, LeReT-style): `steps` optimizer steps, each on
    weight x the mean over *every* trajectory of the batch of the sum over steps of the policy's mean NLL of the
    best-scored pair's key (`hindsight_targets`, its first `tokens_per_query` tokens) written after that step's
    ` Query:`, in the step's context as the rollout built it. The oracle's pass already knows which pair would have
    earned most after the policy's query; this teaches the policy to write that pair's key, which a similarity that
    retrieves (EXPERIMENTS.md §7's sweep) then picks. Steps are read in micro-batches of `training_batch_size` rows,
    one forward pass per step (every row of a step has the same context length); the gradient reaches every
    adapter. The targets are fixed by the rollout, so repeated steps fit the same supervised target; the result
    holds the first step's NLL (before any step) and gradient norm, and the last step's NLL (before that step).
    With `ranks`, `trajectory` holds this rank's rows and the gradients are summed over the ranks."""
    ranks = ranks or Ranks()
    params = adapter_parameters(model)
    device = trajectory.tokens.device
    B, P, Tq = trajectory.queries.shape
    total = B * ranks.world
    tokens = trajectory.tokens.clone()  # rollout tensors are inference tensors
    targets = hindsight_targets(trajectory, score).to(device)[..., :Tq].clone()  # [B, P, <=Tq]
    T = targets.shape[2]
    model.train()

    def accumulate() -> float:
        nll_sum = 0.0
        for t in range(P):
            start = trajectory.initial_length + t * trajectory.step_length + trajectory.query_offset  # after Query:
            for mb in torch.arange(B, device=device).split(training_batch_size):
                ids = torch.cat([tokens[mb, :start], targets[mb, t]], dim=1)  # [n, start + T]
                logits = model(input_ids=ids, use_cache=False, logits_to_keep=T + 1).logits[:, :-1].float()
                nll = F.cross_entropy(logits.transpose(1, 2), targets[mb, t], reduction="none").mean(dim=1)  # [n]
                (weight * nll.sum() / total).backward()
                nll_sum += nll.detach().sum().item()
        return nll_sum

    return HindsightResult(*_fixed_target_steps(optimizer, params, ranks, steps, max_grad_norm, total, accumulate))


def _reference(model: nn.Module, trajectory: Trajectory, rows: torch.Tensor, tokens: torch.Tensor,
               positions: torch.Tensor, end: int, params: list[nn.Parameter], previous: list[torch.Tensor] | None,
               kl_reference: str) -> Callable[[int, int], torch.Tensor]:
    """The KL's reference at the query positions, as `loss.chunked_reinforce_loss` reads it: a - b -> its logits
    [n, b - a, V] at query positions a..b-1 (computed when asked, so only a chunk of them exists at a time). The
    previous policy (SPEC's: the rollout's kept logits, one chunk of this micro-batch's rows copied at a time) or
    the base model (its hidden states at the positions kept, [n, M, H], and the head applied per chunk)."""
    if kl_reference == "previous":
        if trajectory.query_logits is not None:
            kept, index = trajectory.query_logits, rows.to(trajectory.query_logits.device)
            return lambda a, b: kept[:, a:b].index_select(0, index)
        logits = previous_policy_logits(model, trajectory, rows, tokens, positions, params, previous)
        return lambda a, b: logits[:, a:b]
    if kl_reference == "base":
        with torch.no_grad(), base_model(model):
            model.eval()
            hidden = forward_hidden(model, tokens[:, :end], None, positions - 1)
        head = model.get_output_embeddings()

        def base_logits(a: int, b: int) -> torch.Tensor:
            with torch.no_grad(), base_model(model):  # the head too, should the adapter wrap it
                return head(hidden[:, a:b])

        return base_logits
    raise ValueError(f"kl_reference {kl_reference!r} is unknown: use previous or base")


def update_options(cfg: TrainConfig) -> dict:
    """`update_policy`'s keywords from a config: SPEC's loss and the research levers."""
    return dict(beta=cfg.kl_beta, max_grad_norm=cfg.max_grad_norm, query_temperature=cfg.query_temperature,
                kl_reference=cfg.kl_reference, value_nll_weight=cfg.value_nll_weight,
                choice_in_loss=bool(cfg.choice_in_loss), similarity_temperature=cfg.temperature,
                similarity_layer=cfg.similarity_layer, similarity_readout=cfg.similarity_readout)


def choice_target_options(cfg: TrainConfig) -> dict | None:
    """`choice_target_step`'s keywords from a config; None when the selection objective is off (SPEC's)."""
    if not cfg.choice_target_weight:
        return None
    return dict(weight=cfg.choice_target_weight, target_temperature=cfg.choice_target_temperature,
                max_grad_norm=cfg.max_grad_norm, similarity_temperature=cfg.temperature,
                similarity_layer=cfg.similarity_layer, similarity_readout=cfg.similarity_readout,
                steps=cfg.choice_target_steps, reach=cfg.choice_target_reach,
                score=cfg.choice_target_score)


def hindsight_options(cfg: TrainConfig) -> dict | None:
    """`hindsight_step`'s keywords from a config; None when hindsight on the query is off (SPEC's)."""
    if not cfg.hindsight_weight:
        return None
    return dict(weight=cfg.hindsight_weight, max_grad_norm=cfg.max_grad_norm, score=cfg.choice_target_score,
                steps=cfg.hindsight_steps)


def make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """DESIGN.md §2.8: bitsandbytes' 8-bit Adam over the adapter's parameters only."""
    return bnb.optim.Adam8bit(adapter_parameters(model), lr=cfg.learning_rate)
