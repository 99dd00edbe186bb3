"""Query/key embeddings from the last attention layer and the GQA-aware similarity over keys.

DESIGN.md §2.1-2.2: an embedding is the mean over a chunk's own tokens (no surrounding context) of
the last layer's `q_proj` (queries, adapter on) or `k_proj` (keys, adapter off) output, captured by a
forward hook; `similarity_layer` picks another layer (a research lever; -1, the last, is SPEC's).
`similarity_readout` picks how a chunk's tokens become what is compared (another lever; `READOUTS`): SPEC's
mean, the last token alone, or every token (late interaction: for each query token its best key token).
Similarity: per query head h, scaled dot products with KV group h // (Hq/Hkv), softmax over the
available keys per head, then the mean of the per-head distributions. `choice_logprob` is the same
distribution's log-prob of the chosen pair, with gradient (the `choice_in_loss` lever);
`selection_probabilities` the whole distribution at every step (the selection objective).
Imports attnrl_core.model only.
"""

from __future__ import annotations

import contextlib
import math
from typing import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from .model import attention_layer, base_model, head_geometry


READOUTS = ("mean", "last", "max")


class _StopForward(Exception):
    """Raised by a capture hook to skip the rest of the forward pass (layers after the hooked module)."""


@contextlib.contextmanager
def capture_output(module: nn.Module, stop: bool = False) -> Iterator[dict]:
    """Record `module`'s output in the yielded dict under "output"; the hook is removed on exit, always.

    With `stop=True` the forward pass is abandoned right after the module ran (wrap the call in
    `run_until_captured`): the last layer's MLP and the LM head are never computed.
    """
    captured: dict = {}

    def hook(_module, _inputs, output):
        captured["output"] = output
        if stop:
            raise _StopForward

    handle = module.register_forward_hook(hook)
    try:
        yield captured
    finally:
        handle.remove()


@contextlib.contextmanager
def detached_input(module: nn.Module) -> Iterator[None]:
    """While inside, `module` reads its input detached: a gradient of its output reaches its own parameters
    only, not the layers below it (the hook is removed on exit, always)."""
    handle = module.register_forward_pre_hook(lambda _module, inputs: (inputs[0].detach(), *inputs[1:]))
    try:
        yield
    finally:
        handle.remove()


def readout(outputs: torch.Tensor, how: str = "mean") -> torch.Tensor:
    """What a chunk's per-token projections [B, T, E] become for the similarity: mean -> [B, E] (SPEC's average
    over the sequence), last -> [B, E] (the last token's, which has read the whole chunk below this layer),
    max -> [B, T, E] (every token, kept for `head_probabilities`' late interaction)."""
    assert outputs.ndim == 3, outputs.shape
    if how == "mean":
        return outputs.float().mean(dim=1)
    if how == "last":
        return outputs[:, -1].float()
    if how == "max":
        return outputs.float()
    raise ValueError(f"similarity_readout {how!r} is unknown: use one of {', '.join(READOUTS)}")


def extract_token_outputs(model: nn.Module, token_ids: torch.Tensor, module: nn.Module,
                          detach_below: bool = False) -> torch.Tensor:
    """`module`'s output [B, T, out] when `model` reads `token_ids` [B, T] alone (the layers after it never run).
    With `detach_below`, the layers below `module` run without a gradient."""
    assert token_ids.ndim == 2 and token_ids.dtype == torch.long, (token_ids.shape, token_ids.dtype)
    with capture_output(module, stop=True) as captured, \
            detached_input(module) if detach_below else contextlib.nullcontext():
        try:
            model(input_ids=token_ids, use_cache=False)
        except _StopForward:
            pass
    out = captured["output"]  # [B, T, out]
    assert out.shape[:2] == token_ids.shape, (out.shape, token_ids.shape)
    return out


