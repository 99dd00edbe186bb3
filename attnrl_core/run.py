"""The training loop: SPEC.md §3.1, from initialisation to the run directory.

`train(cfg)` initialises (model + adapter, data stream with key embeddings, 8-bit Adam, reward
statistics), then per episode rolls out a batch, filters it, updates the policy on the selected
trajectories, and logs; the run directory's format is `rundir`'s. Imports attnrl_core.accounting,
.checkpoint, .config, .corpus, .data, .distributed, .embeddings, .evaluate, .files, .filtering, .host, .loss, .memory,
.model, .resilience, .rollout, .rundir, .tracking, .training and .viz.
"""

from __future__ import annotations

import hashlib
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
from . import distributed
from .data import add_embeddings, encode_separators, iter_key_value_batches, long_articles
from .distributed import Ranks, launched_ranks
from .embeddings import key_embedding_fn
from .evaluate import heldout_batch, trained_policy_score
from .files import append_jsonl, truncate_jsonl
from .host import (hardware_state, keep_freed_memory, peak_memory_bytes, phase_memory, reset_peak_memory,
                   seed_everything, share_cpu, sharing_cpu)
from .model import head_geometry, load_policy, load_tokenizer, resolve_device, resolve_dtype
from .resilience import FallbackState, rollout_resilient, update_resilient
from .rollout import decode_step_for, rollout_options
from .rundir import choice_metrics, episode_metrics, prepare_run_dir, trajectory_records, write_config
from .tracking import Trackers, parse_report_to
from .filtering import RunningStats, filter_batch, warmup_episodes, warmup_message
from .loss import advantages
from .memory import (GB, ModelShape, SequenceShape, card_spend, choose_sizes, detected_arch, expandable_segments,
                     has_bfloat16, refused_message, use_expandable_segments)
from .training import choice_target_options, hindsight_options, make_optimizer, read_length, update_options
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
    device = resolve_device(cfg)
    check_card(cfg, device)
    out, ckpt = prepare_run_dir(cfg, resume)
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


def check_card(cfg: TrainConfig, device: torch.device, arch: tuple[int, int] | None = None, name: str = "") -> None:
    """On CUDA, before the model loads: a card without bfloat16 (below sm80: T4, V100) refuses a bfloat16 run in one
    line that names the dtypes that work (`memory.refused_message`); float16 runs as asked. `arch`/`name`: the
    card's, asked from CUDA when None."""
    if device.type != "cuda":
        return
    if arch is None:
        arch, name = torch.cuda.get_device_capability(device), torch.cuda.get_device_name(device)
    if resolve_dtype(cfg, device) == torch.bfloat16 and not has_bfloat16(arch):
        raise ValueError(refused_message(arch, name))


def _restore(out: Path, ckpt: Path, model, optimizer, ranks: Ranks) -> tuple[RunningStats, int, DataPosition]:
    """Load a checkpoint and cut the logs back to it: (reward statistics, its episode, data position)."""
    state = load_checkpoint(ckpt, model, optimizer)
    stats = RunningStats()
    stats.load_state_dict(state["stats"])
    if ranks.main:
        for name in ("metrics.jsonl", "trajectories.jsonl"):
            truncate_jsonl(out / name, state["episode"])
        log.info("resuming %s from %s", out, ckpt.name)
    return stats, state["episode"], DataPosition(**state["data_position"])


def train(cfg: TrainConfig, resume: bool = False, progress: bool = True) -> Path:
    """Run `cfg.num_episodes` episodes; return the run directory. Nothing is written before the inputs
    have been validated, and an existing run is only ever continued (`resume=True`), never overwritten.
    Launched by torchrun or `accelerate launch`, every process runs this as one rank of a data-parallel
    run (`distributed`); rank 0 alone writes the run directory."""
    ranks = launched_ranks()
    if cfg.device != "cpu" and torch.cuda.is_available():  # the allocator reads it once, when CUDA initialises
        use_expandable_segments()
    out, ckpt, device, tokenizer = validate_inputs(cfg, resume)
    device = torch.device("cuda", ranks.local_rank) if device.type == "cuda" and ranks.world > 1 else device
    ranks.rows(cfg.generation_batch_size)  # refuses a batch that does not split, before the group is joined
    created = distributed.start(ranks, device.type)
    try:
        ranks.agree(ckpt and ckpt.name, "the checkpoint to resume from")
        return _train(cfg, ranks, out, ckpt, device, tokenizer, progress)
    finally:
        distributed.stop(created)


