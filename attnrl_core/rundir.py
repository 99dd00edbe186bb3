"""The run directory's format: what a run writes, what each metric means, and how to read a run back.

  config.json         TrainConfig.to_dict()
  metrics.jsonl       one line per episode; names and meanings in METRICS, built by `episode_metrics`
  trajectories.jsonl  one line per trajectory (`trajectory_records`): decoded queries, counterfactuals,
                      chosen chunks, probabilities, rewards
  checkpoints/        episode-N/ (see checkpoint.py)
  figures/            reward curve, training panels, similarity distribution (PNG)
  eval/               episode-N.json and .png from `evaluate`

Notebooks, the evaluation and the figures read runs through this module, never through the loop.
Imports attnrl_core.config, .checkpoint, .diagnostics, .files and .filtering (the trajectory, statistics and
update types for hints only).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from .checkpoint import latest_valid_checkpoint
from .config import TrainConfig
from .diagnostics import key_cosine, oracle_fraction, query_distinct, selection_entropy, selection_top_ratio
from .files import atomic_write_text, read_jsonl
from .filtering import warmup_message

if TYPE_CHECKING:
    from .trajectory import Trajectory
    from .filtering import RunningStats
    from .training import ChoiceStepResult, HindsightResult, UpdateResult

METRICS = {
    "episode": "episode number, from 1",
    "reward": "mean trajectory reward of the batch (policy minus base mean value log-prob)",
    "reward_std": "standard deviation of trajectory rewards in the batch",
    "policy_logprob": "mean value log-prob under the policy",
    "base_logprob": "mean value log-prob under the base model after its counterfactual query",
    "adapter_reward": "part of the reward the adapter alone adds: policy minus base model value log-prob, both after "
                      "the policy's query (reward = adapter_reward + query_reward)",
    "query_reward": "part of the reward the query adds: base model value log-prob after the policy's query minus after "
                    "the counterfactual query",
    "threshold": "selection threshold (running mean + filter_num_sd * running SD before the batch); null in warm-up",
    "selected": "trajectories selected for the update",
    "selected_negative": "selected trajectories whose loss factor (reward, less any reward_baseline) is negative: "
                         "their queries are made less likely",
    "advantage": "mean loss factor R of the selected trajectories (the reward less any reward_baseline; null when "
                 "nothing was selected)",
    "value_nll": "mean value NLL of the selected trajectories in the update (only with value_nll_weight > 0)",
    "filter_fraction": "selected / generation_batch_size",
    "loss": "mean update loss per selected trajectory (null when nothing was selected)",
    "policy_loss": "mean REINFORCE term per selected trajectory (null when nothing was selected)",
    "kl": "mean summed KL(previous || current) per trajectory (null when nothing was selected)",
    "grad_norm": "mean pre-clip gradient norm over optimizer steps (null when nothing was selected)",
    "optimizer_steps": "optimizer steps taken this episode",
    "skipped_steps": "optimizer steps skipped for a non-finite loss or gradient",
    "running_mean": "running mean of all trajectory rewards after this batch",
    "running_std": "running SD of all trajectory rewards after this batch",
    "rollout_seconds": "seconds spent generating the batch",
    "update_seconds": "seconds spent in the update phase",
    "seconds": "seconds for the whole episode",
    "tokens_per_second": "tokens read by the model (rollout + update, all processes) per second",
    "tokens_per_second_per_device": "tokens_per_second / the number of processes (devices) of a data-parallel run: "
                                    "the figure other RL trainers report",
    "peak_memory_bytes": "peak CUDA memory allocated (GPU) or peak resident set size (CPU); process 0's in a "
                         "data-parallel run; on CUDA beside it each phase's peaks, rollout_/update_peak_allocated_bytes "
                         "and rollout_/update_peak_reserved_bytes, and outside_allocator_bytes (`host.phase_memory`)",
    "rollout_chunk": "trajectories rolled out together (below generation_batch_size after an out-of-memory); per "
                     "process in a data-parallel run (generation_batch_size / processes at most)",
    "micro_batch": "update micro-batch size in use (halved, with accumulation doubled, after an out-of-memory)",
    "accumulation": "micro-batches accumulated per optimizer step in use (doubled after an update out-of-memory)",
    "oom_events": "out-of-memory events survived so far (process 0's in a data-parallel run)",
    "selection_entropy": "mean over trajectories and steps of the selection distribution's entropy / log(pairs left): "
                         "1 = uniform (the query does not steer), 0 = deterministic; steps with one pair left excluded",
    "selection_top_ratio": "mean of (largest selection probability x pairs left): 1 = uniform, larger = peaked",
    "key_cosine": "mean pairwise cosine of the key embeddings in a trajectory's pool (near 1: keys alike, "
                  "so no query can tell them apart)",
    "query_distinct": "distinct query-token bigrams / all bigrams in the batch (falling: queries collapse to one text)",
    "oracle_fraction": "training batch's per-step oracle fraction: sum(chosen - mean) / sum(best - mean) over its "
                       "trajectories and steps, where best and mean are the best and the average reward of the pairs "
                       "left at the step (0 = random choice, 1 = the best pair every step); only when every pair is "
                       "scored (choice_target_weight > 0), process 0's rows in a data-parallel run",
    "target_oracle_fraction": "oracle_fraction measured on the selection objective's own score of each pair "
                              "(choice_target_score: the reward, equal to oracle_fraction, or the policy's value "
                              "log-prob); only when every pair is scored",
    "choice_kl": "selection objective: mean over trajectories of sum_steps KL(softmax(r_candidates / tau) || p_select), "
                 "measured in its step (only with choice_target_weight > 0)",
    "choice_grad_norm": "pre-clip gradient norm of the selection objective's first step (only with choice_target_weight > 0)",
    "choice_kl_last": "choice_kl measured in the last of the episode's choice_target_steps passes, before that step "
                      "(equal to choice_kl for one step; only with choice_target_weight > 0)",
    "hindsight_nll": "hindsight on the query: mean over trajectories of the sum over steps of the policy's mean NLL of "
                     "the best-scored pair's key as the query, before the first of its hindsight_steps steps (only with "
                     "hindsight_weight > 0)",
    "hindsight_nll_last": "hindsight_nll measured in the last of the episode's hindsight_steps passes, before that "
                          "step (equal to hindsight_nll for one step; only with hindsight_weight > 0)",
    "eval_reward": "held-out reward of the trained policy (only every eval_every episodes)",
    "eval_logprob": "held-out mean value log-prob of the trained policy (only every eval_every episodes)",
}


def episode_metrics(episode: int, traj: "Trajectory", selected: torch.Tensor, threshold: float | None,
                    upd: "UpdateResult | None", stats: "RunningStats", finite: bool, seconds: tuple[float, float],
                    tokens: int, advantage: torch.Tensor, devices: int = 1, **extra) -> dict:
    """One line of metrics.jsonl, every key of METRICS. `seconds` is (rollout, update); `tokens` what the
    model read in both, on all `devices`; `advantage` [B] the loss's factor R; `extra` holds the run's own
    fields (memory, fallback sizes, evaluation)."""
    rewards = traj.avg_reward.float()
    n_sel = int(selected.sum())
    chosen = advantage.float().cpu()[selected.cpu()]
    rollout_s, update_s = seconds
    row = {
        "episode": episode, "reward": rewards.mean().item() if finite else None,
        "reward_std": rewards.std(unbiased=False).item() if finite else None,
        "policy_logprob": traj.policy_logprob.float().mean().item(),
        "base_logprob": traj.base_logprob.float().mean().item(),
        "adapter_reward": traj.adapter_reward.float().mean().item(),
        "query_reward": traj.query_reward.float().mean().item(),
        "threshold": threshold, "selected": n_sel, "filter_fraction": n_sel / traj.batch_size,
        "selected_negative": int((chosen < 0).sum()), "advantage": chosen.mean().item() if n_sel else None,
        "value_nll": upd.value_nll if upd else None,
        "loss": upd.loss if upd else None, "policy_loss": upd.policy_loss if upd else None,
        "kl": upd.kl if upd else None, "grad_norm": upd.grad_norm if upd else None,
        "optimizer_steps": upd.optimizer_steps if upd else 0,
        "skipped_steps": (upd.skipped_steps if upd else 0) + (0 if finite else 1),
        "running_mean": stats.mean, "running_std": stats.std,
        "rollout_seconds": rollout_s, "update_seconds": update_s, "seconds": rollout_s + update_s,
        "tokens_per_second": tokens / (rollout_s + update_s),
        "tokens_per_second_per_device": tokens / ((rollout_s + update_s) * devices),
        **selection_diagnostics(traj), "eval_reward": None, "eval_logprob": None,
        **extra,
    }
    assert set(METRICS) <= set(row), set(METRICS) - set(row)
    return row


def choice_metrics(traj: "Trajectory", choice: "ChoiceStepResult | None", score: str = "reward",
                   hindsight: "HindsightResult | None" = None) -> dict:
    """oracle_fraction, target_oracle_fraction, choice_kl, choice_grad_norm, choice_kl_last, hindsight_nll and
    hindsight_nll_last (METRICS) of a batch rolled out with its candidates scored, of the selection objective's step
    (whose target is `score`, `choice_target_score`) and of the query's hindsight step; null where absent."""
    fractions = {"oracle_fraction": None, "target_oracle_fraction": None}
    if traj.candidate_rewards is not None:
        for name, s in (("oracle_fraction", "reward"), ("target_oracle_fraction", score)):
            chosen = traj.candidate_scores(s)[0].float().cpu().flatten().numpy()
            best, mean = (x.cpu().flatten().numpy() for x in traj.candidate_best_and_mean(s))
            fraction = oracle_fraction(chosen, mean, best, num_samples=1)["fraction"]
            fractions[name] = fraction if math.isfinite(fraction) else None
    return {**fractions, "choice_kl": choice.kl if choice else None,
            "choice_grad_norm": choice.grad_norm if choice else None,
            "choice_kl_last": choice.kl_last if choice else None,
            "hindsight_nll": hindsight.nll if hindsight else None,
            "hindsight_nll_last": hindsight.nll_last if hindsight else None}