def extract_embeddings(model: nn.Module, token_ids: torch.Tensor, module: nn.Module,
                       detach_below: bool = False, how: str = "mean") -> torch.Tensor:
    """Mean over positions of `module`'s output when `model` reads `token_ids` [B, T]: returns [B, out] float32
    (another `readout` with `how`). With `detach_below`, the layers below `module` run without a gradient."""
    return readout(extract_token_outputs(model, token_ids, module, detach_below), how)


def query_embeddings(model: nn.Module, query_tokens: torch.Tensor, layer: int = -1,
                     detach_below: bool = False, how: str = "mean") -> torch.Tensor:
    """[B, Tq] -> [B, Hq*D] ([B, Tq, Hq*D] with how="max"): the policy's (adapter on) q_proj of layer `layer`,
    read out by `how`; with `detach_below` a gradient reaches that q_proj's adapter only."""
    return extract_embeddings(model, query_tokens, attention_layer(model, layer).q_proj, detach_below, how)


def key_embeddings(model: nn.Module, key_tokens: torch.Tensor, layer: int = -1, how: str = "mean") -> torch.Tensor:
    """[M, Tk] -> [M, Hkv*D] ([M, Tk, Hkv*D] with how="max"): the base model's (adapter off) k_proj of layer
    `layer`, read out by `how`."""
    with base_model(model), torch.no_grad():
        return extract_embeddings(model, key_tokens, attention_layer(model, layer).k_proj, how=how)


def key_embedding_fn(model: nn.Module, device: torch.device, chunk: int = 256,
                     layer: int = -1, how: str = "mean") -> Callable[[torch.Tensor], torch.Tensor]:
    """For `data.add_embeddings`: CPU token ids [M, Tk] in, key embeddings [M, Hkv*D] (or [M, Tk, Hkv*D]) out
    (on `device`)."""

    def embed(tokens: torch.Tensor) -> torch.Tensor:
        return torch.cat([key_embeddings(model, part.to(device), layer, how) for part in tokens.split(chunk)])

    return embed


def head_probabilities(query_emb: torch.Tensor, key_emb: torch.Tensor, num_query_heads: int, num_kv_heads: int,
                       temperature: float = 1.0, available: torch.Tensor | None = None) -> torch.Tensor:
    """Per-head distributions over keys, [B, Hq, K]: query head h scores keys with KV group h // (Hq/Hkv).

    query_emb [B, Hq*D] and key_emb [B, K, Hkv*D] are pooled vectors (one dot product per head and key); given
    per token, query_emb [B, Tq, Hq*D] and key_emb [B, K, Tk, Hkv*D] (`readout` "max"), a head's score of a key is
    ColBERT's late interaction: for each query token the best key token's dot product, averaged over the query's
    tokens (ColBERT sums; the mean ranks the same and keeps `temperature` on the pooled scores' scale)."""
    B, K = key_emb.shape[:2]
    assert num_query_heads % num_kv_heads == 0, (num_query_heads, num_kv_heads)
    group = num_query_heads // num_kv_heads
    head_dim = query_emb.shape[-1] // num_query_heads
    tokens = query_emb.ndim == 3
    assert key_emb.ndim == 3 + tokens, ("query and keys must both be pooled or both per token",
                                        query_emb.shape, key_emb.shape)
    assert query_emb.shape[0] == B and query_emb.shape[-1] == num_query_heads * head_dim, (query_emb.shape, B)
    assert key_emb.shape[-1] == num_kv_heads * head_dim, (key_emb.shape, num_kv_heads, head_dim)
    scale = temperature / math.sqrt(head_dim)
    if tokens:
        q = query_emb.float().view(B, -1, num_kv_heads, group, head_dim)  # [B, Tq, Hkv, G, D]
        k = key_emb.float().view(B, K, key_emb.shape[2], num_kv_heads, head_dim)  # [B, K, Tk, Hkv, D]
        per_token = torch.einsum("bqhgd,bkthd->bhgkqt", q, k)  # [B, Hkv, G, K, Tq, Tk]
        scores = per_token.amax(dim=-1).mean(dim=-1) * scale  # [B, Hkv, G, K]
    else:
        q = query_emb.float().view(B, num_kv_heads, group, head_dim)  # head h = kv*group + g
        k = key_emb.float().view(B, K, num_kv_heads, head_dim)
        scores = torch.einsum("bhgd,bkhd->bhgk", q, k) * scale  # [B, Hkv, G, K]
    if available is not None:
        assert available.shape == (B, K) and available.dtype == torch.bool, available.shape
        assert bool(available.any(dim=1).all()), "every row needs at least one available key"
        scores = scores.masked_fill(~available[:, None, None, :], float("-inf"))
    return F.softmax(scores, dim=-1).reshape(B, num_query_heads, K)


