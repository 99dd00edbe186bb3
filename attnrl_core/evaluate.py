"""Does the learned curriculum beat the baselines on articles training never saw?

On held-out articles (DESIGN: a hash of the article id, `eval_fraction` of them, recorded in the run's
config), the same batch — same first pair, same pools, same seed — is rolled out four ways:

  trained    the trained policy: its queries and the attention selection (the method)
  untrained  the adapter switched off: the base model's queries, the same selection mechanism
  random     the trained policy's queries, but the next pair drawn uniformly from those left
  natural    the trained policy's queries, the pairs taken in article order (a reference)

Each reports the mean value log-prob per step under the model that wrote the context, and the
normalised reward exactly as training defines it (minus the base model's log-prob after its own
counterfactual query), with 95% bootstrap confidence intervals over articles.

Every method starts from the same RNG state (common random numbers): the comparison is paired, and
where two selection distributions are close (a barely trained policy) they make the same choices.
Imports attnrl_core.checkpoint, .config, .data, .embeddings, .files, .host, .model, .rollout, .rundir,
.training and .viz.
"""

from __future__ import annotations

import itertools
import json
import logging
from pathlib import Path

import numpy as np
import torch

from .checkpoint import latest_valid_checkpoint, load_adapter
from .config import TrainConfig
from .data import add_embeddings, encode_separators, iter_pair_batches, long_articles
from .embeddings import key_embedding_fn
from .files import atomic_write_text
from .host import keep_freed_memory
from .model import adapter_parameters, head_geometry, load_policy, resolve_device
from .rollout import rollout
from .rundir import load_run
from .training import swapped_parameters
from .viz import plot_evaluation

log = logging.getLogger("attnrl")
METHODS = ("trained", "untrained", "random", "natural")


def heldout_batch(cfg: TrainConfig, tokenizer, embed_fn, num_articles: int, seed: int):
    """One batch of up to `num_articles` held-out articles (one pass, never repeated), with seeded pools."""
    tokenized = list(itertools.islice(long_articles(cfg, tokenizer, split="eval", passes=1), num_articles))
    if not tokenized:
        raise ValueError(f"no held-out article has {cfg.min_article_tokens} tokens: raise eval_fraction for "
                         "new runs or lower num_kv_pairs")
    generator = torch.Generator().manual_seed(seed)
    return next(add_embeddings(iter_pair_batches(tokenized, cfg, len(tokenized), generator=generator), embed_fn))


def bootstrap_ci(values: np.ndarray, num_samples: int = 2000, seed: int = 0) -> tuple[float, float]:
    """95% percentile bootstrap interval of the mean over the first axis."""
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(values), size=(num_samples, len(values)))
    means = values[idx].mean(axis=1)
    return float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))


def compare_methods(model, batch, sep, geo, cfg: TrainConfig, seed: int,
                    methods: tuple[str, ...] = METHODS) -> dict[str, dict]:
    """Roll the same batch out with each method from the same RNG state; summarise each. The caller's
    RNG state is left as it was (evaluation during training must not change the training run)."""
    params = adapter_parameters(model)
    results = {}
    with torch.random.fork_rng(devices=[]):
        for method in methods:
            results[method] = _score_method(model, batch, sep, geo, cfg, seed, method, params)
    return results


def trained_policy_score(model, batch, sep, geo, cfg: TrainConfig) -> dict:
    """The loop's `eval_reward` and `eval_logprob`: the trained policy on a held-out batch."""
    result = compare_methods(model, batch, sep, geo, cfg, cfg.seed, methods=("trained",))["trained"]
    return {"eval_reward": result["reward"], "eval_logprob": result["logprob"]}


def _score_method(model, batch, sep, geo, cfg: TrainConfig, seed: int, method: str, params) -> dict:
    """One method's rollout of the batch, from `seed`, summarised."""
    torch.manual_seed(seed)
    kwargs = dict(tokens_per_query=cfg.tokens_per_query, similarity_temperature=cfg.temperature,
                  query_temperature=cfg.query_temperature,
                  selector={"trained": "attention", "untrained": "attention"}.get(method, method))
    if method == "untrained":  # a zero adapter is exactly the base model
        with swapped_parameters(params, [torch.zeros_like(p) for p in params]):
            traj = rollout(model, batch, sep, geo, **kwargs)
    else:
        traj = rollout(model, batch, sep, geo, **kwargs)
    logprob = traj.policy_logprob.float().cpu().numpy()  # [M, P]
    reward = traj.rewards.float().cpu().numpy()  # [M, P]
    return {
        "logprob": float(logprob.mean()), "logprob_ci": bootstrap_ci(logprob.mean(axis=1), seed=seed),
        "reward": float(reward.mean()), "reward_ci": bootstrap_ci(reward.mean(axis=1), seed=seed),
        "logprob_per_step": logprob.mean(axis=0).tolist(),
        "pairs": traj.choices.tolist(),
        "context_start": traj.tokens[:, :traj.initial_length].tolist(),
        "pool": batch.pool.tolist(),
    }


def evaluate(run_dir: str | Path, checkpoint: int | None = None, num_articles: int = 16, seed: int = 0,
             write: bool = True) -> dict:
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
    model, tokenizer = load_policy(cfg, device)
    load_adapter(path, model)
    batch = heldout_batch(cfg, tokenizer, key_embedding_fn(model, device), num_articles, seed)
    results = compare_methods(model, batch, encode_separators(tokenizer), head_geometry(model), cfg, seed)
    report = {"run_dir": str(run_dir), "checkpoint": path.name, "num_articles": batch.batch_size,
              "article_ids": batch.article_ids, "seed": seed, "eval_fraction": cfg.eval_fraction,
              "steps": batch.pool.shape[1], "methods": results}
    if write:
        out = run_dir / "eval"
        out.mkdir(exist_ok=True)
        atomic_write_text(out / f"{path.name}.json", json.dumps(report, indent=1))
        fig = plot_evaluation(report)
        fig.savefig(out / f"{path.name}.png", dpi=110)
    return report


def format_report(report: dict) -> str:
    lines = [f"{report['run_dir']} {report['checkpoint']}: {report['num_articles']} held-out articles, "
             f"{report['steps']} steps, seed {report['seed']}",
             f"{'method':10s} {'value log-prob':>15s} {'95% CI':>20s} {'reward':>10s} {'95% CI':>20s}"]
    for name, r in report["methods"].items():
        lines.append(f"{name:10s} {r['logprob']:15.4f} {'[%.4f, %.4f]' % tuple(r['logprob_ci']):>20s} "
                     f"{r['reward']:10.4f} {'[%.4f, %.4f]' % tuple(r['reward_ci']):>20s}")
    return "\n".join(lines)
