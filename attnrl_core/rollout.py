"""Batched trajectory generation: SPEC.md §3.1.2 as settled by DESIGN.md §2.3, §2.5 and §4.

For a batch of B articles, in lock-step (every row has the same length at every step, no padding):

  0. The context starts as [BOS] ` Query:` key_0 ` Response:` value_0 (pair 0 is the in-context example).
  For each of the P steps:
  1. The policy (adapter on) samples exactly `tokens_per_query` tokens after ` Query:`; in the same
     forward passes the base model (adapter off) samples the counterfactual query from the same context.
  2. The query's last-layer q_proj embedding scores the keys still in the pool (`compute_similarity`).
  3. A pair is sampled from that distribution and removed from the pool.
  4. ` Response:` value is scored after each query, by its own model, in one forward pass: the policy's
     log-probs are the reward's first term, the base model's the second, and the policy's pass
     extends its context.
  5. The base model's rows roll back and read the policy's query and value instead.
  6. r_t = mean log p_policy(value) - mean log p_base(value | counterfactual query).

DESIGN.md §4's two KV caches are the two halves of one: policy and base model share every forward
pass, 2B rows, the adapter applied to the first B only (PEFT's mixed-adapter batch), so each decode
step reads the weights once for both. The cache is allocated once for the final length and written
in place; nothing is re-encoded. The policy's sampling logits are kept: they are the previous
policy of the update phase.
Python loops run only over steps and generated tokens. Imports attnrl_core.data, .embeddings and .model.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import DynamicCache
from transformers.cache_utils import Cache, DynamicLayer

from .data import KeyValueBatch, Separators
from .embeddings import compute_similarity, query_embeddings
from .model import HeadGeometry, base_model, policy_and_base


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
    query_logits: torch.Tensor | None = None  # [B, P*Tq, V] the policy's logits each query token was drawn from

    @classmethod
    def concat(cls, parts: list["Trajectory"], batch: KeyValueBatch) -> "Trajectory":
        """Join trajectories rolled out in row chunks of `batch` (all chunks have the same lengths)."""
        first = parts[0]
        steps = [_cat_steps([p.steps[t] for p in parts]) for t in range(len(first.steps))]
        logits = None if first.query_logits is None else torch.cat([p.query_logits for p in parts])
        return cls(steps, torch.cat([p.tokens for p in parts]), first.initial_length, first.step_length,
                   first.query_offset, batch, sum(p.forward_tokens for p in parts),
                   sum(p.logit_positions for p in parts), logits)

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


class _BufferLayer(DynamicLayer):
    """A cache layer whose keys and values are views of a buffer allocated once for `max_length` positions.

    `update` writes the new positions in place instead of concatenating the whole cache every token;
    `crop` (inherited) shortens the views. `rows` gives a layer over some batch rows of the same buffer.
    """

    def __init__(self, max_length: int):
        super().__init__()
        self.max_length = max_length

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        B, H, _, D = key_states.shape
        self.dtype, self.device = key_states.dtype, key_states.device
        self.key_buffer = key_states.new_empty(B, H, self.max_length, D)
        self.value_buffer = value_states.new_empty(B, value_states.shape[1], self.max_length, value_states.shape[3])
        self.keys, self.values = self.key_buffer[:, :, :0], self.value_buffer[:, :, :0]
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        start, end = self.keys.shape[2], self.keys.shape[2] + key_states.shape[2]
        assert end <= self.max_length, f"cache holds {self.max_length} positions, {end} asked for"
        self.key_buffer[:, :, start:end] = key_states
        self.value_buffer[:, :, start:end] = value_states
        self.keys, self.values = self.key_buffer[:, :, :end], self.value_buffer[:, :, :end]
        return self.keys, self.values

    def rows(self, rows: slice, length: int) -> "_BufferLayer":
        view = _BufferLayer(self.max_length)
        view.dtype, view.device, view.is_initialized = self.dtype, self.device, True
        view.key_buffer, view.value_buffer = self.key_buffer[rows], self.value_buffer[rows]
        view.keys, view.values = view.key_buffer[:, :, :length], view.value_buffer[:, :, :length]
        return view


class BufferedCache(DynamicCache):
    """A `DynamicCache` of `_BufferLayer`s: allocated once for `max_length` positions, written in place."""

    def __init__(self, config, max_length: int, layers: list | None = None):
        if layers is None:
            layers = [_BufferLayer(max_length) for _ in range(config.get_text_config(decoder=True).num_hidden_layers)]
        Cache.__init__(self, layers=layers)

    def rows(self, rows: slice, length: int) -> "BufferedCache":
        """A cache over `rows` of this one's buffers holding its first `length` positions; writes land here too."""
        return BufferedCache(None, 0, [layer.rows(rows, length) for layer in self.layers])


