"""Batched trajectory generation: SPEC.md §3.1.2 as settled by DESIGN.md §2.3, §2.5 and §4.

For a batch of B articles, in lock-step (every row has the same length at every step, no padding):

  0. The context starts as [BOS] ` Query:` key_0 ` Response:` value_0 (pair 0 is the in-context example).
  For each of the P steps:
  1. The policy (adapter on) samples exactly `tokens_per_query` tokens after ` Query:`; in the same
     forward passes the base model (adapter off) samples the counterfactual query from the same context
     (K of them with `counterfactual_samples` K: K copies of the base model's rows, each its own draw).
  2. The query's last-layer q_proj embedding scores the keys still in the pool (`compute_similarity`).
  3. A pair is sampled from that distribution and removed from the pool.
  4. ` Response:` value is scored after each query, by its own model, in one forward pass: the policy's
     log-probs are the reward's first term, the base model's the second, and the policy's pass
     extends its context.
  5. The base model's rows roll back and read the policy's query and value instead (scoring the value
     there too: the reward's split into what the adapter and what the query contributed).
  6. r_t = mean log p_policy(value) - mean log p_base(value | counterfactual query) (averaged over the K).

DESIGN.md §4's two KV caches are the two halves of one: policy and base model share every forward
pass, 2B rows, the adapter applied to the first B only (`model.row_adapter`: its delta times a row mask), so
each decode step reads the weights once for both. The cache is allocated once for the final length and written
in place; nothing is re-encoded. The policy's sampling logits are kept: they are the previous
policy of the update phase.
Python loops run only over steps and generated tokens; the result is a `trajectory.Trajectory`.
Imports attnrl_core.config, .data, .decoding, .distributed, .embeddings, .model and .trajectory.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import DynamicCache

from .config import TrainConfig
from .data import KeyValueBatch, Separators
from .distributed import Rows, global_draw
from .decoding import BufferedCache, DecodeStep, forward_logits, sample_tokens, score_continuation, score_tail
from .embeddings import compute_similarity, query_embeddings
from .model import HeadGeometry, base_model, policy_and_base
from .trajectory import Trajectory


def calculate_reward(policy_logprobs: torch.Tensor, base_logprobs: torch.Tensor) -> torch.Tensor:
    """DESIGN.md §2.5: mean over value tokens of the policy's log-probs minus the base model's. [B, T] -> [B];
    base_logprobs [K*B, T] (K counterfactual queries per row, block k = rows k*B..(k+1)*B-1): minus the mean over
    the K of the base model's mean log-prob."""
    B = policy_logprobs.shape[0]
    assert base_logprobs.shape[1:] == policy_logprobs.shape[1:] and base_logprobs.shape[0] % B == 0, \
        (policy_logprobs.shape, base_logprobs.shape)
    base = base_logprobs.mean(dim=-1)
    return policy_logprobs.mean(dim=-1) - (base if base.shape[0] == B else base.view(-1, B).mean(dim=0))


def initial_context(batch: KeyValueBatch, sep: Separators, device: torch.device) -> torch.Tensor:
    """[B, L0]: [BOS] ` Query:` key_0 ` Response:` value_0, by concatenating token ids (never re-tokenising)."""
    B = batch.batch_size
    parts = [sep.bos, sep.query, batch.key_tokens[:, 0], sep.response, batch.value_tokens[:, 0]]
    return torch.cat([p.expand(B, -1) if p.ndim == 1 else p for p in parts], dim=1).to(device)


