"""The naive reference path: SPEC.md read plainly, for the benchmark and the tests to check the cached
rollout against. Every step re-encodes the whole context with `generate` (policy, then the base
model for the counterfactual), scores the value with separate full forward passes, and loops over
heads for the similarity. Greedy, so its choices and rewards must equal `rollout.rollout(greedy=True)`.
Imports attnrl_core.data, .embeddings, .model and .rollout.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from transformers import GenerationConfig

from .data import KeyValueBatch, Separators
from .embeddings import query_embeddings
from .model import HeadGeometry, base_model
from .rollout import initial_context


# -- the path ------------------------------------------------------------------------
def _naive_generate(model, context: torch.Tensor, num_tokens: int) -> torch.Tensor:
    config = GenerationConfig(max_new_tokens=num_tokens, do_sample=False, eos_token_id=None, pad_token_id=0,
                              bos_token_id=None)
    return model.generate(context, attention_mask=torch.ones_like(context), generation_config=config)[:, -num_tokens:]


def _naive_value_logprob(model, sequence: torch.Tensor, num_value_tokens: int) -> torch.Tensor:
    logits = model(input_ids=sequence, use_cache=False).logits[:, -num_value_tokens - 1:-1].float()
    return F.log_softmax(logits, -1).gather(-1, sequence[:, -num_value_tokens:, None]).squeeze(-1).mean(1)


def _naive_similarity(q: torch.Tensor, k: torch.Tensor, geo: HeadGeometry, temperature: float,
                      available: torch.Tensor) -> torch.Tensor:
    B, K, _ = k.shape
    D, G = geo.head_dim, geo.group_size
    probs = torch.zeros(B, K, device=q.device)
    for h in range(geo.num_query_heads):
        g = h // G
        scores = torch.bmm(q[:, None, h * D:(h + 1) * D].float(), k[:, :, g * D:(g + 1) * D].float().transpose(1, 2))
        scores = (scores.squeeze(1) / math.sqrt(D) * temperature).masked_fill(~available, float("-inf"))
        probs += F.softmax(scores, dim=-1) / geo.num_query_heads
    return probs


@torch.inference_mode()
def naive_rollout(model, batch: KeyValueBatch, sep: Separators, geo: HeadGeometry, tokens_per_query: int,
                  similarity_temperature: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy rollout without caches across steps: (chosen pairs [B, P], rewards [B, P])."""
    model.eval()
    device = batch.key_embeddings.device
    B, N, _ = batch.key_tokens.shape
    rows = torch.arange(B, device=device)
    values = batch.value_tokens.to(device)
    q_sep, r_sep = sep.query.to(device).expand(B, -1), sep.response.to(device).expand(B, -1)
    available = torch.zeros(B, N, dtype=torch.bool, device=device)
    available[rows[:, None], batch.pool.to(device)] = True
    context = initial_context(batch, sep, device)
    chosen, rewards = [], []
    for _ in range(batch.pool.shape[1]):
        prompt = torch.cat([context, q_sep], dim=1)
        query = _naive_generate(model, prompt, tokens_per_query)
        probs = _naive_similarity(query_embeddings(model, query), batch.key_embeddings, geo, similarity_temperature,
                                  available)
        choice = probs.argmax(dim=1)
        available[rows, choice] = False
        value = values[rows, choice]
        step = torch.cat([prompt, query, r_sep, value], dim=1)
        policy_lp = _naive_value_logprob(model, step, value.shape[1])
        with base_model(model):
            cf = _naive_generate(model, prompt, tokens_per_query)
            base_lp = _naive_value_logprob(model, torch.cat([prompt, cf, r_sep, value], dim=1), value.shape[1])
        chosen.append(choice)
        rewards.append(policy_lp - base_lp)
        context = step
    return torch.stack(chosen, 1), torch.stack(rewards, 1)