def _train(cfg: TrainConfig, ranks: Ranks, out: Path, ckpt: Path | None, device: torch.device, tokenizer,
           progress: bool) -> Path:
    _prepare_host(cfg, device)
    # 1. Initialisation
    model, tokenizer = load_policy(cfg, device, tokenizer)
    sep, geo = encode_separators(tokenizer), head_geometry(model)
    optimizer = make_optimizer(model, cfg)
    stats, start, data_start = (_restore(out, ckpt, model, optimizer, ranks) if ckpt else
                                (RunningStats(), 0, DataPosition()))
    ranks.sync_rng(device)  # a GPU's state is rank 0's device's, whichever device a rank uses
    if ranks.main:
        write_config(out, cfg)
    embed = key_embedding_fn(model, device, layer=cfg.similarity_layer, how=cfg.similarity_readout)
    batches = _rank_batches(cfg, tokenizer, embed, data_start, ranks)
    sizes = FallbackState(cfg.generation_batch_size // ranks.world, cfg.training_batch_size,
                          cfg.gradient_accumulation_steps)
    if device.type == "cuda":  # sizes from the memory plan, before any out-of-memory error has to teach them
        free, _ = torch.cuda.mem_get_info(device)
        sizes = planned_sizes(cfg, model, sep, free + torch.cuda.memory_allocated(device), ranks.world)
    # the same held-out batch every time, so the eval_* curve is comparable across episodes
    heldout = heldout_batch(cfg, tokenizer, embed, cfg.eval_articles, cfg.seed) if cfg.eval_every and ranks.main else None
    describe = lambda: hardware_state(device)  # noqa: E731
    bar = tqdm(range(start, cfg.num_episodes), initial=start, total=cfg.num_episodes, desc="episodes",
               disable=not progress or not ranks.main)
    trackers = Trackers(parse_report_to(cfg.report_to) if ranks.main else [], out, cfg.to_dict(),
                        resume=ckpt is not None, first_step=start + 1)
    nonfinite_streak, episode = 0, start
    decode = decode_step_for(cfg, device)  # `--compile`: compiled once, its cache buffers kept for every episode
    if ranks.main:
        _warn_if_all_warmup(cfg, start, stats.count)
    try:
        with _StopRequest() as stop, sharing_cpu(device):  # runs side by side share the cores
            for episode in (e + 1 for e in bar):
                share_cpu(cfg.num_threads)
                if device.type == "cuda":  # per-episode peaks; the CPU's VmHWM stays the process's peak
                    reset_peak_memory(device)
                t0 = time.perf_counter()
                batch, mine = next(batches)
                # 2-3. trajectories and rewards; every rank rolls out its rows and sees the whole batch's
                local = rollout_resilient(model, mine, sep, geo, sizes, describe, rows=ranks.rows(batch.batch_size),
                                          oracle=cfg.choice_target_weight > 0 or cfg.hindsight_weight > 0 or
                                          bool(cfg.training_oracle),
                                          **rollout_options(cfg, decode))
                traj = local.gathered(batch, ranks)
                t1 = time.perf_counter()
                memory = phase_memory(device, "rollout")  # on CUDA each phase's peaks, allocated and reserved
                # 4-6. filtering, then the policy update on the selected trajectories
                finite, selected, threshold, advantage, upd, choice, written = _filter_and_update(
                    cfg, episode, model, optimizer, traj, local, stats, sizes, describe, ranks, device)
                t2 = time.perf_counter()
                memory.update(phase_memory(device, "update"))
                nonfinite_streak = _nonfinite_streak(nonfinite_streak, finite and not (choice and choice.skipped)
                                                     and not (written and written.skipped), upd,
                                                     cfg.max_nonfinite)
                stopping = ranks.any(stop.signal is not None)
                if ranks.main:  # 7. logging and checkpoints
                    metrics = episode_metrics(episode, traj, selected, threshold, upd, stats, finite, (t1 - t0, t2 - t1),
                                              _tokens_read(traj, selected, upd, local.query_logits is None), advantage,
                                              devices=ranks.world, peak_memory_bytes=_episode_peak(memory, device),
                                              **memory,
                                              **choice_metrics(local, choice, cfg.choice_target_score, written),
                                              **vars(sizes))
                    if heldout is not None and (episode % cfg.eval_every == 0 or episode == cfg.num_episodes):
                        metrics.update(trained_policy_score(model, heldout, sep, geo, cfg))
                    _write_logs(out, trackers, metrics, trajectory_records(traj, tokenizer, episode, selected))
                    _report(bar, metrics, cfg, upd, stats.count)
                    if episode % cfg.checkpoint_every == 0 or episode == cfg.num_episodes or stopping:
                        save_checkpoint(out, episode, model, optimizer, {"stats": stats.state_dict(),
                                        "data_position": vars(batch.position)}, cfg.keep_checkpoints)
                # this episode's trajectory (and its kept sampling logits, the rollout's largest buffer) dies here,
                # not when the next rollout's result is bound: else two episodes' logits are alive at its peak
                del traj, local
                if stopping:
                    if ranks.main:
                        stop.report(episode, out)
                    break
    except Exception:
        log.error("training failed at episode %d (rank %d of %d); hardware state: %s", episode, ranks.rank,
                  ranks.world, hardware_state(device))
        raise
    finally:
        bar.close()
        trackers.close()
    if ranks.main:
        save_run_figures(out)
    ranks.barrier()  # no rank leaves (and closes the group) while rank 0 still writes
    return out