def selection_diagnostics(traj: "Trajectory") -> dict:
    """What the policy controls: selection_entropy, selection_top_ratio, key_cosine, query_distinct (METRICS);
    null where undefined (every step forced, or a pool of one pair)."""
    values = {"selection_entropy": selection_entropy(traj.probabilities, traj.available_counts),
              "selection_top_ratio": selection_top_ratio(traj.probabilities, traj.available_counts),
              # per-token keys (the late-interaction readout) compared by their mean, as SPEC's pooled keys are
              "key_cosine": key_cosine(keys if (keys := traj.batch.key_embeddings).ndim == 3 else keys.mean(dim=2),
                                       traj.batch.pool),
              "query_distinct": query_distinct(traj.queries)}
    return {k: v if math.isfinite(v) else None for k, v in values.items()}


def trajectory_records(traj: "Trajectory", tokenizer, episode: int, selected: torch.Tensor) -> list[dict]:
    """Decoded text of every step, one record per trajectory (for trajectories.jsonl)."""
    batch, B, P = traj.batch, traj.batch_size, traj.num_steps
    decode = tokenizer.batch_decode
    rows = traj.choices.cpu()
    values = batch.value_tokens[torch.arange(B)[:, None], rows]  # [B, P, Tv]
    text = {"query": decode(traj.queries.flatten(0, 1)), "counterfactual": decode(traj.counterfactuals.flatten(0, 1)),
            "value": decode(values.flatten(0, 1))}  # B*P strings each, row-major
    numbers = {"pair": traj.choices, "prob": traj.choice_probs, "probs": traj.probabilities,
               "policy_logprob": traj.policy_logprob, "base_logprob": traj.base_logprob,
               "base_same_logprob": traj.base_same_logprob, "reward": traj.rewards}
    if traj.candidate_rewards is not None:
        numbers["candidate_rewards"] = traj.candidate_rewards
    numbers = {k: v.float().tolist() if k != "pair" else v.tolist() for k, v in numbers.items()}
    if "candidate_rewards" in numbers:  # JSON has no NaN: a pair not left at the step (NaN) is null
        numbers["candidate_rewards"] = [[[None if math.isnan(r) else r for r in step] for step in row]
                                        for row in numbers["candidate_rewards"]]
    first_keys, first_values = decode(batch.key_tokens[:, 0]), decode(batch.value_tokens[:, 0])
    return [{"episode": episode, "trajectory": b, "article_id": batch.article_ids[b], "title": batch.titles[b],
             "reward": sum(numbers["reward"][b]) / P, "selected": bool(selected[b]), "pool": batch.pool[b].tolist(),
             "example_key": first_keys[b], "example_value": first_values[b],
             "steps": [{"step": t, **{k: v[b * P + t] for k, v in text.items()},
                        **{k: v[b][t] for k, v in numbers.items()}} for t in range(P)]}
            for b in range(B)]


