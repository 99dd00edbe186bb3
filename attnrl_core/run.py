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

import json
import logging
import random
import resource
import time
from pathlib import Path

import numpy as np
import torch

from .checkpoint import latest_valid_checkpoint, load_checkpoint, save_checkpoint
from .config import TrainConfig
from .data import DataPosition, encode_separators, iter_key_value_batches
from .embeddings import key_embedding_fn
from .model import adapter_parameters, head_geometry, load_policy, resolve_device
from .rollout import Trajectory, rollout
from .training import RunningStats, select_trajectories, selection_threshold, update_policy

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
}


def hardware_state(device: torch.device) -> str:
    if device.type == "cuda":
        gib = 1024**3
        return (f"CUDA {torch.cuda.get_device_name(device)}: allocated {torch.cuda.memory_allocated(device) / gib:.2f} GiB, "
                f"reserved {torch.cuda.memory_reserved(device) / gib:.2f} GiB, "
                f"peak {torch.cuda.max_memory_allocated(device) / gib:.2f} GiB")
    return f"CPU: peak RSS {peak_memory_bytes(device) / 1024**3:.2f} GiB, {torch.get_num_threads()} threads"


def peak_memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


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


def train(cfg: TrainConfig, resume: bool = False, progress: bool = True) -> Path:
    """Run `cfg.num_episodes` episodes; return the run directory."""
    from tqdm.auto import tqdm

    out, ckpt = prepare_run_dir(cfg, resume)
    device = resolve_device(cfg)  # before any write: a bad --device must not create the run
    seed_everything(cfg.seed)

    # 1. Initialisation
    model, tokenizer = load_policy(cfg, device)
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

    def checkpoint(episode: int, position: DataPosition) -> None:
        save_checkpoint(out, episode, model, optimizer,
                        {"stats": stats.state_dict(), "data_position": vars(position)})

    bar = tqdm(range(start_episode, cfg.num_episodes), initial=start_episode, total=cfg.num_episodes,
               desc="episodes", disable=not progress)
    position = data_start
    try:
        for episode in (e + 1 for e in bar):
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            t0 = time.perf_counter()
            batch = next(batches)
            position = batch.position
            # 2-3. trajectories and rewards
            traj = rollout(model, batch, sep, geo, tokens_per_query=cfg.tokens_per_query,
                           temperature=cfg.temperature, query_temperature=cfg.query_temperature)
            t1 = time.perf_counter()
            # 4. filtering against the statistics before this batch, then add the batch
            rewards = traj.avg_reward.float().cpu()
            threshold = selection_threshold(stats, cfg.warmup_trajectories, cfg.filter_num_sd)
            selected = select_trajectories(rewards, stats, cfg.warmup_trajectories, cfg.filter_num_sd)
            stats.update(rewards)
            # 5-6. policy update on the selected trajectories
            upd = update_policy(model, optimizer, traj, selected, training_batch_size=cfg.training_batch_size,
                                gradient_accumulation_steps=cfg.gradient_accumulation_steps, beta=cfg.kl_beta,
                                max_grad_norm=cfg.max_grad_norm, temperature=cfg.query_temperature)
            t2 = time.perf_counter()
            # 7. logging
            n_sel = int(selected.sum())
            metrics = {
                "episode": episode, "reward": rewards.mean().item(), "reward_std": rewards.std(unbiased=False).item(),
                "policy_logprob": torch.stack([s.policy_logprob for s in traj.steps]).mean().item(),
                "base_logprob": torch.stack([s.base_logprob for s in traj.steps]).mean().item(),
                "threshold": threshold, "selected": n_sel, "filter_fraction": n_sel / batch.batch_size,
                "loss": upd.loss if upd else None, "policy_loss": upd.policy_loss if upd else None,
                "kl": upd.kl if upd else None, "grad_norm": upd.grad_norm if upd else None,
                "optimizer_steps": upd.optimizer_steps if upd else 0, "skipped_steps": upd.skipped_steps if upd else 0,
                "running_mean": stats.mean, "running_std": stats.std,
                "rollout_seconds": t1 - t0, "update_seconds": t2 - t1, "seconds": t2 - t0,
                "tokens_per_second": (traj.forward_tokens + (upd.trained_tokens if upd else 0)) / (t2 - t0),
                "peak_memory_bytes": peak_memory_bytes(device),
            }
            _append_jsonl(out / "metrics.jsonl", [metrics])
            _append_jsonl(out / "trajectories.jsonl", trajectory_records(traj, tokenizer, episode, selected))
            bar.set_postfix(reward=f"{metrics['reward']:+.3f}", filt=f"{metrics['filter_fraction']:.2f}")
            if episode % cfg.log_every == 0 or episode == cfg.num_episodes:
                log.info("episode %d/%d  reward %+.4f (sd %.4f)  running %+.4f±%.4f  selected %d  kl %s  %.1fs  %.0f tok/s",
                         episode, cfg.num_episodes, metrics["reward"], metrics["reward_std"], stats.mean, stats.std,
                         n_sel, "n/a" if upd is None else f"{upd.kl:.2e}", metrics["seconds"],
                         metrics["tokens_per_second"])
            if episode % cfg.checkpoint_every == 0 or episode == cfg.num_episodes:
                checkpoint(episode, position)
    except Exception:
        log.error("training failed; hardware state: %s", hardware_state(device))
        raise
    finally:
        bar.close()
    from .viz import save_run_figures

    save_run_figures(out)
    return out

