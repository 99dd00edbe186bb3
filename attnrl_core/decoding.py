"""Decoding primitives over a preallocated KV cache: the cache, sampling, and scoring a continuation.

The rollout's forward passes all go through here: a cache allocated once for the final length and
written in place (`BufferedCache`, whose row views let some rows roll back and read other tokens),
sampling a fixed number of tokens with no early stop, and the log-probs of a continuation read in
one pass, with logits computed only at the positions that need them.
Imports attnrl_core.distributed (which rows of a global batch a rollout holds) and attnrl_core.model (the
adapter per row) only.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import DynamicCache
from transformers.cache_utils import Cache, DynamicLayer

from .distributed import Rows, global_draw
from .model import row_adapter


class _BufferLayer(DynamicLayer):
    """A cache layer whose keys and values are views of a buffer allocated once for `max_length` positions.

    `update` writes the new positions in place instead of concatenating the whole cache every token;
    `crop` (inherited) shortens the views. `rows` gives a layer over some batch rows of the same buffer.
    """

    def __init__(self, max_length: int, pool: dict | None = None, index: int = 0):
        super().__init__()
        self.max_length, self.pool, self.index = max_length, pool, index

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        B, H, _, D = key_states.shape
        self.dtype, self.device = key_states.dtype, key_states.device
        shapes = ((B, H, self.max_length, D), (B, value_states.shape[1], self.max_length, value_states.shape[3]))
        if self.pool is None:
            self.key_buffer, self.value_buffer = (key_states.new_empty(shape) for shape in shapes)
        else:  # the run's buffers of this layer and shape, allocated by the first rollout that needed them
            key = (self.index, shapes, self.dtype, self.device)
            if key not in self.pool:
                self.pool[key] = tuple(key_states.new_empty(shape) for shape in shapes)
                if self.device.type == "cuda":  # a CUDA graph replays reads of these very addresses
                    for buffer in self.pool[key]:
                        torch._dynamo.mark_static_address(buffer)
            self.key_buffer, self.value_buffer = self.pool[key]
            # zeroed by every cache that takes them: the fixed-shape step reads the whole buffer, and a masked
            # position's weight 0 times a NaN or inf left there (uninitialised memory, an earlier rollout's
            # overflow) is NaN. One fill per layer per rollout, outside the token loop.
            self.key_buffer.zero_()
            self.value_buffer.zero_()
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

    def repeated(self, times: int, length: int, extra: int) -> "_BufferLayer":
        """A new layer holding each row's first `length` positions `times` times (row i -> rows i*times..),
        with room for `extra` more."""
        layer = _BufferLayer(length + extra)
        layer.dtype, layer.device, layer.is_initialized = self.dtype, self.device, True
        for name in ("key_buffer", "value_buffer"):
            old = getattr(self, name)
            new = old.new_empty(old.shape[0] * times, old.shape[1], length + extra, old.shape[3])
            new[:, :, :length] = old[:, :, :length].repeat_interleave(times, dim=0)
            setattr(layer, name, new)
        layer.keys, layer.values = layer.key_buffer[:, :, :length], layer.value_buffer[:, :, :length]
        return layer

    def advance(self, n: int) -> None:
        """Take in the `n` positions after the current ones, written into the buffer by `static_decode_step`."""
        end = self.keys.shape[2] + n
        assert end <= self.max_length, f"cache holds {self.max_length} positions, {end} asked for"
        self.keys, self.values = self.key_buffer[:, :, :end], self.value_buffer[:, :, :end]

    def rows(self, rows: slice, length: int) -> "_BufferLayer":
        view = _BufferLayer(self.max_length)
        view.dtype, view.device, view.is_initialized = self.dtype, self.device, True
        view.key_buffer, view.value_buffer = self.key_buffer[rows], self.value_buffer[rows]
        view.keys, view.values = view.key_buffer[:, :, :length], view.value_buffer[:, :, :length]
        return view


class BufferedCache(DynamicCache):
    """A `DynamicCache` of `_BufferLayer`s: allocated once for `max_length` positions, written in place. With
    `pool` (a dict the caller keeps, `DecodeStep.pool`) the buffers of a shape are allocated once and reused by
    every later cache of that shape: the compiled decode step sees the same tensors at every episode."""

    def __init__(self, config, max_length: int, layers: list | None = None, pool: dict | None = None):
        if layers is None:
            layers = [_BufferLayer(max_length, pool, i)
                      for i in range(config.get_text_config(decoder=True).num_hidden_layers)]
        Cache.__init__(self, layers=layers)

    def advance(self, n: int) -> None:
        """Take in `n` more positions that `static_decode_step` wrote past the current ones (bookkeeping only)."""
        for layer in self.layers:
            layer.advance(n)

    def rows(self, rows: slice, length: int) -> "BufferedCache":
        """A cache over `rows` of this one's buffers holding its first `length` positions; writes land here too."""
        return BufferedCache(None, 0, [layer.rows(rows, length) for layer in self.layers])

    def repeated(self, times: int, extra: int) -> "BufferedCache":
        """A copy with every row repeated `times` times (row i -> rows i*times .. i*times+times-1) and room
        for `extra` more positions: candidate continuations of the same context, without re-encoding it."""
        length = self.get_seq_length()
        return BufferedCache(None, 0, [layer.repeated(times, length, extra) for layer in self.layers])


