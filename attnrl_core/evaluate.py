"""Does the learned curriculum beat the baselines on articles training never saw? A paired evaluation.

Held-out units are non-overlapping windows of held-out articles (DESIGN: a hash of the article id,
`eval_fraction` of them, recorded in the run's config); each unit is rolled out `samples` times, each
row with its own seeded pool, four ways:

  trained    the trained policy: its queries and the attention selection (the method)
  untrained  the adapter switched off: the base model's queries, the same selection mechanism
  random     the trained policy's queries, but the next pair drawn uniformly from those left
  natural    the trained policy's queries, the pairs taken in article order (a reference)

The held-out articles and their order depend only on the corpus and `eval_fraction`
(`corpus.iter_heldout_articles`), so runs of every training seed are scored on the same units; the
evaluation's `seed` draws the pools and the rollouts only. Every method draws from its own
`torch.Generator` seeded alike and consumes the same draws (common random numbers, never the global
generators, so evaluating during training changes nothing in the run), on the same rows. The report
gives the differences trained - baseline of the normalised reward (and of the value log-prob) with 95%
intervals over *articles* (an article's windows are not independent draws: a cluster-robust t with articles - 1
degrees of freedom, `diagnostics.paired_difference`), the per-step
oracle (at every step the reward of every pair left is scored, given the trained policy's own history:
`oracle.fraction` = sum(chosen - mean) / sum(best - mean) is the share of the per-step selection gain
the trained policy captures; 0 = random, 1 = always the best pair of that step, which is not the best
order; its interval by the ratio's linearisation), the power of trained - random (the smallest effect
detectable at 80% and the articles 80% power at 0.01 and 0.02 needs), and every unit's values so that any
interval can be recomputed.
Imports attnrl_core.checkpoint, .config, .data, .diagnostics, .embeddings, .files, .host, .model,
.rollout, .rundir, .training, .trajectory and .viz.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import torch
from tqdm.auto import tqdm

from .checkpoint import latest_valid_checkpoint, load_adapter
from .config import TrainConfig
from .data import KeyValueBatch, add_embeddings, encode_separators, heldout_articles, iter_pair_batches
from .diagnostics import oracle_fraction, paired_difference, power_analysis, selection_entropy
from .embeddings import key_embedding_fn
from .files import atomic_write_text
from .host import keep_freed_memory, share_cpu, sharing_cpu
from .model import adapter_parameters, head_geometry, load_policy, resolve_device
from .rollout import decode_step_for, rollout, rollout_options
from .trajectory import Trajectory
from .rundir import load_run
from .training import swapped_parameters
from .viz import plot_evaluation

METHODS = ("trained", "untrained", "random", "natural")
SELECTOR = {"trained": "attention", "untrained": "attention", "random": "random", "natural": "natural"}


def heldout_batch(cfg: TrainConfig, tokenizer, embed_fn, num_articles: int, seed: int, windows_per_article: int = 1,
                  samples: int = 1) -> KeyValueBatch:
    """Rows for the first `num_articles` held-out articles (0: all) in the seed-independent held-out order:
    each article's first `windows_per_article` non-overlapping windows of `cfg.min_article_tokens` tokens
    that it is long enough for are units (id `ARTICLE#w`), and each unit is `samples` consecutive rows, with
    pools drawn from `seed`."""
    m = cfg.min_article_tokens
    articles = heldout_articles(cfg, tokenizer, num_articles, max_tokens=m * windows_per_article)
    units = [({**article, "id": f"{article['id']}#{w}"}, ids[w * m:(w + 1) * m])
             for article, ids in articles for w in range(len(ids) // m)]
    if not units:
        raise ValueError(f"no held-out article has {m} tokens: raise eval_fraction for new runs or lower num_kv_pairs")
    rows = [unit for unit in units for _ in range(samples)]
    generator = torch.Generator().manual_seed(seed)
    return next(add_embeddings(iter_pair_batches(rows, cfg, len(rows), generator=generator), embed_fn))


def unit_articles(unit_ids: list[str]) -> list[str]:
    """The article of each unit (`ARTICLE#window` -> `ARTICLE`): the cluster of the article-level bootstrap."""
    return [u.rsplit("#", 1)[0] for u in unit_ids]


def rollout_method(model, batch: KeyValueBatch, sep, geo, cfg: TrainConfig, method: str, seed: int,
                   chunk: int, oracle: bool = False, bar=None, decode_step=None) -> Trajectory:
    """One method's rollout of every row, in chunks of `chunk` rows, from its own generator seeded `seed`;
    the sampling logits are not kept (nothing trains on them). `bar` (tqdm) advances by the rows done."""
    device = batch.key_embeddings.device
    generator = torch.Generator(device=device).manual_seed(seed)
    kwargs = dict(**rollout_options(cfg, decode_step), selector=SELECTOR[method], generator=generator, oracle=oracle,
                  keep_query_logits=False)
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
        if bar is not None:
            bar.update(rows.batch_size)
    return parts[0] if len(parts) == 1 else Trajectory.concat(parts, batch)


def per_unit(values: torch.Tensor, samples: int) -> np.ndarray:
    """[rows, P] -> [units]: the mean over a unit's samples and steps (rows are unit-major)."""
    return values.float().cpu().reshape(-1, samples * values.shape[1]).mean(dim=1).numpy()