def _small(x: float) -> str:
    """+0.1234, or in 2 significant digits below 0.00005: an adapter a few updates old moves the log-prob by
    1e-5-1e-4, which at 4 decimals reads +0.0000, as if nothing had been trained."""
    return f"{x:+.4f}" if x == 0 or abs(x) >= 5e-5 else f"{x:+.1e}"


def format_step(record: dict, step: int) -> str:
    """One step of a trajectory record (trajectories.jsonl) as a person reads it: the context the policy saw,
    its query and the counterfactual, the pair it chose and with what probability, and the step's reward
    split into what the adapter and what the query added (runs before the split was recorded show the sum)."""
    s = record["steps"][step]
    context = [f"[example] {record['example_key']}{record['example_value']}"]
    context += [f"[step {p['step']}] Query:{p['query']}  ->  pair {p['pair']}: {p['value']}"
                for p in record["steps"][:step]]
    reward = f"reward {s['reward']:+.4f} nats per value token"
    if "base_same_logprob" in s:
        reward += (f" = adapter {_small(s['policy_logprob'] - s['base_same_logprob'])}"
                   f" + query {_small(s['base_same_logprob'] - s['base_logprob'])}")
    return "\n".join([
        f"{record['title']} (article {record['article_id']}), episode {record['episode']}, trajectory "
        f"{record['trajectory']}, step {step} of {len(record['steps'])}; trajectory reward {record['reward']:+.4f}"
        f" ({'selected' if record['selected'] else 'not selected'})",
        "context so far:", *("  " + line for line in context),
        f"policy's query:        {s['query']}", f"counterfactual query:  {s['counterfactual']}",
        f"chose pair {s['pair']} with probability {s['prob']:.3f}: {s['value']}",
        f"value log-prob: policy {s['policy_logprob']:+.4f}, base after the counterfactual {s['base_logprob']:+.4f}",
        reward])