class _StaticStepCache(Cache):
    """What one decode step sees of a `BufferedCache`: every layer's whole buffer [B, H, max_length, D], the
    step's keys and values written in place at `position` [1] (a tensor, not a Python int). Every step of a
    rollout, and every episode's, then has the same shapes and no value read, so it compiles once and a CUDA
    graph can replay it; the positions past `position` are masked by the caller."""

    is_compileable = True

    def __init__(self, layers: list, position: torch.Tensor):
        Cache.__init__(self, layers=list(layers))  # what transformers asks of a cache's layers (is_sliding, ...)
        self.buffers = [(layer.key_buffer, layer.value_buffer) for layer in layers]
        self.position = position

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        keys, values = self.buffers[layer_idx]
        keys.index_copy_(2, self.position, key_states)  # as transformers' StaticLayer: in place, CUDA-graph safe
        values.index_copy_(2, self.position, value_states)
        return keys, values


def static_decode_step(model: nn.Module, token: torch.Tensor, layers: list, position: torch.Tensor,
                       adapter_rows: torch.Tensor | None = None) -> torch.Tensor:
    """The logits [B, V] after reading `token` [B, 1] at `position` [1] into `layers` (a `BufferedCache`'s), attending
    to the positions up to it through a mask over the whole buffer: one fixed-shape function of tensors, what
    `--compile` compiles (`decode_step`). The caller moves the layers' views on (`BufferedCache.advance`)."""
    length = layers[0].key_buffer.shape[2]
    mask = (torch.arange(length, device=token.device) <= position)[None, None, None, :]  # [1, 1, 1, L]
    with row_adapter(model, adapter_rows):
        out = model(input_ids=token, attention_mask=mask, position_ids=position[None], use_cache=True,
                    cache=_StaticStepCache(layers, position), logits_to_keep=1)
    return out.logits[:, -1]


class DecodeStep:
    """How the rollout's single-token decode steps run when not as plain forward passes: `static_decode_step`,
    compiled with `torch.compile` when `compiled` (`--compile`: `fullgraph=True`, and on CUDA
    `mode="reduce-overhead"`, CUDA graphs), and the pool of cache buffers its rollouts share (`BufferedCache`).
    One per run: its compiled code and buffers are reused by every episode."""

    def __init__(self, compiled: bool, device: torch.device):
        self.pool: dict = {}
        self.compiled = compiled
        self.step = static_decode_step
        if compiled:
            mode = "reduce-overhead" if device.type == "cuda" else None
            self.step = torch.compile(static_decode_step, fullgraph=True, dynamic=False, mode=mode)

    def cache(self, config, max_length: int) -> BufferedCache:
        return BufferedCache(config, max_length, pool=self.pool)

    def release(self) -> None:
        """Drop the pooled buffers (after an out-of-memory: a retry in smaller chunks must not find the full-size
        ones still held); the next rollout allocates what it needs."""
        self.pool.clear()

    def __call__(self, model: nn.Module, token: torch.Tensor, cache: BufferedCache, position: torch.Tensor,
                 adapter_rows: torch.Tensor | None = None) -> torch.Tensor:
        logits = self.step(model, token, cache.layers, position, adapter_rows)
        cache.advance(1)
        return logits


