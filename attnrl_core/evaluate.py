"""Does the learned curriculum beat the baselines on articles training never saw? A paired evaluation.

Held-out units are non-overlapping windows of held-out articles (DESIGN: a hash of the article id,
`eval_fraction` of them, recorded in the run's config); each unit is rolled out `samples` times, each
row with its own seeded pool, four ways:

  trained    the trained policy: its queries and the attention selection (the method)
  untrained  the adapter switched off: the base model's queries, the same selection mechanism
  random     the trained policy's queries, but the next pair drawn uniformly from those left
  natural    the trained policy's queries, the pairs taken in article order (a reference)

Every method draws from its own `torch.Generator` seeded alike (common random numbers, never the
global generators, so evaluating during training changes nothing in the run), on the same rows. The
report gives, per unit, the differences trained - baseline of the normalised reward (and of the value
log-prob) with 95% bootstrap intervals over units, and the oracle: at every step the reward of every
pair left is scored, so `oracle.fraction` = sum(chosen - mean) / sum(best - mean) over units is the
share of the available selection gain the trained policy captures (0 = random, 1 = the oracle).
Imports attnrl_core.checkpoint, .config, .data, .diagnostics, .embeddings, .files, .host, .model,
.rollout, .rundir, .training, .trajectory and .viz.
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from .checkpoint import latest_valid_checkpoint, load_adapter
from .config import TrainConfig
from .data import KeyValueBatch, add_embeddings, encode_separators, iter_pair_batches, long_articles
from .diagnostics import oracle_fraction, paired_difference, selection_entropy
from .embeddings import key_embedding_fn
from .files import atomic_write_text
from .host import keep_freed_memory, share_cpu, sharing_cpu
from .model import adapter_parameters, head_geometry, load_policy, resolve_device
from .rollout import rollout, rollout_options
from .trajectory import Trajectory
from .rundir import load_run
from .training import swapped_parameters
from .viz import plot_evaluation

METHODS = ("trained", "untrained", "random", "natural")
SELECTOR = {"trained": "attention", "untrained": "attention", "random": "random", "natural": "natural"}


def heldout_batch(cfg: TrainConfig, tokenizer, embed_fn, num_articles: int, seed: int, windows_per_article: int = 1,
                  samples: int = 1) -> KeyValueBatch:
    """Rows for up to `num_articles` held-out articles (one pass, never repeated): each article's first
    `windows_per_article` non-overlapping windows of `cfg.min_article_tokens` tokens that it is long
    enough for are units, and each unit is `samples` consecutive rows, with seeded pools."""
    m = cfg.min_article_tokens
    articles = long_articles(cfg, tokenizer, split="eval", passes=1, max_tokens=m * windows_per_article)
    units = [({**article, "id": f"{article['id']}#{w}"}, ids[w * m:(w + 1) * m])
             for article, ids in itertools.islice(articles, num_articles) for w in range(len(ids) // m)]
    if not units:
        raise ValueError(f"no held-out article has {m} tokens: raise eval_fraction for new runs or lower num_kv_pairs")
    rows = [unit for unit in units for _ in range(samples)]
    generator = torch.Generator().manual_seed(seed)
    return next(add_embeddings(iter_pair_batches(rows, cfg, len(rows), generator=generator), embed_fn))


def rollout_method(model, batch: KeyValueBatch, sep, geo, cfg: TrainConfig, method: str, seed: int,
                   chunk: int, oracle: bool = False) -> Trajectory:
    """One method's rollout of every row, in chunks of `chunk` rows, from its own generator seeded `seed`."""
    device = batch.key_embeddings.device
    generator = torch.Generator(device=device).manual_seed(seed)
    kwargs = dict(**rollout_options(cfg), selector=SELECTOR[method], generator=generator, oracle=oracle)
    B = batch.batch_size
    params = adapter_parameters(model)
    parts = []
    for start in range(0, B, chunk):
        rows = batch.rows(start, min(start + chunk, B))
        if method == "untrained":  # a zero adapter is exactly the base model
            with swapped_parameters(params, [torch.zeros_like(p) for p in params]):
                parts.append(rollout(model, rows, sep, geo, **kwargs))
        else:
            parts.append(rollout(model, rows, sep, geo, **kwargs))
    return parts[0] if len(parts) == 1 else Trajectory.concat(parts, batch)


def per_unit(values: torch.Tensor, samples: int) -> np.ndarray:
    """[rows, P] -> [units]: the mean over a unit's samples and steps (rows are unit-major)."""
    return values.float().cpu().reshape(-1, samples * values.shape[1]).mean(dim=1).numpy()


def compare_methods(model, batch: KeyValueBatch, sep, geo, cfg: TrainConfig, seed: int, samples: int = 1,
                    methods: tuple[str, ...] = METHODS, chunk: int = 32, progress: bool = False) -> dict:
    """Roll every row out with each method (the trained one with the oracle) and summarise: per method the
    means, per-step log-probs and selection entropy; trained - baseline paired over units; the oracle."""
    trajs = {m: rollout_method(model, batch, sep, geo, cfg, m, seed, chunk, oracle=m == "trained")
             for m in tqdm(methods, desc="methods", disable=not progress)}
    summary = {"methods": {m: {"reward": float(t.rewards.float().mean()),
                               "logprob": float(t.policy_logprob.float().mean()),
                               "logprob_per_step": t.policy_logprob.float().mean(dim=0).tolist(),
                               "selection_entropy": _nan_to_none(selection_entropy(t.probabilities,
                                                                                   t.available_counts)),
                               "pairs": t.choices.tolist()} for m, t in trajs.items()}}
    summary["selection_entropy"] = {m: r["selection_entropy"] for m, r in summary["methods"].items()}
    if "trained" in trajs:
        trained = trajs["trained"]
        summary["paired"] = {f"trained-{m}": {
            **paired_difference(per_unit(trained.rewards, samples), per_unit(t.rewards, samples), seed=seed),
            "logprob": paired_difference(per_unit(trained.policy_logprob, samples),
                                         per_unit(t.policy_logprob, samples), seed=seed)}
            for m, t in trajs.items() if m != "trained"}
        summary["oracle"] = oracle_summary(trained, samples, seed)
    return summary


