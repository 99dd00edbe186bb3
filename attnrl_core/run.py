"""The training run: config -> data -> model -> rollout -> training -> run directory.

`train(cfg)` reads like SPEC.md §3.1: initialise (model + adapter, data stream with key embeddings,
8-bit Adam, reward statistics), then per episode roll out a batch, filter it, update the policy on
the selected trajectories, and log. The run directory holds:

  config.json         TrainConfig.to_dict()
  metrics.jsonl       one line per episode; names documented in METRICS
  trajectories.jsonl  one line per trajectory: decoded queries, counterfactuals, chosen chunks, rewards
  checkpoints/        episode-N/ every `checkpoint_every` episodes and at the end (see checkpoint.py)
  figures/            reward curve, training panels, similarity distribution (PNG)
"""

from __future__ import annotations

import ctypes
import json
import logging
import platform
import random
import resource
import signal
import threading
import time
from pathlib import Path

import numpy as np
import torch

from .checkpoint import latest_valid_checkpoint, load_checkpoint, save_checkpoint
from .config import TrainConfig
from .data import DataPosition, encode_separators, iter_key_value_batches, iter_wikipedia_articles, tokenize_articles
from .embeddings import key_embedding_fn
from .model import adapter_parameters, head_geometry, load_policy, load_tokenizer, resolve_device
from .resilience import FallbackState, rollout_resilient, update_resilient
from .rollout import Trajectory
from .training import RunningStats, select_trajectories, selection_threshold

log = logging.getLogger("attnrl")

METRICS = {
    "episode": "episode number, from 1",
    "reward": "mean trajectory reward of the batch (policy minus base mean value log-prob)",
    "reward_std": "standard deviation of trajectory rewards in the batch",
    "policy_logprob": "mean value log-prob under the policy",
    "base_logprob": "mean value log-prob under the base model after its counterfactual query",
    "threshold": "selection threshold (running mean + filter_num_sd * running SD before the batch); null in warm-up",
    "selected": "trajectories selected for the update",
    "filter_fraction": "selected / generation_batch_size",
    "loss": "mean update loss over micro-batches (null when nothing was selected)",
    "policy_loss": "mean REINFORCE term (null when nothing was selected)",
    "kl": "mean summed KL(previous || current) per trajectory (null when nothing was selected)",
    "grad_norm": "mean pre-clip gradient norm over optimizer steps (null when nothing was selected)",
    "optimizer_steps": "optimizer steps taken this episode",
    "skipped_steps": "optimizer steps skipped for a non-finite loss or gradient",
    "running_mean": "running mean of all trajectory rewards after this batch",
    "running_std": "running SD of all trajectory rewards after this batch",
    "rollout_seconds": "seconds spent generating the batch",
    "update_seconds": "seconds spent in the update phase",
    "seconds": "seconds for the whole episode",
    "tokens_per_second": "tokens read by the model (rollout + update) per second",
    "peak_memory_bytes": "peak CUDA memory allocated (GPU) or peak resident set size (CPU)",
    "rollout_chunk": "trajectories rolled out together (below generation_batch_size after an out-of-memory)",
    "micro_batch": "update micro-batch size in use (halved, with accumulation doubled, after an out-of-memory)",
    "oom_events": "out-of-memory events survived so far",
    "eval_reward": "held-out reward of the trained policy (only every eval_every episodes)",
    "eval_logprob": "held-out mean value log-prob of the trained policy (only every eval_every episodes)",
}


def hardware_state(device: torch.device) -> str:
    if device.type == "cuda":
        gib = 1024**3
        return (f"CUDA {torch.cuda.get_device_name(device)}: allocated {torch.cuda.memory_allocated(device) / gib:.2f} GiB, "
                f"reserved {torch.cuda.memory_reserved(device) / gib:.2f} GiB, "
                f"peak {peak_memory_bytes(device) / gib:.2f} GiB")
    return f"CPU: peak RSS {peak_memory_bytes(device) / 1024**3:.2f} GiB, {torch.get_num_threads()} threads"


