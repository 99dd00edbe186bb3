"""Self-retrieval: can the similarity find a pair when the query *is* that pair's key? (EXPERIMENTS.md §7)

The choice can only learn what its similarity can express. Here each held-out unit's pairs 1..N-1 (pair 0 is the
in-context example, never a candidate) are the candidates, and pair j's key tokens are written as the query: the
same token ids a generated query of `tokens_per_query` tokens would be, embedded on the path a generated query
takes (`embeddings.query_embeddings`: the policy's q_proj at `similarity_layer`, the query's tokens alone as
DESIGN.md §2.1 settles, read out by `similarity_readout`), against the keys as `data.add_embeddings` makes them,
scored by `compute_similarity` (GQA per-head softmax, then the mean over heads) at `temperature`.

Figures over every (unit, pair) query: `top1` (share ranked first), `probability_ratio` (mean p(own pair) x the
candidates: 1 = uniform) and `entropy` (mean entropy / log(candidates): 1 = uniform). `sweep` computes them for
every layer x temperature x readout from one pass per side, each layer's projections captured by hooks.
Imports attnrl_core.checkpoint, .config, .data, .embeddings, .evaluate and .model.
"""

from __future__ import annotations

import contextlib
import math
from pathlib import Path

import matplotlib.pyplot as plt
import torch

from .checkpoint import latest_valid_checkpoint, load_adapter
from .config import TrainConfig
from .data import KeyValueBatch
from .embeddings import READOUTS, capture_output, compute_similarity, readout
from .evaluate import heldout_batch, unit_articles
from .model import base_model, decoder_layers, head_geometry, load_policy, resolve_device

SWEEP_TEMPERATURES = (1.0, 2.0, 4.0, 8.0)


def heldout_keys(cfg: TrainConfig, tokenizer, num_articles: int = 0, windows_per_article: int = 4) -> KeyValueBatch:
    """The held-out units (`evaluate.heldout_batch`'s, one row each); key embeddings are made here per setting."""
    if cfg.tokens_per_key != cfg.tokens_per_query:
        raise ValueError(f"tokens_per_key ({cfg.tokens_per_key}) != tokens_per_query ({cfg.tokens_per_query}): a key "
                         "written as the query must have a query's length; set them equal")
    no_embedding = lambda tokens: torch.zeros(tokens.shape[0], 1)  # noqa: E731 - `heldout_batch` wants one
    return heldout_batch(cfg, tokenizer, no_embedding, num_articles, seed=0, windows_per_article=windows_per_article)


def self_retrieval_probabilities(query_emb: torch.Tensor, key_emb: torch.Tensor, num_query_heads: int,
                                 num_kv_heads: int, temperature: float) -> torch.Tensor:
    """[U, C, C]: for unit u and query c (candidate c's key written as the query) the distribution over the unit's C
    candidates. query_emb [U, C, Hq*D] (or [U, C, T, Hq*D] per token), key_emb [U, C, Hkv*D] (or [U, C, T, Hkv*D])."""
    U, C = key_emb.shape[:2]
    assert query_emb.shape[:2] == (U, C), (query_emb.shape, key_emb.shape)
    q = query_emb.reshape(U * C, *query_emb.shape[2:])
    k = key_emb.repeat_interleave(C, dim=0)  # every query of a unit sees all its candidates
    return compute_similarity(q, k, num_query_heads, num_kv_heads, temperature).view(U, C, C)


def summarize_probabilities(probs: torch.Tensor, unit_ids: list[str]) -> dict:
    """probs [U, C, C] (row c: query = candidate c's key) -> the figures, and how many units/articles they rest on."""
    U, C, _ = probs.shape
    own = torch.arange(C)
    p_own = probs[:, own, own]  # [U, C]
    top1 = (probs.argmax(dim=-1) == own).float()  # [U, C]
    entropy = -(probs * probs.clamp_min(1e-30).log()).sum(dim=-1) / math.log(C)  # [U, C]
    return {"top1": float(top1.mean()), "probability_ratio": float((p_own * C).mean()), "entropy": float(entropy.mean()),
            "candidates": C, "queries": U * C, "units": U, "articles": len(set(unit_articles(unit_ids)))}


@contextlib.contextmanager
def _capture_all(model, projection: str):
    """Every decoder layer's `projection` (q_proj or k_proj) output, in a list in layer order."""
    layers = decoder_layers(model)
    with contextlib.ExitStack() as stack:
        captured = [stack.enter_context(capture_output(getattr(layer.self_attn, projection))) for layer in layers]
        yield captured