def choose_pairs(probs: torch.Tensor, available: torch.Tensor, selector: str, greedy: bool,
                 generator: torch.Generator | None = None, rows: Rows | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(choice [B], the distribution it was drawn from [B, N]) for a selection rule.

    attention: the query's similarity distribution (the method); random: uniform over the pairs left
    (a baseline); natural: the earliest pair left, i.e. article order (a reference).
    The draw is `torch.multinomial`'s own for one sample, argmax(p / q) with q ~ Exp(1) per entry (the
    same numbers from the same generator state), with q drawn for the global batch of `rows`.
    """
    if selector == "random":
        probs = available.float() / available.sum(dim=1, keepdim=True)
    elif selector == "natural":
        N = available.shape[1]
        first = (available * torch.arange(N, 0, -1, device=available.device)).argmax(dim=1)
        probs = F.one_hot(first, N).float()
    elif selector != "attention":
        raise ValueError(f"selector {selector!r} is unknown: use attention, random or natural")
    if greedy:
        return probs.argmax(dim=1), probs
    if not bool(((probs >= 0) & torch.isfinite(probs)).all()):  # the check torch.multinomial made
        raise ValueError("the selection distribution holds a negative or non-finite probability: lower the learning "
                         "rate or use dtype float32")
    q = global_draw(probs.shape[0], rows, lambda m: torch.empty(m, *probs.shape[1:], dtype=probs.dtype,
                                                                 device=probs.device).exponential_(generator=generator))
    # natural's one-hot distribution picks its pair from these draws too: every selector consumes the same
    # numbers, so the methods of an evaluation stay on common random numbers at every later step
    return (probs / q).argmax(dim=1), probs


def score_candidates(model: nn.Module, cache: BufferedCache, last_query_token: torch.Tensor, r_sep: torch.Tensor,
                     values: torch.Tensor, available: torch.Tensor, both: torch.Tensor | None, left: int
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """The oracle's view of a step: the reward [B, N] every pair still in the pool would earn, and the policy's
    mean log-prob [B, N] of its value within that reward (NaN for the pairs not left), each value scored after
    the policy's query and, by the base model, after its counterfactual(s).

    The (1 + C) B rows of `cache` (policy, then C blocks of the base model's; each at context + ` Query:` + its
    query but the last token, `last_query_token` [(1 + C) B, 1]) are copied K = pairs left times and read
    ` Response:` value_k in
    one pass: the context is never re-encoded. `cache` itself is left as it was. `left`: the pairs left in every
    row's pool (the same at every row: one pair leaves each pool per step), known on the host, so that nothing
    here waits for the device.
    """
    B, N = available.shape
    K = left
    blocks = last_query_token.shape[0] // B  # 1 + counterfactual samples
    rows = torch.arange(B, device=available.device)
    # [B, K] pair indices, ascending: a stable sort puts the available ones first, in order (no `nonzero`)
    candidates = torch.argsort((~available).to(torch.uint8), dim=1, stable=True)[:, :K]
    target = values[rows[:, None], candidates].reshape(B * K, -1).repeat(blocks, 1)  # [(1+C)BK, Tv]: policy, base
    prefix = torch.cat([last_query_token, r_sep], dim=1).repeat_interleave(K, dim=0)  # [(1+C)BK, 1 + Sr]
    names = None if both is None else both.repeat_interleave(K)  # the adapter on the policy's copies only
    scored = score_continuation(model, cache.repeated(K, prefix.shape[1] + target.shape[1]), prefix, target, names)
    reward = calculate_reward(scored[:B * K], scored[B * K:]).view(B, K)
    out = torch.full((2, B, N), float("nan"), device=reward.device)
    out[0, rows[:, None], candidates] = reward
    out[1, rows[:, None], candidates] = scored[:B * K].mean(dim=1).view(B, K)
    return out[0], out[1]


@torch.inference_mode()
def rollout(model: nn.Module, batch: KeyValueBatch, sep: Separators, geo: HeadGeometry, *,
            tokens_per_query: int, similarity_temperature: float = 1.0, query_temperature: float = 1.0,
            greedy: bool = False, selector: str = "attention", generator: torch.Generator | None = None,
            oracle: bool = False, similarity_layer: int = -1, similarity_readout: str = "mean",
            global_rows: Rows | None = None,
            keep_query_logits: bool = True, query_logits_out: torch.Tensor | None = None,
            decode_step: DecodeStep | None = None, counterfactual_samples: int = 1) -> Trajectory:
    """Generate B trajectories in lock-step; see the module docstring for the steps. `selector` swaps
    the attention selection for a baseline (`choose_pairs`); everything else stays the same. Every
    random draw comes from `generator` when given (on the batch's device), else the global generator.
    `oracle` also scores every pair left at every step (`score_candidates`, for evaluation);
    `similarity_layer` is the layer whose q_proj embeds the query and `similarity_readout` how its tokens are read
    (the keys' must match); `global_rows`,
    which rows of a global batch this batch is (a rank's share or a chunk; `distributed.global_draw`): the
    draws are the global batch's, so a trajectory does not depend on how the batch was split.
    `keep_query_logits` False drops the policy's sampling logits ([B, P*Tq, V], the update's previous
    policy) from a rollout that will not train (evaluation's methods); `query_logits_out` [B, P*Tq, V], when
    given, is where they are written (a chunk's rows of the whole batch's buffer, `resilience`). `decode_step`
    (`--compile`): the queries' single-token steps run as its fixed-shape, compiled step, on its cache buffers.
    `counterfactual_samples` C: the base model writes C counterfactual queries per row (C blocks of base rows in
    the same passes) and the reward subtracts the mean of its value log-probs after them; the trajectory keeps
    the first block's queries as `counterfactuals`. C = 1 is SPEC's reward, draw for draw."""
    assert counterfactual_samples >= 1, counterfactual_samples
    C = counterfactual_samples
    assert global_rows is None or global_rows.size == batch.batch_size, (global_rows, batch.batch_size)
    assert batch.key_embeddings is not None, "run the batch through data.add_embeddings first"
    was_training = model.training
    model.eval()
    device = batch.key_embeddings.device
    B, N, _ = batch.key_tokens.shape
    P, Tq = batch.pool.shape[1], tokens_per_query
    rows = torch.arange(B, device=device)
    values = batch.value_tokens.to(device)  # [B, N, Tv]
    q_sep, r_sep = sep.query.to(device).expand(B, -1), sep.response.to(device).expand(B, -1)
    available = torch.zeros(B, N, dtype=torch.bool, device=device)
    available[rows[:, None], batch.pool.to(device)] = True  # pair 0 is never in the pool

    context = initial_context(batch, sep, device)  # [B, L0]
    L0 = context.shape[1]
    step_length = q_sep.shape[1] + Tq + r_sep.shape[1] + values.shape[2]
    both = policy_and_base(model, B, device, C)  # rows [0, B): the policy; rows [B, (1+C)B): the base model
    cache = BufferedCache(model.config, L0 + P * step_length) if decode_step is None else \
        decode_step.cache(model.config, L0 + P * step_length)
    forward_logits(model, context.repeat(1 + C, 1), cache, 1, both)

    chunks = [context]
    # [B, P*Tq, V] float32 (what the update reads): every step's sampling logits written in place
    query_logits = None
    if keep_query_logits:
        query_logits = query_logits_out if query_logits_out is not None else \
            torch.empty(B, P * Tq, model.get_output_embeddings().out_features, device=device)
        assert query_logits.shape[:2] == (B, P * Tq), (query_logits.shape, B, P * Tq)
    fields = {f: [] for f in ("queries", "counterfactuals", "choices", "choice_probs", "probabilities",
                              "policy_logprob", "base_logprob", "rewards", "base_same_logprob")}
    candidate_rewards, candidate_logprobs = [], []
    for t in range(P):
        # 1. the policy writes a query; the base model writes the counterfactual in the same passes
        queries, _ = sample_tokens(model, cache, q_sep.repeat(1 + C, 1), Tq, query_temperature, greedy, both,
                                        keep_logits=B if keep_query_logits else 0, generator=generator,
                                        rows=global_rows, logits_out=None if query_logits is None
                                        else query_logits[:, t * Tq:(t + 1) * Tq],
                                        decode_step=decode_step)  # [(1+C)B, Tq], the policy's [B, Tq, V]
        query, cf = queries[:B], queries[B:2 * B]
        # 2. the query's embedding scores the keys left in the pool
        probs = compute_similarity(query_embeddings(model, query, similarity_layer, how=similarity_readout),
                                   batch.key_embeddings,
                                   geo.num_query_heads, geo.num_kv_heads, similarity_temperature, available)  # [B, N]
        # 3. draw a pair without replacement
        if oracle:
            reward, logprob = score_candidates(model, cache, queries[:, -1:], r_sep.repeat(1 + C, 1), values, available,
                                               both, P - t)
            candidate_rewards.append(reward)
            candidate_logprobs.append(logprob)
        choice, probs = choose_pairs(probs, available, selector, greedy, generator, global_rows)  # [B], [B, N]
        available[rows, choice] = False
        value = values[rows, choice]  # [B, Tv]
        # 4. each model scores the value after its own query; the policy's pass extends its context
        scored = score_continuation(model, cache, torch.cat([queries[:, -1:], r_sep.repeat(1 + C, 1)], dim=1),
                                    value.repeat(1 + C, 1), both)  # [(1+C)B, Tv]
        policy_lp, base_lp = scored[:B], scored[B:]  # [B, Tv], [C*B, Tv]
        # 5. the base model's rows roll back to context + ` Query:` and read the policy's query and value (every
        # block: all C stay copies of the policy's context)
        appended = torch.cat([query, r_sep, value], dim=1)
        with base_model(model):  # the value's log-prob in this pass splits the reward (adapter vs query)
            base_same = score_tail(model, cache.rows(slice(B, (1 + C) * B), cache.get_seq_length() - appended.shape[1]),
                                   appended.repeat(C, 1), value.shape[1])[:B]
        chunks += [q_sep, query, r_sep, value]
        # 6. the reward
        for name, x in zip(fields, (query, cf, choice, probs[rows, choice], probs, policy_lp.mean(dim=1),
                                    base_lp.mean(dim=1).view(C, B).mean(dim=0), calculate_reward(policy_lp, base_lp),
                                    base_same.mean(dim=1))):
            fields[name].append(x)

    tokens = torch.cat(chunks, dim=1)  # [B, L]
    assert cache.get_seq_length() == tokens.shape[1], (cache.get_seq_length(), tokens.shape)
    model.train(was_training)
    return Trajectory(tokens=tokens, **{name: torch.stack(xs, dim=1) for name, xs in fields.items()},
                      initial_length=L0, step_length=step_length, query_offset=q_sep.shape[1], batch=batch,
                      query_logits=query_logits,
                      candidate_rewards=torch.stack(candidate_rewards, dim=1) if oracle else None,
                      candidate_logprobs=torch.stack(candidate_logprobs, dim=1) if oracle else None)


def rollout_options(cfg: TrainConfig, decode_step: DecodeStep | None = None) -> dict:
    """`rollout`'s keywords from a config (training, evaluation and the bench roll out alike); `decode_step`:
    the run's `DecodeStep` (`decode_step_for`), passed on when there is one."""
    options = dict(tokens_per_query=cfg.tokens_per_query, similarity_temperature=cfg.temperature,
                   query_temperature=cfg.query_temperature, similarity_layer=cfg.similarity_layer,
                   similarity_readout=cfg.similarity_readout, counterfactual_samples=cfg.counterfactual_samples)
    return options if decode_step is None else {**options, "decode_step": decode_step}


def decode_step_for(cfg: TrainConfig, device: torch.device) -> DecodeStep | None:
    """The `DecodeStep` a run with this config keeps for all its rollouts (`--compile 1`), else None."""
    return DecodeStep(compiled=True, device=device) if cfg.compile else None


@torch.inference_mode()
def generate_query(model: nn.Module, batch: KeyValueBatch, sep: Separators, tokens_per_query: int,
                   query_temperature: float = 1.0, greedy: bool = False) -> torch.Tensor:
    """[B, Tq]: the model's first query for each article, after its in-context example (for inspection)."""
    device = next(model.parameters()).device
    context = initial_context(batch, sep, device)
    cache = DynamicCache(config=model.config)
    forward_logits(model, context, cache, 1)
    prompt = sep.query.to(device).expand(batch.batch_size, -1)
    return sample_tokens(model, cache, prompt, tokens_per_query, query_temperature, greedy)[0]