def compare_methods(model, batch: KeyValueBatch, sep, geo, cfg: TrainConfig, seed: int, samples: int = 1,
                    methods: tuple[str, ...] = METHODS, chunk: int = 32, progress: bool = False) -> dict:
    """Roll every row out with each method (the trained one with the oracle) and summarise: per method the
    means, per-step log-probs, selection entropy and seconds taken; trained - baseline paired over units
    with article-level intervals; the per-step oracle; the power of trained - random; every unit's values."""
    unit_ids = batch.article_ids[::samples]
    articles = unit_articles(unit_ids)
    trajs, seconds = {}, {}
    bar = tqdm(total=len(methods) * batch.batch_size, desc="evaluating", unit="rollout", disable=not progress,
               file=sys.stderr)
    decode = decode_step_for(cfg, batch.key_embeddings.device)  # one for every method's rollouts
    for m in methods:
        bar.set_postfix_str(m)
        t0 = time.perf_counter()
        trajs[m] = rollout_method(model, batch, sep, geo, cfg, m, seed, chunk, oracle=m == "trained", bar=bar,
                                  decode_step=decode)
        seconds[m] = time.perf_counter() - t0
    bar.close()
    summary = {"methods": {m: {"reward": float(t.rewards.float().mean()),
                               "logprob": float(t.policy_logprob.float().mean()),
                               "logprob_per_step": t.policy_logprob.float().mean(dim=0).tolist(),
                               "selection_entropy": _nan_to_none(selection_entropy(t.probabilities,
                                                                                   t.available_counts)),
                               "seconds": seconds[m], "pairs": t.choices.tolist()} for m, t in trajs.items()}}
    summary["selection_entropy"] = {m: r["selection_entropy"] for m, r in summary["methods"].items()}
    units = {m: {"reward": per_unit(t.rewards, samples), "logprob": per_unit(t.policy_logprob, samples)}
             for m, t in trajs.items()}
    summary["per_unit"] = {"unit_ids": unit_ids, "articles": articles,
                           **{m: {k: v.tolist() for k, v in u.items()} for m, u in units.items()}}
    oracle = None
    if "trained" in trajs:
        best, mean = trajs["trained"].candidate_best_and_mean()
        oracle = {"chosen": units["trained"]["reward"], "mean": per_unit(mean, samples), "best": per_unit(best, samples)}
        summary["per_unit"]["oracle"] = {k: v.tolist() for k, v in oracle.items()}
    summary.update(interval_summary(units, articles, seed, samples, oracle))
    return summary


ORACLE_DEFINITION = ("per step, given the trained policy's own history: best = the best pair left at that step "
                     "(not the best order), mean = a uniformly random choice among them")


def interval_summary(units: dict, articles: list[str], seed: int, samples: int, oracle: dict | None = None) -> dict:
    """From per-unit values (`units[method]` = {"reward", "logprob"} arrays over units; `oracle` = the per-step
    oracle's "chosen", "mean" and "best"): trained - baseline paired over units with intervals over `articles`,
    the oracle fraction, and the power of trained - random. What `compare_methods` reports and `rescore` redoes."""
    if "trained" not in units:
        return {}
    trained = units["trained"]
    out = {"paired": {f"trained-{m}": {
        **paired_difference(trained["reward"], u["reward"], seed=seed, clusters=articles),
        "logprob": paired_difference(trained["logprob"], u["logprob"], seed=seed, clusters=articles)}
        for m, u in units.items() if m != "trained"}}
    if oracle is not None:
        out["oracle"] = {**oracle_fraction(oracle["chosen"], oracle["mean"], oracle["best"], seed=seed,
                                           clusters=articles), "definition": ORACLE_DEFINITION}
    if "random" in units:
        out["power"] = {"comparison": "trained-random", "samples_per_unit": samples,
                        **power_analysis(out["paired"]["trained-random"])}
    return out


