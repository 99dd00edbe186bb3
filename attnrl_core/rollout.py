"""Batched trajectory generation: SPEC.md §3.1.2 as settled by DESIGN.md §2.3, §2.5 and §4.

For a batch of B articles, in lock-step (every row has the same length at every step, no padding):

  0. The context starts as [BOS] ` Query:` key_0 ` Response:` value_0 (pair 0 is the in-context example).
  For each of the P steps:
  1. The policy (adapter on) samples exactly `tokens_per_query` tokens after ` Query:`.
  2. Their last-layer q_proj embedding scores the keys still in the pool (`compute_similarity`).
  3. A pair is sampled from that distribution and removed from the pool.
  4. ` Response:` value is fed through the policy: its log-probs are the reward's first term and the
     same forward pass extends the policy's context.
  5. The base model (adapter off) samples a counterfactual query from the same context, scores the
     value after it, rolls its cache back, and reads the policy's query and value instead.
  6. r_t = mean log p_policy(value) - mean log p_base(value | counterfactual query).

Two KV caches (policy, base) grow step by step; nothing is re-encoded. Python loops run only over
steps and generated tokens. Imports attnrl_core.data, .embeddings and .model.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import DynamicCache

from .data import KeyValueBatch, Separators
from .embeddings import compute_similarity, query_embeddings
from .model import HeadGeometry, base_model


@dataclass
class TrajectoryStep:
    """One step of B trajectories (SPEC.md §4.4 `TrajectoryStep`, batched)."""

    query_tokens: torch.Tensor  # [B, Tq] the policy's query
    counterfactual_tokens: torch.Tensor  # [B, Tq] the base model's query from the same context
    selected: torch.Tensor  # [B] index of the chosen pair (1..N-1)
    selected_prob: torch.Tensor  # [B] its probability under the similarity distribution
    probabilities: torch.Tensor  # [B, N] the distribution (0 for pairs not available)
    policy_logprob: torch.Tensor  # [B] mean log p_policy(value tokens)
    base_logprob: torch.Tensor  # [B] mean log p_base(value tokens | counterfactual query)
    reward: torch.Tensor  # [B] calculate_reward: policy_logprob - base_logprob


def _cat_steps(steps: list[TrajectoryStep]) -> TrajectoryStep:
    return TrajectoryStep(*(torch.cat([getattr(s, f) for s in steps]) for f in TrajectoryStep.__dataclass_fields__))


@dataclass
class Trajectory:
    """B trajectories rolled out together (SPEC.md §4.4 `Trajectory`, batched)."""

    steps: list[TrajectoryStep]
    tokens: torch.Tensor  # [B, L] final context: every query sits at the exact state it was sampled in
    initial_length: int  # L0: tokens of [BOS] ` Query:` key_0 ` Response:` value_0
    step_length: int  # tokens appended per step: Sq + Tq + Sr + Tv
    query_offset: int  # Sq: where a step's query starts within the step
    batch: KeyValueBatch
    forward_tokens: int  # tokens read by the model during the rollout (for throughput)
    logit_positions: int = 0  # positions at which the LM head ran (for FLOP accounting)

    @classmethod
    def concat(cls, parts: list["Trajectory"], batch: KeyValueBatch) -> "Trajectory":
        """Join trajectories rolled out in row chunks of `batch` (all chunks have the same lengths)."""
        first = parts[0]
        steps = [_cat_steps([p.steps[t] for p in parts]) for t in range(len(first.steps))]
        return cls(steps, torch.cat([p.tokens for p in parts]), first.initial_length, first.step_length,
                   first.query_offset, batch, sum(p.forward_tokens for p in parts),
                   sum(p.logit_positions for p in parts))

    @property
    def rewards(self) -> torch.Tensor:  # [B, P]
        return torch.stack([s.reward for s in self.steps], dim=1)

    @property
    def avg_reward(self) -> torch.Tensor:  # [B]
        return self.rewards.mean(dim=1)

    @property
    def total_reward(self) -> torch.Tensor:  # [B]
        return self.rewards.sum(dim=1)

    @property
    def query_positions(self) -> torch.Tensor:
        """[P*Tq] positions of the query tokens in `tokens` (the same for every row)."""
        Tq = self.steps[0].query_tokens.shape[1]
        starts = self.initial_length + self.step_length * torch.arange(len(self.steps)) + self.query_offset
        return (starts[:, None] + torch.arange(Tq)[None, :]).reshape(-1)

    @property
    def query_tokens(self) -> torch.Tensor:  # [B, P*Tq]
        return torch.cat([s.query_tokens for s in self.steps], dim=1)


def _forward(model: nn.Module, ids: torch.Tensor, cache: DynamicCache, logits_to_keep: int) -> torch.Tensor:
    return model(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=logits_to_keep).logits


def sample_tokens(model: nn.Module, cache: DynamicCache, prompt: torch.Tensor, num_tokens: int,
                  temperature: float, greedy: bool = False) -> torch.Tensor:
    """Read `prompt` [B, S] into `cache`, then sample exactly `num_tokens` tokens [B, num_tokens].

    No early stop. The last sampled token is *not* read into the cache: the caller's next forward
    pass starts with it (so the step's value scoring and context extension are one pass).
    """
    logits = _forward(model, prompt, cache, 1)[:, -1]  # [B, V]
    out = []
    for i in range(num_tokens):
        if greedy:
            token = logits.argmax(dim=-1, keepdim=True)
        else:  # argmax(p / E), E ~ Exp(1): torch.multinomial's own one-sample algorithm (same draws), minus its
            # input-validation scans over the 49k-128k vocabulary, which cost ~9 ms a call on the CPU
            probs = F.softmax(logits.float() / temperature, dim=-1)
            token = (probs / torch.empty_like(probs).exponential_()).argmax(dim=-1, keepdim=True)  # [B, 1]
        out.append(token)
        if i + 1 < num_tokens:
            logits = _forward(model, token, cache, 1)[:, -1]
    return torch.cat(out, dim=1)


def score_continuation(model: nn.Module, cache: DynamicCache, prefix: torch.Tensor,
                       target: torch.Tensor) -> torch.Tensor:
    """Read prefix [B, S] + target [B, T] into `cache`; return log p(target tokens) [B, T] (float32)."""
    T = target.shape[1]
    logits = _forward(model, torch.cat([prefix, target], dim=1), cache, T + 1)[:, :-1]  # [B, T, V]
    return F.log_softmax(logits.float(), dim=-1).gather(-1, target[..., None]).squeeze(-1)


def calculate_reward(policy_logprobs: torch.Tensor, base_logprobs: torch.Tensor) -> torch.Tensor:
    """DESIGN.md §2.5: mean over value tokens of the policy's log-probs minus the base model's. [B, T] -> [B]."""
    assert policy_logprobs.shape == base_logprobs.shape, (policy_logprobs.shape, base_logprobs.shape)
    return policy_logprobs.mean(dim=-1) - base_logprobs.mean(dim=-1)


def initial_context(batch: KeyValueBatch, sep: Separators, device: torch.device) -> torch.Tensor:
    """[B, L0]: [BOS] ` Query:` key_0 ` Response:` value_0, by concatenating token ids (never re-tokenising)."""
    B = batch.batch_size
    parts = [sep.bos, sep.query, batch.key_tokens[:, 0], sep.response, batch.value_tokens[:, 0]]
    return torch.cat([p.expand(B, -1) if p.ndim == 1 else p for p in parts], dim=1).to(device)


SELECTORS = ("attention", "random", "natural")


def choose_pairs(probs: torch.Tensor, available: torch.Tensor, selector: str, greedy: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(choice [B], the distribution it was drawn from [B, N]) for a selection rule.

    attention: the query's similarity distribution (the method); random: uniform over the pairs left
    (a baseline); natural: the earliest pair left, i.e. article order (a reference).
    """
    if selector == "random":
        probs = available.float() / available.sum(dim=1, keepdim=True)
    elif selector == "natural":
        N = available.shape[1]
        first = (available * torch.arange(N, 0, -1, device=available.device)).argmax(dim=1)
        probs = F.one_hot(first, N).float()
    else:
        assert selector == "attention", selector
    choice = probs.argmax(dim=1) if greedy or selector == "natural" else torch.multinomial(probs, 1).squeeze(1)
    return choice, probs


@torch.inference_mode()
def rollout(model: nn.Module, batch: KeyValueBatch, sep: Separators, geo: HeadGeometry, *,
            tokens_per_query: int, temperature: float = 1.0, query_temperature: float = 1.0,
            greedy: bool = False, selector: str = "attention") -> Trajectory:
    """Generate B trajectories in lock-step; see the module docstring for the steps. `selector` swaps
    the attention selection for a baseline (`choose_pairs`); everything else stays the same."""
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
    policy_cache, base_cache = DynamicCache(config=model.config), DynamicCache(config=model.config)
    _forward(model, context, policy_cache, 1)
    with base_model(model):
        _forward(model, context, base_cache, 1)
    forward_tokens = 2 * B * L0

    chunks, steps = [context], []
    for _ in range(P):
        # 1-2. the policy writes a query; its embedding scores the keys left in the pool
        query = sample_tokens(model, policy_cache, q_sep, Tq, query_temperature, greedy)  # [B, Tq]
        probs = compute_similarity(query_embeddings(model, query), batch.key_embeddings,
                                   geo.num_query_heads, geo.num_kv_heads, temperature, available)  # [B, N]
        # 3. draw a pair without replacement
        choice, probs = choose_pairs(probs, available, selector, greedy)  # [B], [B, N]
        available[rows, choice] = False
        value = values[rows, choice]  # [B, Tv]
        # 4. the policy scores the value; the same pass extends its context
        policy_lp = score_continuation(model, policy_cache, torch.cat([query[:, -1:], r_sep], dim=1), value)
        # 5. the counterfactual: base model, same context, same length and sampling settings
        with base_model(model):
            cf = sample_tokens(model, base_cache, q_sep, Tq, query_temperature, greedy)
            base_lp = score_continuation(model, base_cache, torch.cat([cf[:, -1:], r_sep], dim=1), value)
            base_cache.crop(-(Tq + r_sep.shape[1] + value.shape[1]))  # back to context + ` Query:`
            _forward(model, torch.cat([query, r_sep, value], dim=1), base_cache, 1)
        chunks += [q_sep, query, r_sep, value]
        # 6. the reward
        steps.append(TrajectoryStep(query, cf, choice, probs[rows, choice], probs, policy_lp.mean(dim=1),
                                    base_lp.mean(dim=1), calculate_reward(policy_lp, base_lp)))
        forward_tokens += B * (2 * (q_sep.shape[1] + Tq + r_sep.shape[1] + value.shape[1])  # two models' passes
                               + Tq  # query embedding
                               + Tq + r_sep.shape[1] + value.shape[1])  # base cache re-reads the policy's pair

    tokens = torch.cat(chunks, dim=1)  # [B, L]
    step_length = q_sep.shape[1] + Tq + r_sep.shape[1] + values.shape[2]
    assert tokens.shape == (B, L0 + P * step_length), tokens.shape
    assert policy_cache.get_seq_length() == base_cache.get_seq_length() == tokens.shape[1]
    model.train(was_training)
    # LM head: prefills 1 each; per step and model Tq sampling positions + Tv+1 scored; base re-read 1
    logit_positions = 2 * B + P * B * (2 * (Tq + values.shape[2] + 1) + 1)
    return Trajectory(steps, tokens, L0, step_length, q_sep.shape[1], batch, forward_tokens, logit_positions)


@torch.inference_mode()
def generate_query(model: nn.Module, batch: KeyValueBatch, sep: Separators, tokens_per_query: int,
                   query_temperature: float = 1.0, greedy: bool = False) -> torch.Tensor:
    """[B, Tq]: the model's first query for each article, after its in-context example (for inspection)."""
    device = next(model.parameters()).device
    context = initial_context(batch, sep, device)
    cache = DynamicCache(config=model.config)
    _forward(model, context, cache, 1)
    prompt = sep.query.to(device).expand(batch.batch_size, -1)
    return sample_tokens(model, cache, prompt, tokens_per_query, query_temperature, greedy)