def load_reports(run_dir: str | Path) -> dict[str, dict]:
    """The evaluation reports `evaluate` saved in run_dir/eval/, by checkpoint name, oldest episode first."""
    files = sorted(Path(run_dir, "eval").glob("episode-*.json"), key=lambda f: int(f.stem.split("-")[1]))
    return {f.stem: json.loads(f.read_text()) for f in files}


def report_rows(reports: dict[str, dict]) -> list[dict]:
    """One row per report for a table: its size, each paired difference (trained - baseline reward) and the
    per-step oracle fraction with their 95% intervals over articles, and how wide those intervals are."""
    rows = []
    for name, r in reports.items():
        row = {"checkpoint": name, "articles": r["articles"], "units": r["units"],
               "samples": r["samples_per_article"]}
        for pair, d in r.get("paired", {}).items():
            row[pair] = f"{d['mean']:+.4f} [{d['ci'][0]:+.4f}, {d['ci'][1]:+.4f}]"
        if "oracle" in r:
            o = r["oracle"]
            row["oracle fraction"] = f"{o['fraction']:+.2f} [{o['ci'][0]:+.2f}, {o['ci'][1]:+.2f}]"
        # reports before the power analysis gave a half-width instead of a minimum detectable effect
        mde = r.get("power", {}).get("minimum_detectable_effect")
        row["trained-random detectable at 80%"] = None if mde is None else round(mde, 4)
        rows.append(row)
    return rows


def write_config(run_dir: Path, cfg: TrainConfig) -> None:
    """Create the run directory (with figures/) if needed and write config.json atomically."""
    (Path(run_dir) / "figures").mkdir(parents=True, exist_ok=True)
    atomic_write_text(Path(run_dir) / "config.json", json.dumps(cfg.to_dict(), indent=2))


def load_run(run_dir: str | Path) -> tuple[TrainConfig, list[dict], list[dict]]:
    """(config, metrics, trajectories) of a run directory, for notebooks and analysis."""
    run_dir = Path(run_dir)
    if not (run_dir / "config.json").is_file():
        raise ValueError(f"{str(run_dir)!r} is not a run directory (no config.json)")
    cfg = TrainConfig.from_file(run_dir / "config.json")
    return cfg, read_jsonl(run_dir / "metrics.jsonl"), read_jsonl(run_dir / "trajectories.jsonl")


def run_summary(cfg: TrainConfig, metrics: list[dict]) -> str:
    """A run's end in plain text (episodes, final reward, selected, seconds), saying so when it never left the
    warm-up: a notebook reopened after papermill keeps this, not the progress widget's state."""
    if not metrics:
        return "no episode logged yet"
    last = metrics[-1]
    selected = sum(m["selected"] for m in metrics)
    trained = sum(1 for m in metrics if m.get("loss") is not None)
    reward = "nan" if last["reward"] is None else f"{last['reward']:+.4f}"
    lines = [f"episodes {last['episode']} of {cfg.num_episodes}, final reward {reward} (running mean "
             f"{last['running_mean']:+.4f} ± {last['running_std']:.4f}), {selected} trajectories selected "
             f"({trained} episodes with an update), {sum(m['seconds'] for m in metrics):.0f} s"]
    if last.get("threshold") is None:
        seen = cfg.generation_batch_size * sum(m["reward"] is not None for m in metrics)  # finite batches only count
        lines.append(f"{warmup_message(seen, cfg.warmup_trajectories)}: the first {max(cfg.warmup_trajectories, 2)} "
                     "trajectories only feed the reward statistics (warmup_trajectories); run more episodes or "
                     "lower warmup_trajectories to see training")
    return "\n".join(lines)


def prepare_run_dir(cfg: TrainConfig, resume: bool) -> tuple[Path, Path | None]:
    """(run dir, checkpoint to resume from). Refuses to touch an existing run unless resuming."""
    out = Path(cfg.output_dir)
    if resume:
        ckpt = latest_valid_checkpoint(out)
        if ckpt is None:
            raise ValueError(f"--resume: no valid checkpoint in {out}/checkpoints: start a new run without --resume")
        return out, ckpt
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"output_dir {str(out)!r} exists and is not empty: pass --resume to continue it "
                         f"or choose a new --output_dir")
    return out, None