def _rank_batches(cfg: TrainConfig, tokenizer, embed, start: DataPosition, ranks: Ranks):
    """(global batch, this rank's rows of it with their key embeddings) per episode. Every rank reads the
    whole batch (articles and pools, the same on all), and embeds only its own rows (all of them when
    there is one rank)."""
    for i, batch in enumerate(iter_key_value_batches(cfg, tokenizer, None, start=start)):
        if i == 0 and ranks.world > 1:  # the same articles and pools on every rank, or the records would mix batches
            ranks.agree(hashlib.sha256(batch.key_tokens.numpy().tobytes() + batch.pool.numpy().tobytes()).hexdigest()[:16],
                        "the first batch's articles and pools")
        rows = ranks.rows(batch.batch_size)
        yield batch, next(add_embeddings([batch.rows(rows.start, rows.stop)], embed))


def _episode_peak(memory: dict, device: torch.device) -> int:
    """The episode's peak: on CUDA the larger phase peak (`phase_memory` reset the counter after each phase, so the
    counter alone holds only what came after the update), on the CPU the process's peak resident size."""
    phases = [v for k, v in memory.items() if k.endswith("_peak_allocated_bytes")]
    return max(phases) if phases else peak_memory_bytes(device)


def _filter_and_update(cfg: TrainConfig, episode: int, model, optimizer, traj, local, stats: RunningStats,
                       sizes: FallbackState, describe, ranks: Ranks, device: torch.device):
    """Steps 4-6 on the global batch `traj` (`local`: this rank's rows of it): the filter against the statistics
    before this batch, the batch added to them, the update (and the selection objective's step over every
    trajectory, when it is on, and the query's hindsight step). (finite, selected, threshold, advantage, update,
    choice step, hindsight step)."""
    rewards = traj.avg_reward.float().cpu()
    finite = bool(torch.isfinite(rewards).all())
    selected, threshold = filter_batch(rewards, stats, cfg.warmup_trajectories, cfg.filter_num_sd)
    advantage = advantages(rewards, cfg.reward_baseline, stats.mean, cfg.trajectories_per_article)
    if not finite:
        log.warning("episode %d: non-finite reward; update skipped, statistics unchanged", episode)
        return finite, torch.zeros_like(selected), threshold, advantage, None, None, None
    stats.update(rewards)
    upd, choice, written = update_resilient(model, optimizer, local, selected, sizes, describe, rewards=advantage,
                                            ranks=ranks, choice_target=choice_target_options(cfg),
                                            hindsight=hindsight_options(cfg), **update_options(cfg))
    ranks.sync_rng(device)  # the update's dropout draws differ between ranks
    return finite, selected, threshold, advantage, upd, choice, written