def rescore(report: dict) -> dict:
    """A saved report with its intervals and power recomputed from its per-unit values by today's methods (a
    report written before issue 37 carries percentile-bootstrap intervals, which under-cover at a dozen articles,
    and a half-width where the power belongs); `rescored` says so. The report on disk is not changed."""
    saved = report["per_unit"]
    units = {m: {k: np.asarray(v[k], dtype=np.float64) for k in ("reward", "logprob")} for m, v in saved.items()
             if m in METHODS}
    if "trained" not in units:
        return report
    oracle = {k: np.asarray(saved["oracle"][k], dtype=np.float64) for k in ("chosen", "mean", "best")} \
        if "oracle" in saved else None
    return {**report, **interval_summary(units, saved["articles"], report["seed"], report["samples_per_article"], oracle),
            "rescored": "intervals and power recomputed from the saved per-unit values"}


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
    embed = key_embedding_fn(model, device, layer=cfg.similarity_layer, how=cfg.similarity_readout)
    batch = heldout_batch(cfg, tokenizer, embed, num_articles, seed, windows_per_article, samples_per_article)
    units = batch.batch_size // samples_per_article
    results = compare_methods(model, batch, encode_separators(tokenizer), head_geometry(model), cfg, seed,
                              samples_per_article, chunk=chunk, progress=progress)
    report = {"run_dir": str(run_dir), "checkpoint": path.name, "units": units,
              "articles": len(set(unit_articles(batch.article_ids))), "windows_per_article": windows_per_article,
              "samples_per_article": samples_per_article, "num_articles": num_articles,
              "unit_ids": batch.article_ids[::samples_per_article],
              "seed": seed, "eval_fraction": cfg.eval_fraction, "steps": batch.pool.shape[1], **results}
    if write:
        out = run_dir / "eval"
        out.mkdir(exist_ok=True)
        atomic_write_text(out / f"{path.name}.json", json.dumps(report, indent=1))
        fig = plot_evaluation(report)
        fig.savefig(out / f"{path.name}.png", dpi=110)
        plt.close(fig)  # else a notebook that draws the report itself shows this figure a second time
    return report


def power_note(report: dict, min_articles: int = 10) -> str:
    """Whether the report's intervals can mean anything, in one sentence for a reader: trained - random's minimum
    detectable effect at 80% power (the report's `power`) and the articles 80% power against 0.02 and 0.01 nats
    per token would need. Fewer than `min_articles` never suffice: a t over 3 articles has 2 degrees of freedom."""
    p, n = report.get("power", {}), report["articles"]
    head = f"{n} held-out articles x {report['samples_per_article']} samples: "
    mde, need = p.get("minimum_detectable_effect"), p.get("articles_needed") or {}
    if "half_width" in p and "minimum_detectable_effect" not in p:  # a report from before issue 37 (a kept one)
        return head + (f"this report predates the power analysis: it sized a 95% half-width ({p['half_width']:.4f}), "
                       "not power; `experiment` recomputes the power from its per-unit values (summary.json).")
    if mde is None:
        sized = ("trained and random scored the same on every unit, or there are too few articles: no spread to size "
                 "an interval from")
        return head + sized + "; evaluate on more articles for evidence."
    if n < min_articles:  # a variance from so few articles sizes nothing: no article count is printed from it
        return head + (f"too few articles for the intervals above to mean anything (a t over {n} articles has {n - 1} "
                       f"degrees of freedom, and their spread is no estimate of the between-article variance the "
                       f"power rests on): read them as a check that the comparison runs; evaluate {min_articles} or "
                       "more articles (num_articles 0: all) for evidence.")
    sized = (f"trained-random's smallest effect detectable at 80% power is {mde:.4f} nats/token; 80% power against "
             f"0.02 needs about {need.get('0.02')} articles, against 0.01 about {need.get('0.01')}")
    return head + sized + f"; differences smaller than about {mde:.3f} can go undetected here."


def format_report(report: dict) -> str:
    ci = "[{:+.4f}, {:+.4f}]".format
    lines = [f"{report['run_dir']} {report['checkpoint']}: {report['units']} held-out units in {report['articles']} "
             f"articles (up to {report['windows_per_article']} windows each) x {report['samples_per_article']} samples, "
             f"{report['steps']} steps, seed {report['seed']}",
             f"{'method':10s} {'value log-prob':>15s} {'reward':>10s} {'selection entropy':>18s} {'seconds':>8s}"]
    for name, r in report["methods"].items():
        entropy = "n/a" if r["selection_entropy"] is None else f"{r['selection_entropy']:.3f}"
        lines.append(f"{name:10s} {r['logprob']:15.4f} {r['reward']:10.4f} {entropy:>18s} {r.get('seconds', 0):8.1f}")
    method = next(iter(report.get("paired", {}).values()), {}).get("method", "bootstrap")  # older reports: bootstrap
    lines.append(f"paired: 95% CI over the {report['articles']} articles by "
                 f"{'a cluster-robust t' if method == 't' else 'the percentile cluster bootstrap'}"
                 + (f" ({report['rescored']})" if report.get("rescored") else ""))
    lines.append(f"{'':30s} {'reward diff':>12s} {'95% CI':>22s} {'log-prob diff':>14s} {'95% CI':>22s}")
    for name, d in report.get("paired", {}).items():
        lines.append(f"{name:30s} {d['mean']:+12.4f} {ci(*d['ci']):>22s} {d['logprob']['mean']:+14.4f} "
                     f"{ci(*d['logprob']['ci']):>22s}")
    if "oracle" in report:
        o = report["oracle"]
        lines.append(f"per-step oracle fraction {o['fraction']:+.3f} {ci(*o['ci'])} (rewards: chosen {o['chosen']:+.4f}, "
                     f"random choice {o['mean']:+.4f}, best pair of each step {o['best']:+.4f}; 1 = the best pair at "
                     "every step given the policy's own history, not the best order)")
    if "power" in report:
        lines.append("power: " + power_note(report))
    return "\n".join(lines)