def _forward(model: nn.Module, ids: torch.Tensor, cache: DynamicCache, logits_to_keep: int | torch.Tensor,
             adapter_names: list[str] | None = None) -> torch.Tensor:
    extra = {} if adapter_names is None else {"adapter_names": adapter_names}
    S = ids.shape[1]
    if isinstance(logits_to_keep, int) and 0 < logits_to_keep < S:
        # the last positions by index, not by slice: a slice of [B, S, H] is strided, and the LM head then runs
        # as a batched matmul over B copies of its weight (8x slower than one matmul on the CPU)
        logits_to_keep = torch.arange(S - logits_to_keep, S, device=ids.device)
    return model(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=logits_to_keep, **extra).logits


def sample_from_logits(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """One token per row [B, 1] from softmax(logits [B, V] / temperature), by inverting the CDF.

    One uniform per row and a scan of the vocabulary, on the device, with no host synchronisation.
    `torch.multinomial` (and the exponential race it uses for one sample) draws an exponential for
    every vocabulary entry: 6M draws per token at B=128, V=49k, which made it the rollout's single
    most expensive operation on the CPU (5 of 43 seconds in a profile).
    """
    cdf = F.softmax(logits.float() / temperature, dim=-1).cumsum(dim=-1)  # [B, V]
    u = torch.rand(cdf.shape[0], 1, device=cdf.device) * cdf[:, -1:]  # scaled by the total: no rounding overflow
    return torch.searchsorted(cdf, u, right=True).clamp_(max=cdf.shape[1] - 1)


def sample_tokens(model: nn.Module, cache: DynamicCache, prompt: torch.Tensor, num_tokens: int,
                  temperature: float, greedy: bool = False, adapter_names: list[str] | None = None,
                  keep_logits: int = 0) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Read `prompt` [B, S] into `cache`, then sample exactly `num_tokens` tokens [B, num_tokens].

    Returns the tokens and, for the first `keep_logits` rows, the logits each token was drawn from
    [keep_logits, num_tokens, V] (None when 0). No early stop. The last sampled token is *not* read
    into the cache: the caller's next forward pass starts with it (so the step's value scoring and
    context extension are one pass).
    """
    logits = _forward(model, prompt, cache, 1, adapter_names)[:, -1]  # [B, V]
    out, kept = [], []
    for i in range(num_tokens):
        token = logits.argmax(dim=-1, keepdim=True) if greedy else sample_from_logits(logits, temperature)  # [B, 1]
        out.append(token)
        if keep_logits:
            kept.append(logits[:keep_logits])
        if i + 1 < num_tokens:
            logits = _forward(model, token, cache, 1, adapter_names)[:, -1]
    return torch.cat(out, dim=1), torch.stack(kept, dim=1) if keep_logits else None


def score_continuation(model: nn.Module, cache: DynamicCache, prefix: torch.Tensor,
                       target: torch.Tensor, adapter_names: list[str] | None = None) -> torch.Tensor:
    """Read prefix [B, S] + target [B, T] into `cache`; return log p(target tokens) [B, T] (float32)."""
    T = target.shape[1]
    S = prefix.shape[1]
    predicting = torch.arange(S - 1, S + T - 1, device=target.device)  # the positions before each target token
    logits = _forward(model, torch.cat([prefix, target], dim=1), cache, predicting, adapter_names).float()
    # log p(target) = logit(target) - logsumexp(logits): no [B, T, V] log-softmax tensor is written
    return logits.gather(-1, target[..., None]).squeeze(-1) - torch.logsumexp(logits, dim=-1)


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
    step_length = q_sep.shape[1] + Tq + r_sep.shape[1] + values.shape[2]
    both = policy_and_base(model, B)  # rows [0, B): the policy; rows [B, 2B): the base model
    cache = BufferedCache(model.config, L0 + P * step_length)
    _forward(model, context.repeat(2, 1), cache, 1, both)
    forward_tokens = 2 * B * L0

    chunks, steps, query_logits = [context], [], []
    for _ in range(P):
        # 1. the policy writes a query; the base model writes the counterfactual in the same passes
        queries, logits = sample_tokens(model, cache, q_sep.repeat(2, 1), Tq, query_temperature, greedy, both,
                                        keep_logits=B)  # [2B, Tq], the policy's [B, Tq, V]
        query_logits.append(logits)
        query, cf = queries[:B], queries[B:]
        # 2. the query's embedding scores the keys left in the pool
        probs = compute_similarity(query_embeddings(model, query), batch.key_embeddings,
                                   geo.num_query_heads, geo.num_kv_heads, temperature, available)  # [B, N]
        # 3. draw a pair without replacement
        choice, probs = choose_pairs(probs, available, selector, greedy)  # [B], [B, N]
        available[rows, choice] = False
        value = values[rows, choice]  # [B, Tv]
        # 4. each model scores the value after its own query; the policy's pass extends its context
        scored = score_continuation(model, cache, torch.cat([queries[:, -1:], r_sep.repeat(2, 1)], dim=1),
                                    value.repeat(2, 1), both)  # [2B, Tv]
        policy_lp, base_lp = scored[:B], scored[B:]
        # 5. the base model's rows roll back to context + ` Query:` and read the policy's query and value
        appended = torch.cat([query, r_sep, value], dim=1)
        with base_model(model):
            _forward(model, appended, cache.rows(slice(B, 2 * B), cache.get_seq_length() - appended.shape[1]), 1)
        chunks += [q_sep, query, r_sep, value]
        # 6. the reward
        steps.append(TrajectoryStep(query, cf, choice, probs[rows, choice], probs, policy_lp.mean(dim=1),
                                    base_lp.mean(dim=1), calculate_reward(policy_lp, base_lp)))
        forward_tokens += B * (2 * (q_sep.shape[1] + Tq + r_sep.shape[1] + value.shape[1])  # two models' passes
                               + Tq  # query embedding
                               + Tq + r_sep.shape[1] + value.shape[1])  # base rows re-read the policy's pair

    tokens = torch.cat(chunks, dim=1)  # [B, L]
    assert tokens.shape == (B, L0 + P * step_length), tokens.shape
    assert cache.get_seq_length() == tokens.shape[1], (cache.get_seq_length(), tokens.shape)
    model.train(was_training)
    # LM head: prefills 1 each; per step and model Tq sampling positions + Tv scored; base re-read 1
    logit_positions = 2 * B + P * B * (2 * (Tq + values.shape[2]) + 1)
    return Trajectory(steps, tokens, L0, step_length, q_sep.shape[1], batch, forward_tokens, logit_positions,
                      torch.cat(query_logits, dim=1))


@torch.inference_mode()
def generate_query(model: nn.Module, batch: KeyValueBatch, sep: Separators, tokens_per_query: int,
                   query_temperature: float = 1.0, greedy: bool = False) -> torch.Tensor:
    """[B, Tq]: the model's first query for each article, after its in-context example (for inspection)."""
    device = next(model.parameters()).device
    context = initial_context(batch, sep, device)
    cache = DynamicCache(config=model.config)
    _forward(model, context, cache, 1)
    prompt = sep.query.to(device).expand(batch.batch_size, -1)
    return sample_tokens(model, cache, prompt, tokens_per_query, query_temperature, greedy)[0]