@torch.no_grad()
def layer_projections(model, tokens: torch.Tensor, chunk: int = 256) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """(per layer the policy's q_proj output, per layer the base model's k_proj output) for `tokens` [M, T] read
    alone, each [M, T, out] float32: one forward pass per side (adapter on for queries, off for keys)."""
    queries: list[list[torch.Tensor]] = [[] for _ in decoder_layers(model)]
    keys: list[list[torch.Tensor]] = [[] for _ in decoder_layers(model)]
    model.eval()
    for part in tokens.split(chunk):
        with _capture_all(model, "q_proj") as captured:
            model(input_ids=part, use_cache=False)
        for out, c in zip(queries, captured):
            out.append(c["output"].float())
        with base_model(model), _capture_all(model, "k_proj") as captured:
            model(input_ids=part, use_cache=False)
        for out, c in zip(keys, captured):
            out.append(c["output"].float())
    return [torch.cat(q) for q in queries], [torch.cat(k) for k in keys]


def load_for_retrieval(cfg: TrainConfig, run_dir: str | Path | None = None):
    """(model, tokenizer): the config's base model with its (zero) adapter, or a run's newest valid adapter."""
    device = resolve_device(cfg)
    model, tokenizer = load_policy(cfg, device)
    if run_dir is not None:
        path = latest_valid_checkpoint(Path(run_dir))
        if path is None:
            raise ValueError(f"{run_dir} has no valid checkpoint: train it first or drop --run_dir")
        load_adapter(path, model)
    return model, tokenizer


def sweep(model, batch: KeyValueBatch, layers: list[int] | None = None,
          temperatures: tuple[float, ...] = SWEEP_TEMPERATURES, readouts: tuple[str, ...] = READOUTS) -> list[dict]:
    """One row per (readout, layer, temperature): `summarize_probabilities`' figures of self-retrieval on `batch`'s
    units. `layers` (Python indices; default every layer)."""
    geo = head_geometry(model)
    U, N, T = batch.key_tokens.shape
    device = next(model.parameters()).device
    tokens = batch.key_tokens[:, 1:].reshape(U * (N - 1), T).to(device)  # the candidates' keys; as queries, too
    q_layers, k_layers = layer_projections(model, tokens)
    count = len(q_layers)
    rows = []
    for layer in (range(count) if layers is None else [i % count for i in layers]):
        for how in readouts:
            q = readout(q_layers[layer], how).reshape(U, N - 1, *([T] if how == "max" else []), -1)
            k = readout(k_layers[layer], how).reshape(U, N - 1, *([T] if how == "max" else []), -1)
            for temperature in temperatures:
                probs = self_retrieval_probabilities(q, k, geo.num_query_heads, geo.num_kv_heads, temperature)
                rows.append({"readout": how, "layer": layer, "temperature": temperature,
                             **summarize_probabilities(probs.cpu(), batch.article_ids)})
    return rows


def self_retrieval(model, batch: KeyValueBatch, cfg: TrainConfig) -> dict:
    """The figures at the config's setting (`similarity_layer`, `temperature`, `similarity_readout`)."""
    row = sweep(model, batch, [cfg.similarity_layer], (cfg.temperature,), (cfg.similarity_readout,))[0]
    return {**row, "layer": cfg.similarity_layer, "num_kv_pairs": cfg.num_kv_pairs}


def format_sweep(rows: list[dict]) -> str:
    head = f"{'readout':>7} {'layer':>5} {'temp':>5} {'top1':>6} {'p*n':>6} {'entropy':>7}"
    return "\n".join([head] + [f"{r['readout']:>7} {r['layer']:>5} {r['temperature']:>5g} {r['top1']:>6.3f} "
                               f"{r['probability_ratio']:>6.2f} {r['entropy']:>7.3f}" for r in rows])


def plot_sweep(rows: list[dict], chance: float | None = None):
    """Self-retrieval by layer, one column per readout, a line per temperature: the share of queries whose own pair
    ranks first (top row) and p(own pair) x candidates (bottom row: what sampling from the distribution gets)."""
    readouts = list(dict.fromkeys(r["readout"] for r in rows))
    temperatures = sorted({r["temperature"] for r in rows})
    fig, axes = plt.subplots(2, len(readouts), figsize=(4.2 * len(readouts), 6.2), sharey="row", sharex=True,
                             squeeze=False)
    for col, how in enumerate(readouts):
        for temperature in temperatures:
            sel = sorted((r for r in rows if r["readout"] == how and r["temperature"] == temperature),
                         key=lambda r: r["layer"])
            for row, key in enumerate(("top1", "probability_ratio")):
                axes[row][col].plot([r["layer"] for r in sel], [r[key] for r in sel], marker=".",
                                    label=f"temperature {temperature:g}")
        if chance is not None:
            axes[0][col].axhline(chance, color="grey", lw=0.8, ls=":", label="chance")
        axes[1][col].axhline(1.0, color="grey", lw=0.8, ls=":", label="uniform")
        axes[0][col].set_title(f"readout: {how}")
        axes[1][col].set_xlabel("similarity layer")
        axes[0][col].set_ylim(0, 1)
        for ax in axes[:, col]:
            ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("own pair ranked first (share)")
    axes[1][0].set_ylabel("p(own pair) x candidates")
    axes[0][-1].legend(fontsize=8, loc="upper left")
    fig.suptitle("Self-retrieval on held-out articles: a pair's key written as the query", fontsize=10)
    fig.tight_layout()
    return fig