def planned_sizes(cfg: TrainConfig, model, sep, memory_bytes: int, world: int = 1,
                  arch: tuple[int, int] | None = None) -> FallbackState:
    """The rollout chunk and update micro-batch (`memory.choose_sizes`) that fit `memory_bytes` (a GPU's free memory
    plus what this process already holds: the plan counts the weights), accumulation raised so that an optimizer
    step still covers training_batch_size x gradient_accumulation_steps trajectories; logged."""
    shape = ModelShape.from_config(model.config, _weights_dtype(model))
    seq = SequenceShape.of(cfg, len(sep.bos), len(sep.query), len(sep.response))
    local = cfg.replace(generation_batch_size=cfg.generation_batch_size // world)
    arch, expandable = arch or detected_arch(), expandable_segments()
    # the context is spent already: `memory_bytes` is what is free to this process
    chunk, micro, p = choose_sizes(local, shape, memory_bytes, seq, arch=arch, expandable=expandable, context=0)
    spend = card_spend(p, arch, expandable, context=0)
    log.info("memory plan for %.1f GB: rollout chunk %d of %d, update micro-batch %d of %d (peak %.1f GB allocated, "
             "%.1f GB with the allocator's blocks and workspaces)", memory_bytes / GB, chunk, local.generation_batch_size,
             micro, cfg.training_batch_size, p.peak / GB, spend["peak"] / GB)
    return FallbackState(chunk, micro, cfg.gradient_accumulation_steps * (cfg.training_batch_size // micro))


def _weights_dtype(model) -> torch.dtype:
    """The dtype of the model's frozen weights (the adapter's are float32 whatever they are)."""
    return next(p.dtype for p in model.parameters() if not p.requires_grad)


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


def _tokens_read(traj, selected: torch.Tensor, upd, rescored: bool) -> int:
    """Tokens the model read this episode, on all ranks: the rollout's, and the update's when it ran
    (`rescored`: the previous policy's logits had to be recomputed)."""
    tokens = rollout_work(traj).tokens
    if upd is not None:
        tokens += update_work(int(selected.sum()), read_length(traj.query_positions), traj.query_positions.numel(),
                              rescored).tokens
    return tokens


def _report(bar, metrics: dict, cfg: TrainConfig, upd, seen: int) -> None:
    """The progress bar's postfix every episode; a console summary every `log_every` episodes. `seen`: rewards
    in the statistics; an episode in warm-up says so, or "selected 0" reads as a filter that never fires."""
    episode, reward = metrics["episode"], metrics["reward"]
    warmup = warmup_message(seen, cfg.warmup_trajectories) if metrics["threshold"] is None else ""
    if reward is not None:
        bar.set_postfix(reward=f"{reward:+.3f}", filt="warm-up" if warmup else f"{metrics['filter_fraction']:.2f}")
    if episode % cfg.log_every == 0 or episode == cfg.num_episodes:
        log.info("episode %d/%d  reward %s  running %+.4f±%.4f  %s  kl %s  %.1fs  %.0f tok/s",
                 episode, cfg.num_episodes, "nan" if reward is None else f"{reward:+.4f}", metrics["running_mean"],
                 metrics["running_std"], warmup or f"selected {metrics['selected']}",
                 "n/a" if upd is None else f"{upd.kl:.2e}", metrics["seconds"], metrics["tokens_per_second"])


def _warn_if_all_warmup(cfg: TrainConfig, start: int, seen: int) -> None:
    """Say at the start when the whole run will stay in warm-up: it trains nothing."""
    episodes = warmup_episodes(cfg.warmup_trajectories, cfg.generation_batch_size, seen)
    if start + episodes >= cfg.num_episodes:
        log.warning("warm-up: the first %d trajectories (%d episode(s) of %d) only feed the reward statistics, and this "
                    "run has %d episode(s) left: no trajectory will be selected for the update; raise --num_episodes or lower "
                    "--warmup_trajectories", max(cfg.warmup_trajectories, 2), episodes, cfg.generation_batch_size,
                    cfg.num_episodes - start)