def compute_similarity(query_emb: torch.Tensor, key_emb: torch.Tensor, num_query_heads: int, num_kv_heads: int,
                       temperature: float = 1.0, available: torch.Tensor | None = None) -> torch.Tensor:
    """Probabilities over keys [B, K]: the mean over query heads of per-head softmaxes (rows sum to 1;
    unavailable keys get exactly 0). query_emb [B, Hq*D], key_emb [B, K, Hkv*D] (or per token: see
    `head_probabilities`), available [B, K] bool."""
    return head_probabilities(query_emb, key_emb, num_query_heads, num_kv_heads, temperature, available).mean(dim=1)


def selection_probabilities(model: nn.Module, queries: torch.Tensor, key_emb: torch.Tensor, available: torch.Tensor,
                            temperature: float = 1.0, layer: int = -1, reach: str = "below",
                            how: str = "mean") -> torch.Tensor:
    """[n, P, N]: the similarity distribution each step's pair was drawn from (`compute_similarity` over the keys
    available at that step; 0 elsewhere), differentiable through the adapter on the query's q_proj and, with
    `reach="below"`, the layers below it ("q_proj": that adapter only). queries [n, P, Tq], key_emb [n, N, E],
    available [n, P, N] bool; `how` the readout the keys were made with."""
    if reach not in ("below", "q_proj"):
        raise ValueError(f"reach {reach!r} is unknown: use below or q_proj")
    n, P, Tq = queries.shape
    assert available.shape == (n, P, key_emb.shape[1]), (available.shape, key_emb.shape)
    geo = head_geometry(model)
    q = query_embeddings(model, queries.reshape(n * P, Tq), layer, reach == "q_proj", how)  # one pass over the queries
    probs = compute_similarity(q, key_emb.repeat_interleave(P, dim=0), geo.num_query_heads, geo.num_kv_heads,
                               temperature, available.reshape(n * P, -1))  # [n*P, N]
    return probs.view(n, P, -1)


def choice_logprob(model: nn.Module, queries: torch.Tensor, key_emb: torch.Tensor, available: torch.Tensor,
                   choices: torch.Tensor, temperature: float = 1.0, layer: int = -1, how: str = "mean") -> torch.Tensor:
    """[n, P]: log p(choices[b, t] | query [b, t]) under `selection_probabilities` (`choice_in_loss`);
    choices [n, P]."""
    assert choices.shape == queries.shape[:2], (choices.shape, queries.shape)
    probs = selection_probabilities(model, queries, key_emb, available, temperature, layer, how=how)
    return probs.gather(2, choices[..., None].to(probs.device)).squeeze(2).clamp_min(1e-30).log()


@torch.no_grad()
def model_similarity(model: nn.Module, query_tokens: torch.Tensor, key_emb: torch.Tensor,
                     temperature: float = 1.0, available: torch.Tensor | None = None, layer: int = -1,
                     how: str = "mean") -> torch.Tensor:
    """Convenience for notebooks: per-head probabilities [B, Hq, K] of query tokens against key embeddings (made
    at the same `layer` with the same readout `how`)."""
    geo = head_geometry(model)
    q = query_embeddings(model, query_tokens, layer, how=how)
    return head_probabilities(q, key_emb, geo.num_query_heads, geo.num_kv_heads, temperature, available)
