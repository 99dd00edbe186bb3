"""The training loop: SPEC.md §3.1, from initialisation to the run directory.

`train(cfg)` initialises (model + adapter, data stream with key embeddings, 8-bit Adam, reward
statistics), then per episode rolls out a batch, filters it, updates the policy on the selected
trajectories, and logs; the run directory's format is `rundir`'s. Imports attnrl_core.accounting,
.checkpoint, .config, .corpus, .data, .embeddings, .evaluate, .files, .filtering, .host, .loss, .model,
.resilience, .rollout, .rundir, .tracking, .training and .viz.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .accounting import rollout_work, update_work
from .checkpoint import load_checkpoint, save_checkpoint
from .config import TrainConfig
from .corpus import DataPosition, longest_article_tokens
from .data import encode_separators, iter_key_value_batches, long_articles
from .embeddings import key_embedding_fn
from .evaluate import heldout_batch, trained_policy_score
from .files import append_jsonl, truncate_jsonl
from .host import (hardware_state, keep_freed_memory, peak_memory_bytes, reset_peak_memory, seed_everything,
                   share_cpu, sharing_cpu)
from .model import head_geometry, load_policy, load_tokenizer, resolve_device
from .resilience import FallbackState, rollout_resilient, update_resilient
from .rollout import rollout_options
from .rundir import episode_metrics, prepare_run_dir, trajectory_records, write_config
from .tracking import Trackers, parse_report_to
from .filtering import RunningStats, filter_batch
from .loss import advantages
from .training import make_optimizer, read_length, update_options
from .viz import save_run_figures

log = logging.getLogger("attnrl")


class _StopRequest:
    """SIGINT/SIGTERM during training: finish the current episode, checkpoint, and return cleanly."""

    def __init__(self) -> None:
        self.signal: int | None = None
        self._previous: dict = {}

    def __enter__(self) -> "_StopRequest":
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, _frame) -> None:
        if self.signal is not None:  # a second signal: stop now
            raise KeyboardInterrupt
        self.signal = signum
        log.warning("%s received: finishing this episode, then checkpointing (send again to abort)",
                    signal.Signals(signum).name)

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    @staticmethod
    def report(episode: int, out: Path) -> None:
        print(f"stopped after episode {episode} (checkpoint written); resume with:\n"
              f"  python -m attnrl_core train --resume --output_dir {out}")


def validate_inputs(cfg: TrainConfig, resume: bool):
    """Everything that can be checked before the model is loaded, in seconds: run directory, device,
    tokenizer (model name), dataset, and that some article is long enough.
    Returns (run dir, checkpoint to resume from or None, device, tokenizer)."""
    out, ckpt = prepare_run_dir(cfg, resume)
    device = resolve_device(cfg)
    try:
        tokenizer = load_tokenizer(cfg)
    except (OSError, ValueError) as e:
        raise ValueError(f"model {cfg.model_name!r} cannot be found ({str(e).splitlines()[0][:120]}): log in with "
                         "`hf auth login`, or set HF_HUB_OFFLINE=1 with the model already cached, "
                         "or use --preset embedded") from None
    longest = longest_article_tokens(cfg, tokenizer)
    if longest is not None and longest < cfg.min_article_tokens:
        raise ValueError(f"num_kv_pairs={cfg.num_kv_pairs} needs articles of {cfg.min_article_tokens} tokens, and the "
                         f"longest training article of {cfg.dataset_name} has {longest}: use num_kv_pairs <= "
                         f"{longest // cfg.tokens_per_kv_pair} or shorter chunks")
    next(long_articles(cfg, tokenizer))
    return out, ckpt, device, tokenizer


def _restore(out: Path, ckpt: Path, model, optimizer) -> tuple[RunningStats, int, DataPosition]:
    """Load a checkpoint and cut the logs back to it: (reward statistics, its episode, data position)."""
    state = load_checkpoint(ckpt, model, optimizer)
    stats = RunningStats()
    stats.load_state_dict(state["stats"])
    for name in ("metrics.jsonl", "trajectories.jsonl"):
        truncate_jsonl(out / name, state["episode"])
    log.info("resuming %s from %s", out, ckpt.name)
    return stats, state["episode"], DataPosition(**state["data_position"])


def train(cfg: TrainConfig, resume: bool = False, progress: bool = True) -> Path:
    """Run `cfg.num_episodes` episodes; return the run directory. Nothing is written before the inputs
    have been validated, and an existing run is only ever continued (`resume=True`), never overwritten."""
    out, ckpt, device, tokenizer = validate_inputs(cfg, resume)
    _prepare_host(cfg, device)
    # 1. Initialisation
    model, tokenizer = load_policy(cfg, device, tokenizer)
    sep, geo = encode_separators(tokenizer), head_geometry(model)
    optimizer = make_optimizer(model, cfg)
    stats, start, data_start = _restore(out, ckpt, model, optimizer) if ckpt else (RunningStats(), 0, DataPosition())
    write_config(out, cfg)
    embed = key_embedding_fn(model, device, layer=cfg.similarity_layer)
    batches = iter_key_value_batches(cfg, tokenizer, embed, start=data_start)
    sizes = FallbackState(cfg.generation_batch_size, cfg.training_batch_size, cfg.gradient_accumulation_steps)
    # the same held-out batch every time, so the eval_* curve is comparable across episodes
    heldout = heldout_batch(cfg, tokenizer, embed, cfg.eval_articles, cfg.seed) if cfg.eval_every else None
    describe = lambda: hardware_state(device)  # noqa: E731
    bar = tqdm(range(start, cfg.num_episodes), initial=start, total=cfg.num_episodes, desc="episodes",
               disable=not progress)
    trackers = Trackers(parse_report_to(cfg.report_to), out, cfg.to_dict(), resume=ckpt is not None,
                        first_step=start + 1)
    nonfinite_streak, episode = 0, start
    try:
        with _StopRequest() as stop, sharing_cpu(device):  # runs side by side share the cores
            for episode in (e + 1 for e in bar):
                share_cpu(cfg.num_threads)
                if device.type == "cuda":  # per-episode peaks; the CPU's VmHWM stays the process's peak
                    reset_peak_memory(device)
                t0 = time.perf_counter()
                batch = next(batches)
                # 2-3. trajectories and rewards
                traj = rollout_resilient(model, batch, sep, geo, sizes, describe, **rollout_options(cfg))
                t1 = time.perf_counter()
                rewards = traj.avg_reward.float().cpu()
                finite = bool(torch.isfinite(rewards).all())
                # 4. filtering against the statistics before this batch, then add the batch
                selected, threshold = filter_batch(rewards, stats, cfg.warmup_trajectories, cfg.filter_num_sd)
                advantage = advantages(rewards, cfg.reward_baseline, stats.mean, cfg.trajectories_per_article)
                upd = None
                if finite:
                    stats.update(rewards)
                    # 5-6. policy update on the selected trajectories
                    upd = update_resilient(model, optimizer, traj, selected, sizes, describe, rewards=advantage,
                                           **update_options(cfg))
                else:
                    selected = torch.zeros_like(selected)
                    log.warning("episode %d: non-finite reward; update skipped, statistics unchanged", episode)
                t2 = time.perf_counter()
                nonfinite_streak = _nonfinite_streak(nonfinite_streak, finite, upd, cfg.max_nonfinite)
                # 7. logging
                metrics = episode_metrics(episode, traj, selected, threshold, upd, stats, finite, (t1 - t0, t2 - t1),
                                          _tokens_read(traj, selected, upd), advantage,
                                          peak_memory_bytes=peak_memory_bytes(device), **vars(sizes))
                if heldout is not None and (episode % cfg.eval_every == 0 or episode == cfg.num_episodes):
                    metrics.update(trained_policy_score(model, heldout, sep, geo, cfg))
                _write_logs(out, trackers, metrics, trajectory_records(traj, tokenizer, episode, selected))
                _report(bar, metrics, cfg, upd)
                if episode % cfg.checkpoint_every == 0 or episode == cfg.num_episodes or stop.signal is not None:
                    save_checkpoint(out, episode, model, optimizer, {"stats": stats.state_dict(),
                                    "data_position": vars(batch.position)}, cfg.keep_checkpoints)
                if stop.signal is not None:
                    stop.report(episode, out)
                    break
    except Exception:
        log.error("training failed at episode %d; hardware state: %s", episode, hardware_state(device))
        raise
    finally:
        bar.close()
        trackers.close()
    save_run_figures(out)
    return out


def _prepare_host(cfg: TrainConfig, device: torch.device) -> None:
    seed_everything(cfg.seed)
    keep_freed_memory(device)


def _nonfinite_streak(streak: int, finite: bool, upd, limit: int) -> int:
    """Consecutive episodes with a non-finite reward, loss or gradient; the run stops at `limit`."""
    streak = 0 if finite and not (upd and upd.skipped_steps) else streak + 1
    if streak >= limit:
        raise RuntimeError(f"{streak} consecutive episodes with a non-finite reward, loss or gradient: lower "
                           "learning_rate, or use dtype float32 / bfloat16 instead of float16")
    return streak


def _write_logs(out: Path, trackers: Trackers, metrics: dict, records: list[dict]) -> None:
    append_jsonl(out / "metrics.jsonl", [metrics])
    append_jsonl(out / "trajectories.jsonl", records)
    trackers.log(metrics, metrics["episode"])


def _tokens_read(traj, selected: torch.Tensor, upd) -> int:
    """Tokens the model read this episode: the rollout's, and the update's when it ran."""
    tokens = rollout_work(traj).tokens
    if upd is not None:
        tokens += update_work(int(selected.sum()), read_length(traj.query_positions), traj.query_positions.numel(),
                              traj.query_logits is None).tokens
    return tokens


def _report(bar, metrics: dict, cfg: TrainConfig, upd) -> None:
    """The progress bar's postfix every episode; a console summary every `log_every` episodes."""
    episode, reward = metrics["episode"], metrics["reward"]
    if reward is not None:
        bar.set_postfix(reward=f"{reward:+.3f}", filt=f"{metrics['filter_fraction']:.2f}")
    if episode % cfg.log_every == 0 or episode == cfg.num_episodes:
        log.info("episode %d/%d  reward %s  running %+.4f±%.4f  selected %d  kl %s  %.1fs  %.0f tok/s",
                 episode, cfg.num_episodes, "nan" if reward is None else f"{reward:+.4f}", metrics["running_mean"],
                 metrics["running_std"], metrics["selected"], "n/a" if upd is None else f"{upd.kl:.2e}",
                 metrics["seconds"], metrics["tokens_per_second"])