def peak_memory_bytes(device: torch.device) -> int:
    """Peak CUDA memory allocated (GPU) or peak resident set size of this process (CPU), since the last
    reset (`torch.cuda.reset_peak_memory_stats`; on Linux, writing 5 to /proc/self/clear_refs)."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    try:  # VmHWM follows a clear_refs reset; ru_maxrss (the fallback off Linux) does not
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def keep_freed_memory(device: torch.device) -> bool:
    """On a CPU under glibc, have malloc keep the memory it frees for reuse instead of returning it to the
    system; returns whether it did (a process-wide setting, idempotent).

    glibc serves every block above 32 MB with a fresh `mmap` and unmaps it when freed, so each large
    tensor, a [rows, vocabulary] logits tensor or an activation of the update, page-faults all of its
    pages in again every time: about 15% of a rollout and 10-20% of an update on the development CPU
    (BENCHMARKS.md). Served from the heap and not trimmed, freed blocks are reused. The price is that
    the process keeps up to its peak resident size, which it reaches again every episode anyway.
    """
    if device.type != "cpu" or platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    m_trim_threshold, m_mmap_max = -1, -4  # <malloc.h>
    libc = ctypes.CDLL("libc.so.6")
    return bool(libc.mallopt(m_mmap_max, 0)) and bool(libc.mallopt(m_trim_threshold, 2**31 - 1))


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def make_optimizer(model, cfg: TrainConfig):
    import bitsandbytes as bnb

    return bnb.optim.Adam8bit(adapter_parameters(model), lr=cfg.learning_rate)


def trajectory_records(traj: Trajectory, tokenizer, episode: int, selected: torch.Tensor) -> list[dict]:
    """Decoded text of every step, one record per trajectory (for trajectories.jsonl)."""
    batch = traj.batch
    rewards = traj.rewards.tolist()
    decode = tokenizer.batch_decode
    per_step = [{"query": decode(s.query_tokens), "counterfactual": decode(s.counterfactual_tokens),
                 "pair": s.selected.tolist(), "prob": s.selected_prob.tolist(), "probs": s.probabilities.tolist(),
                 "policy_logprob": s.policy_logprob.tolist(), "base_logprob": s.base_logprob.tolist(),
                 "value": decode(batch.value_tokens[torch.arange(batch.batch_size), s.selected.cpu()])}
                for s in traj.steps]
    first_keys, first_values = decode(batch.key_tokens[:, 0]), decode(batch.value_tokens[:, 0])
    records = []
    for b in range(batch.batch_size):
        steps = [{"step": t, **{k: v[b] for k, v in s.items()}, "reward": rewards[b][t]} for t, s in enumerate(per_step)]
        records.append({"episode": episode, "trajectory": b, "article_id": batch.article_ids[b],
                        "title": batch.titles[b], "reward": sum(rewards[b]) / len(rewards[b]),
                        "selected": bool(selected[b]), "pool": batch.pool[b].tolist(),
                        "example_key": first_keys[b], "example_value": first_values[b], "steps": steps})
    return records


def _append_jsonl(path: Path, rows: list[dict]) -> None:
    with open(path, "a") as fh:
        for row in rows:
            fh.write(json.dumps(row) + "\n")


def _truncate_jsonl(path: Path, last_episode: int) -> None:
    """Keep only lines of episodes <= last_episode (logs written after the checkpoint are redone)."""
    if path.exists():
        lines = [ln for ln in path.read_text().splitlines() if ln and json.loads(ln)["episode"] <= last_episode]
        path.write_text("".join(ln + "\n" for ln in lines))


def read_jsonl(path: Path) -> list[dict]:
    path = Path(path)
    return [json.loads(ln) for ln in path.read_text().splitlines() if ln] if path.exists() else []


def project_path(*parts: str) -> Path:
    """A path in this checkout (runs/, figures/) whatever the working directory — notebooks run from
    notebooks/ under nbmake and from anywhere under papermill. Falls back to the working directory."""
    root = Path(__file__).resolve().parents[1]
    return (root if (root / "pyproject.toml").is_file() else Path.cwd()).joinpath(*parts)


def default_run_dir(preset: str) -> Path:
    return project_path("runs", f"{preset}-{time.strftime('%Y%m%d-%H%M%S')}")


def load_run(run_dir: str | Path) -> tuple[TrainConfig, list[dict], list[dict]]:
    """(config, metrics, trajectories) of a run directory, for notebooks and analysis."""
    run_dir = Path(run_dir)
    if not (run_dir / "config.json").is_file():
        raise ValueError(f"{str(run_dir)!r} is not a run directory (no config.json)")
    cfg = TrainConfig.from_file(run_dir / "config.json")
    return cfg, read_jsonl(run_dir / "metrics.jsonl"), read_jsonl(run_dir / "trajectories.jsonl")


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
    articles = iter_wikipedia_articles(cfg)
    next(tokenize_articles(articles, tokenizer, cfg.min_article_tokens, cfg.max_scan_articles, batch_size=1))
    return out, ckpt, device, tokenizer


def train(cfg: TrainConfig, resume: bool = False, progress: bool = True) -> Path:
    """Run `cfg.num_episodes` episodes; return the run directory. Nothing is written before the inputs
    have been validated, and an existing run is only ever continued (`resume=True`), never overwritten."""
    from tqdm.auto import tqdm

    out, ckpt, device, tokenizer = validate_inputs(cfg, resume)
    seed_everything(cfg.seed)
    keep_freed_memory(device)

    # 1. Initialisation
    model, tokenizer = load_policy(cfg, device, tokenizer)
    sep, geo = encode_separators(tokenizer), head_geometry(model)
    optimizer = make_optimizer(model, cfg)
    stats, start_episode, data_start = RunningStats(), 0, DataPosition()
    if ckpt is not None:
        state = load_checkpoint(ckpt, model, optimizer)
        stats.load_state_dict(state["stats"])
        start_episode, data_start = state["episode"], DataPosition(**state["data_position"])
        for name in ("metrics.jsonl", "trajectories.jsonl"):
            _truncate_jsonl(out / name, start_episode)
        log.info("resuming %s from %s", out, ckpt.name)
    (out / "figures").mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2))
    batches = iter_key_value_batches(cfg, tokenizer, key_embedding_fn(model, device), start=data_start)
    sizes = FallbackState(cfg.generation_batch_size, cfg.training_batch_size, cfg.gradient_accumulation_steps)
    heldout = None
    if cfg.eval_every:  # the same held-out batch every time, so the eval_* curve is comparable across episodes
        from .evaluate import compare_methods, heldout_batch

        heldout = heldout_batch(cfg, tokenizer, key_embedding_fn(model, device), cfg.eval_articles, cfg.seed)
    describe = lambda: hardware_state(device)  # noqa: E731

    def checkpoint(episode: int, position: DataPosition) -> None:
        save_checkpoint(out, episode, model, optimizer,
                        {"stats": stats.state_dict(), "data_position": vars(position)}, cfg.keep_checkpoints)

    bar = tqdm(range(start_episode, cfg.num_episodes), initial=start_episode, total=cfg.num_episodes,
               desc="episodes", disable=not progress)
    nonfinite_streak, episode = 0, start_episode
    try:
        with _StopRequest() as stop:
            for episode in (e + 1 for e in bar):
                if device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats(device)
                t0 = time.perf_counter()
                batch = next(batches)
                # 2-3. trajectories and rewards
                traj = rollout_resilient(model, batch, sep, geo, sizes, describe, tokens_per_query=cfg.tokens_per_query,
                                         temperature=cfg.temperature, query_temperature=cfg.query_temperature)
                t1 = time.perf_counter()
                rewards = traj.avg_reward.float().cpu()
                finite = bool(torch.isfinite(rewards).all())
                # 4. filtering against the statistics before this batch, then add the batch
                threshold = selection_threshold(stats, cfg.warmup_trajectories, cfg.filter_num_sd)
                selected = select_trajectories(rewards, stats, cfg.warmup_trajectories, cfg.filter_num_sd)
                upd = None
                if finite:
                    stats.update(rewards)
                    # 5-6. policy update on the selected trajectories
                    upd = update_resilient(model, optimizer, traj, selected, sizes, describe, beta=cfg.kl_beta,
                                           max_grad_norm=cfg.max_grad_norm, temperature=cfg.query_temperature)
                else:
                    selected = torch.zeros_like(selected)
                    log.warning("episode %d: non-finite reward; update skipped, statistics unchanged", episode)
                t2 = time.perf_counter()
                nonfinite_streak = 0 if finite and not (upd and upd.skipped_steps) else nonfinite_streak + 1
                if nonfinite_streak >= cfg.max_nonfinite:
                    raise RuntimeError(f"{nonfinite_streak} consecutive episodes with a non-finite reward, loss or "
                                       f"gradient: lower learning_rate, or use dtype float32 / bfloat16 instead of float16")
                # 7. logging
                n_sel = int(selected.sum())
                metrics = {
                    "episode": episode, "reward": rewards.mean().item() if finite else None,
                    "reward_std": rewards.std(unbiased=False).item() if finite else None,
                    "policy_logprob": torch.stack([s.policy_logprob for s in traj.steps]).mean().item(),
                    "base_logprob": torch.stack([s.base_logprob for s in traj.steps]).mean().item(),
                    "threshold": threshold, "selected": n_sel, "filter_fraction": n_sel / batch.batch_size,
                    "loss": upd.loss if upd else None, "policy_loss": upd.policy_loss if upd else None,
                    "kl": upd.kl if upd else None, "grad_norm": upd.grad_norm if upd else None,
                    "optimizer_steps": upd.optimizer_steps if upd else 0,
                    "skipped_steps": (upd.skipped_steps if upd else 0) + (0 if finite else 1),
                    "running_mean": stats.mean, "running_std": stats.std,
                    "rollout_seconds": t1 - t0, "update_seconds": t2 - t1, "seconds": t2 - t0,
                    "tokens_per_second": (traj.forward_tokens + (upd.trained_tokens if upd else 0)) / (t2 - t0),
                    "peak_memory_bytes": peak_memory_bytes(device),
                    "rollout_chunk": sizes.rollout_chunk, "micro_batch": sizes.micro_batch,
                    "oom_events": sizes.oom_events, "eval_reward": None, "eval_logprob": None,
                }
                if heldout is not None and (episode % cfg.eval_every == 0 or episode == cfg.num_episodes):
                    ev = compare_methods(model, heldout, sep, geo, cfg, cfg.seed, methods=("trained",))["trained"]
                    metrics.update(eval_reward=ev["reward"], eval_logprob=ev["logprob"])
                _append_jsonl(out / "metrics.jsonl", [metrics])
                _append_jsonl(out / "trajectories.jsonl", trajectory_records(traj, tokenizer, episode, selected))
                if finite:
                    bar.set_postfix(reward=f"{metrics['reward']:+.3f}", filt=f"{metrics['filter_fraction']:.2f}")
                if episode % cfg.log_every == 0 or episode == cfg.num_episodes:
                    log.info("episode %d/%d  reward %s  running %+.4f±%.4f  selected %d  kl %s  %.1fs  %.0f tok/s",
                             episode, cfg.num_episodes, "nan" if not finite else f"{metrics['reward']:+.4f}",
                             stats.mean, stats.std, n_sel, "n/a" if upd is None else f"{upd.kl:.2e}",
                             metrics["seconds"], metrics["tokens_per_second"])
                if episode % cfg.checkpoint_every == 0 or episode == cfg.num_episodes or stop.signal is not None:
                    checkpoint(episode, batch.position)
                if stop.signal is not None:
                    print(f"stopped after episode {episode} (checkpoint written); resume with:\n"
                          f"  python -m attnrl_core train --resume --output_dir {out}")
                    break
    except Exception:
        log.error("training failed at episode %d; hardware state: %s", episode, hardware_state(device))
        raise
    finally:
        bar.close()
    from .viz import save_run_figures

    save_run_figures(out)
    return out