def oracle_summary(traj: Trajectory, samples: int, seed: int) -> dict:
    """`oracle_fraction` over units of the chosen, mean (= a uniformly random choice) and best rewards."""
    cand = traj.candidate_rewards.float()  # [rows, P, N], NaN where not available
    best = cand.nan_to_num(float("-inf")).amax(dim=2)
    mean = cand.nanmean(dim=2)
    return oracle_fraction(per_unit(traj.rewards, samples), per_unit(mean, samples), per_unit(best, samples),
                           seed=seed)


def _nan_to_none(x: float) -> float | None:
    return None if x != x else x


def trained_policy_score(model, batch: KeyValueBatch, sep, geo, cfg: TrainConfig) -> dict:
    """The loop's `eval_reward` and `eval_logprob`: the trained policy on a held-out batch."""
    result = compare_methods(model, batch, sep, geo, cfg, cfg.seed, methods=("trained",))["methods"]["trained"]
    return {"eval_reward": result["reward"], "eval_logprob": result["logprob"]}


def evaluate(run_dir: str | Path, checkpoint: int | None = None, num_articles: int = 16, seed: int = 0,
             samples_per_article: int = 4, windows_per_article: int = 4, chunk: int = 32, write: bool = True,
             progress: bool = True) -> dict:
    """Score a run's checkpoint against the baselines; write DIR/eval/episode-N.{json,png}."""
    run_dir = Path(run_dir)
    cfg, _, _ = load_run(run_dir)
    if checkpoint is None:
        path = latest_valid_checkpoint(run_dir)
        if path is None:
            raise ValueError(f"{run_dir} has no valid checkpoint to evaluate: train it first")
    else:
        path = run_dir / "checkpoints" / f"episode-{checkpoint}"
        if not path.is_dir():
            raise ValueError(f"{path} does not exist: pick one of {run_dir / 'checkpoints'}")
    device = resolve_device(cfg)
    keep_freed_memory(device)
    with sharing_cpu(device):
        share_cpu(cfg.num_threads)
        return _evaluate_checkpoint(cfg, run_dir, path, device, num_articles, seed, samples_per_article,
                                    windows_per_article, chunk, write, progress)


def _evaluate_checkpoint(cfg: TrainConfig, run_dir: Path, path: Path, device: torch.device, num_articles: int,
                         seed: int, samples_per_article: int, windows_per_article: int, chunk: int, write: bool,
                         progress: bool) -> dict:
    model, tokenizer = load_policy(cfg, device)
    load_adapter(path, model)
    embed = key_embedding_fn(model, device, layer=cfg.similarity_layer)
    batch = heldout_batch(cfg, tokenizer, embed, num_articles, seed, windows_per_article, samples_per_article)
    units = batch.batch_size // samples_per_article
    results = compare_methods(model, batch, encode_separators(tokenizer), head_geometry(model), cfg, seed,
                              samples_per_article, chunk=chunk, progress=progress)
    report = {"run_dir": str(run_dir), "checkpoint": path.name, "units": units,
              "articles": len({i.split("#")[0] for i in batch.article_ids}), "windows_per_article": windows_per_article,
              "samples_per_article": samples_per_article, "unit_ids": batch.article_ids[::samples_per_article],
              "seed": seed, "eval_fraction": cfg.eval_fraction, "steps": batch.pool.shape[1], **results}
    if write:
        out = run_dir / "eval"
        out.mkdir(exist_ok=True)
        atomic_write_text(out / f"{path.name}.json", json.dumps(report, indent=1))
        plot_evaluation(report).savefig(out / f"{path.name}.png", dpi=110)
    return report


def format_report(report: dict) -> str:
    ci = "[{:+.4f}, {:+.4f}]".format
    lines = [f"{report['run_dir']} {report['checkpoint']}: {report['units']} held-out units ({report['articles']} "
             f"articles x up to {report['windows_per_article']} windows) x {report['samples_per_article']} samples, "
             f"{report['steps']} steps, seed {report['seed']}",
             f"{'method':10s} {'value log-prob':>15s} {'reward':>10s} {'selection entropy':>18s}"]
    for name, r in report["methods"].items():
        entropy = "n/a" if r["selection_entropy"] is None else f"{r['selection_entropy']:.3f}"
        lines.append(f"{name:10s} {r['logprob']:15.4f} {r['reward']:10.4f} {entropy:>18s}")
    lines.append(f"{'paired (per unit)':22s} {'reward diff':>12s} {'95% CI':>22s} {'log-prob diff':>14s} {'95% CI':>22s}")
    for name, d in report.get("paired", {}).items():
        lines.append(f"{name:22s} {d['mean']:+12.4f} {ci(*d['ci']):>22s} {d['logprob']['mean']:+14.4f} "
                     f"{ci(*d['logprob']['ci']):>22s}")
    if "oracle" in report:
        o = report["oracle"]
        lines.append(f"oracle fraction {o['fraction']:+.3f} {ci(*o['ci'])} (rewards: chosen {o['chosen']:+.4f}, "
                     f"random choice {o['mean']:+.4f}, best {o['best']:+.4f})")
    return "\n".join(lines)