def forward_logits(model: nn.Module, ids: torch.Tensor, cache: DynamicCache, logits_to_keep: int | torch.Tensor,
                   adapter_rows: torch.Tensor | None = None) -> torch.Tensor:
    """The model's logits [B, K, V] at the last `logits_to_keep` positions (or those given) of `ids` [B, S] read
    into `cache`; `adapter_rows` [B]: which rows the adapter applies to (`model.row_adapter`)."""
    S = ids.shape[1]
    if isinstance(logits_to_keep, int) and 0 < logits_to_keep < S:
        # the last positions by index, not by slice: a slice of [B, S, H] is strided, and the LM head then runs
        # as a batched matmul over B copies of its weight (much slower on the CPU; BENCHMARKS.md)
        logits_to_keep = torch.arange(S - logits_to_keep, S, device=ids.device)
    with row_adapter(model, adapter_rows):
        return model(input_ids=ids, cache=cache, use_cache=True, logits_to_keep=logits_to_keep).logits


def forward_hidden(model: nn.Module, ids: torch.Tensor, cache: DynamicCache | None, positions: torch.Tensor,
                   adapter_rows: torch.Tensor | None = None) -> torch.Tensor:
    """The last hidden states [B, K, H] at `positions` [K] of `ids` [B, S] (what the LM head would read there), by
    the model's own forward pass (adapters, the adapter per row and all) with its head swapped out for the
    call: the caller applies the head in pieces (`head_logprobs`, `loss.reinforce_loss`'s chunks) instead of
    holding [B, K, V] logits."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    head = inner.get_output_embeddings()
    inner.set_output_embeddings(nn.Identity())
    try:
        with row_adapter(model, adapter_rows):
            return model(input_ids=ids, cache=cache, use_cache=cache is not None, logits_to_keep=positions).logits
    finally:
        inner.set_output_embeddings(head)


# A [rows, positions, V] float32 logits tensor is computed in pieces of about this size: at Llama-3.2-3B's
# vocabulary a whole one is 0.6-1.3 GB for SPEC's batches (memory.py), a piece keeps the head's matmul large
LOGITS_CHUNK_BYTES = 128 * 2**20


def chunk_length(per_item_bytes: int, items: int, max_bytes: int = LOGITS_CHUNK_BYTES) -> int:
    """How many of `items` (rows or positions) of `per_item_bytes` each fit in `max_bytes` (at least 1)."""
    return max(1, min(items, max_bytes // max(per_item_bytes, 1)))


def head_logprobs(head: nn.Module, hidden: torch.Tensor, tokens: torch.Tensor,
                  max_bytes: int = LOGITS_CHUNK_BYTES) -> torch.Tensor:
    """log p(tokens) [B, T] (float32) under head(hidden [B, T, H]), in row chunks of at most `max_bytes` of
    logits: the [B, T, V] logits and `logsumexp`'s same-size temporary never exist whole. No gradient is kept
    apart from the one through `hidden` (scoring runs in inference mode)."""
    B, T = tokens.shape
    assert hidden.shape[:2] == (B, T), (hidden.shape, tokens.shape)
    rows = chunk_length(T * head.out_features * 4, B, max_bytes)
    return torch.cat([token_logprobs(head(h), t) for h, t in zip(hidden.split(rows), tokens.split(rows))])


def sample_from_logits(logits: torch.Tensor, temperature: float = 1.0, generator: torch.Generator | None = None,
                       rows: Rows | None = None) -> torch.Tensor:
    """One token per row [B, 1] from softmax(logits [B, V] / temperature), by inverting the CDF.

    One uniform per row and a scan of the vocabulary, on the device, with no host synchronisation.
    `torch.multinomial` (and the exponential race it uses for one sample) draws an exponential for
    every vocabulary entry, 6M draws per token at B=128, V=49k: on the CPU the rollout's most
    expensive operation in a profile (BENCHMARKS.md). `generator` (on the logits' device) replaces
    the global one; with `rows`, the uniforms are drawn for the whole global batch (`global_draw`).
    """
    cdf = F.softmax(logits.float() / temperature, dim=-1).cumsum(dim=-1)  # [B, V]
    u = global_draw(cdf.shape[0], rows, lambda m: torch.rand(m, 1, device=cdf.device, generator=generator))
    u = u * cdf[:, -1:]  # scaled by the total: no rounding overflow
    return torch.searchsorted(cdf, u, right=True).clamp_(max=cdf.shape[1] - 1)


def sample_tokens(model: nn.Module, cache: DynamicCache, prompt: torch.Tensor, num_tokens: int,
                  temperature: float, greedy: bool = False, adapter_rows: torch.Tensor | None = None,
                  keep_logits: int = 0, generator: torch.Generator | None = None,
                  rows: Rows | None = None, logits_out: torch.Tensor | None = None,
                  decode_step: DecodeStep | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Read `prompt` [B, S] into `cache`, then sample exactly `num_tokens` tokens [B, num_tokens].

    Returns the tokens and, for the first `keep_logits` rows, the logits each token was drawn from
    [keep_logits, num_tokens, V] (None when 0), written in place into `logits_out` when given (e.g. a slice
    of the rollout's buffer for every step) or else into one buffer allocated here: no step's [B, V] logits
    stay alive through a view, and no stack copies them again. No early stop. The last sampled token is *not*
    read into the cache: the caller's next forward pass starts with it (so the step's value scoring and
    context extension are one pass). `rows`: which rows of a global batch the prompt's blocks hold
    (`sample_from_logits`). `decode_step`: the single-token steps run as `decode_step` (fixed shapes, the
    position a tensor on the device; compiled with `--compile`) instead of plain forward passes.
    """
    logits = forward_logits(model, prompt, cache, 1, adapter_rows)[:, -1]  # [B, V]
    if decode_step is not None and num_tokens > 1:
        position = torch.full((1,), cache.get_seq_length(), dtype=torch.long, device=prompt.device)
    if keep_logits and logits_out is None:
        logits_out = logits.new_empty(keep_logits, num_tokens, logits.shape[-1])
    if keep_logits:
        assert logits_out.shape == (keep_logits, num_tokens, logits.shape[-1]), (logits_out.shape, logits.shape)
    out = []
    for i in range(num_tokens):
        token = (logits.argmax(dim=-1, keepdim=True) if greedy
                 else sample_from_logits(logits, temperature, generator, rows))  # [B, 1]
        out.append(token)
        if keep_logits:
            logits_out[:, i].copy_(logits[:keep_logits])
        if i + 1 < num_tokens and decode_step is not None:
            logits = decode_step(model, token, cache, position, adapter_rows)
            position = position + 1
        elif i + 1 < num_tokens:
            logits = forward_logits(model, token, cache, 1, adapter_rows)[:, -1]
    return torch.cat(out, dim=1), logits_out if keep_logits else None


def score_continuation(model: nn.Module, cache: DynamicCache, prefix: torch.Tensor,
                       target: torch.Tensor, adapter_rows: torch.Tensor | None = None) -> torch.Tensor:
    """Read prefix [B, S] + target [B, T] into `cache`; return log p(target tokens) [B, T] (float32)."""
    return score_tail(model, cache, torch.cat([prefix, target], dim=1), target.shape[1], adapter_rows)


def score_tail(model: nn.Module, cache: DynamicCache, ids: torch.Tensor, T: int,
               adapter_rows: torch.Tensor | None = None) -> torch.Tensor:
    """Read ids [B, S] into `cache`; return log p of its last T tokens [B, T] (float32), logits only there."""
    S = ids.shape[1]
    target = ids[:, S - T:]
    predicting = torch.arange(S - T - 1, S - 1, device=ids.device)  # the positions before each target token
    hidden = forward_hidden(model, ids, cache, predicting, adapter_rows)  # [B, T, H]
    return head_logprobs(model.get_output_embeddings(), hidden, target)


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """log p(tokens) [..., T] (float32) under logits [..., T, V] predicting them."""
    logits = logits.float()
    # log p(token) = logit(token) - logsumexp(logits): no [..., T, V] log-softmax tensor is written
    return logits.gather(-1, tokens[..., None]).squeeze(-1) - torch.logsumexp(logits, dim=-1)
