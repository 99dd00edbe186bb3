"""Command line: `python -m attnrl_core COMMAND ...`; `python -m attnrl_core --help` lists the commands.

Bad input ends with one line naming the problem and the fix, exit code 2, and nothing written. Each
command imports its module when it runs, so `--help` and a refused flag answer without loading torch.
Imports attnrl_core.config (and, per command, .run, .assets, .evaluate, .diagnostics, .rundir, .experiment,
.bench, .memory, .retrieval or .doctor).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
import time
from dataclasses import fields
from pathlib import Path
from typing import Any

from .config import TrainConfig


# -- TrainConfig as flags -------------------------------------------------------------------------------
def _parse_value(f: dataclasses.Field, text: str) -> Any:
    kind = {"int": int, "float": float, "str": str}[f.type]
    try:
        return kind(text)
    except ValueError:
        raise ValueError(f"--{f.name} {text!r} is invalid: must be of type {f.type}") from None


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """One `--field value` flag per TrainConfig field, its help from the field's metadata."""
    parser.add_argument("--config", help="JSON or YAML file of field values (flags override it)")
    defaults = TrainConfig()
    for f in fields(TrainConfig):
        parser.add_argument(f"--{f.name}", default=None, metavar=f.type.upper(),
                            help=f"{f.metadata['help']} (default: {getattr(defaults, f.name)!r}; presets may change it)")


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    given = {f.name: _parse_value(f, getattr(args, f.name)) for f in fields(TrainConfig)
             if getattr(args, f.name, None) is not None}
    if getattr(args, "config", None):
        return TrainConfig.from_file(args.config, **given)
    return TrainConfig.from_preset(given.pop("preset", "llama-3.2-3b"), **given)


def _cmd_train(args: argparse.Namespace) -> int:
    if args.resume:
        if not args.output_dir:
            raise ValueError("--resume needs --output_dir DIR of the run to continue")
        stored = Path(args.output_dir) / "config.json"
        if not stored.is_file():
            raise ValueError(f"--resume: {stored} does not exist: is {args.output_dir!r} a run directory?")
        # the directory given, not the one recorded: a run that was moved or copied resumes where it is now
        more = {"output_dir": args.output_dir}
        if args.num_episodes is not None:
            more["num_episodes"] = int(args.num_episodes)
        cfg = TrainConfig.from_file(stored, **more)
    else:
        cfg = config_from_args(args)
    from .run import train  # after the config is valid: a refused flag answers before torch loads

    t0 = time.perf_counter()
    out = train(cfg, resume=args.resume, progress=not args.no_progress)
    print(f"run finished in {time.perf_counter() - t0:.1f}s: {out}")
    return 0


def launch_training(cfg: TrainConfig, processes: int = 1, resume: bool = False) -> Path:
    """Train `cfg` here, or data-parallel in `processes` processes started here (one per GPU, by
    accelerate's `notebook_launcher`): for notebooks, where there is no torchrun. Before a multi-process
    launch nothing may have initialised CUDA or imported bitsandbytes in this process (accelerate
    refuses); this module and `config` import neither. Returns the run directory."""
    if processes > 1:
        from accelerate import notebook_launcher

        notebook_launcher(_train_process, args=(cfg, resume), num_processes=processes)
        return Path(cfg.output_dir)
    from .run import train

    return train(cfg, resume=resume)


def _train_process(cfg: TrainConfig, resume: bool) -> None:
    """One rank of `launch_training`'s processes (the launcher sets RANK and WORLD_SIZE)."""
    from .run import train

    train(cfg, resume=resume, progress=False)


def _cmd_prepare(args: argparse.Namespace) -> int:
    """Build the embedded caches (model safetensors copy, Wikipedia parquet) and report the load times."""
    from .assets import embedded_dataset_file, embedded_model_dir

    t0 = time.perf_counter()
    print(f"embedded model:   {embedded_model_dir()}  ({time.perf_counter() - t0:.1f}s)")
    t0 = time.perf_counter()
    print(f"embedded dataset: {embedded_dataset_file()}  ({time.perf_counter() - t0:.1f}s)")
    return 0


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from .evaluate import evaluate, format_report

    # progress goes to stderr, so `--json`'s last stdout line stays the report
    report = evaluate(args.run_dir, args.checkpoint, args.num_articles, args.seed, args.samples_per_article,
                      args.windows_per_article, progress=not args.no_progress)
    print(format_report(report))
    print(f"written: {args.run_dir}/eval/{report['checkpoint']}.json and .png")
    if args.json:
        print(json.dumps(report))
    return 0


def _cmd_learning_check(args: argparse.Namespace) -> int:
    """The overfit check's figure from each run's metrics.jsonl: does the training reward rise?"""
    from .diagnostics import learning_figure
    from .rundir import load_run

    figures, curves = {}, {}
    for run_dir in args.run_dir:
        _, metrics, _ = load_run(run_dir)
        fig = figures[run_dir] = learning_figure([m["reward"] for m in metrics], args.window)
        curves[Path(run_dir).name] = {"runs": [{k: [m.get(k) for m in metrics] for k in
                                                ("reward", "adapter_reward", "query_reward", "selection_entropy")}]}
        verdict = "rises clearly (z > 2)" if fig["z"] > 2 else "does not rise clearly (z <= 2)"
        print(f"{run_dir}: {fig['episodes']} episodes; mean batch reward of the first {fig['window']} "
              f"{fig['first_mean']:+.4f} ± {fig['first_se']:.4f}, of the last {fig['window']} {fig['last_mean']:+.4f} "
              f"± {fig['last_se']:.4f}; difference {fig['difference']:+.4f} ± {fig['se']:.4f}, z = {fig['z']:+.2f} "
              f"(episodes as independent draws): the reward {verdict}")
        trend = "rises" if fig["t_hac"] > 0 and fig["p_hac"] < 0.05 else (
            "falls" if fig["p_hac"] < 0.05 else "shows no clear trend")
        print(f"  trend, robust to correlated episodes: {fig['slope']:+.5f} per episode ± {fig['slope_se_hac']:.5f} "
              f"({fig['trend_test']}) = {fig['t_hac']:+.2f}, p = {fig['p_hac']:.3f}: the reward {trend}")
    if args.figure:
        from .experiment import plot_experiment

        plot_experiment({"arms": curves}).savefig(args.figure, dpi=120, bbox_inches="tight")
        print(f"written: {args.figure}")
    if args.json:
        print(json.dumps(figures))
    return 0


def _cmd_experiment(args: argparse.Namespace) -> int:
    from .experiment import experiment_dir, format_summary, load_experiment, run_experiment, save_figure, summarize

    if args.markdown:  # the tables of the runs trained and evaluated so far: nothing is trained or evaluated
        out = experiment_dir(args.file, args.output_dir)
        if not out.is_dir():
            raise ValueError(f"{out} does not exist: run `experiment {args.file}` first")
        summary = summarize(out, load_experiment(args.file), partial=True)
    else:
        summary = run_experiment(args.file, args.output_dir, args.parallel)
    if args.figure:
        save_figure(summary, args.figure)
    print(format_summary(summary, markdown=args.markdown))
    return 0


def _cmd_bench(args: argparse.Namespace) -> int:
    from .bench import main_bench

    return main_bench(args.preset, args.json, args.skip_naive, args.batch_size, args.num_kv_pairs, args.num_threads,
                      args.compile)


def _cmd_memory(args: argparse.Namespace) -> int:
    from .memory import PRESET_SHAPES, detected_arch, memory_report, parse_arch, parse_bytes

    cfg = config_from_args(args)
    if cfg.preset not in PRESET_SHAPES:
        raise ValueError(f"--preset {cfg.preset!r} has no model shape: use one of {sorted(PRESET_SHAPES)}")
    if cfg.model_name != TrainConfig.from_preset(cfg.preset).model_name:
        raise ValueError("--model_name is not planned: the memory plan knows the presets' models; drop --model_name")
    memory_bytes, arch = parse_bytes(args.gpu_memory), parse_arch(args.gpu_arch) if args.gpu_arch else detected_arch()
    shape = PRESET_SHAPES[cfg.preset].in_dtype(cfg.dtype)
    print(memory_report(cfg, shape, memory_bytes, args.json, arch=arch))
    return 0


def _cmd_retrieval(args: argparse.Namespace) -> int:
    """Self-retrieval of the similarity on held-out articles: a pair's key written as the query."""
    if getattr(args, "preset", None) is None and not getattr(args, "config", None):
        args.preset = "embedded"  # a diagnostic for the workbench's own model unless told otherwise
    cfg = config_from_args(args)
    from .retrieval import (format_sweep, heldout_keys, load_for_retrieval, plot_sweep, self_retrieval, sweep)

    model, tokenizer = load_for_retrieval(cfg, args.run_dir)
    batch = heldout_keys(cfg, tokenizer, args.num_articles, args.windows_per_article)
    if args.sweep:
        rows = sweep(model, batch)
        print(format_sweep(rows))
        if args.figure:
            plot_sweep(rows, chance=1 / (cfg.num_kv_pairs - 1)).savefig(args.figure, dpi=120, bbox_inches="tight")
            print(f"written: {args.figure}")
        result: dict | list = rows
    else:
        result = self_retrieval(model, batch, cfg)
        print(f"layer {cfg.similarity_layer}, readout {cfg.similarity_readout}, temperature {cfg.temperature:g}: own "
              f"pair first in {result['top1']:.3f} of {result['queries']} queries ({result['units']} units, "
              f"{result['articles']} articles; chance {1 / result['candidates']:.3f}), p(own) x candidates "
              f"{result['probability_ratio']:.2f}, entropy {result['entropy']:.3f} of uniform")
    if args.json:
        print(json.dumps(result))
    return 0


def _cmd_doctor(args: argparse.Namespace) -> int:
    from .doctor import format_table, run_checks

    rows = run_checks(args.output_dir)
    print(format_table(rows))
    return 1 if any(r[1] == "FAIL" for r in rows) else 0


def _integer_at_least(minimum: int, all_means: int | None = None):
    """An argparse type: an integer >= `minimum` (and, with `all_means`, the word "all" standing for it)."""
    def parse(text: str) -> int:
        if all_means is not None and text == "all":
            return all_means
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer" +
                                             (" or 'all'" if all_means is not None else "")) from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"{value} is not >= {minimum}")
        return value

    return parse


_positive = _integer_at_least(1)
_count_or_all = _integer_at_least(0, all_means=0)


class _Parser(argparse.ArgumentParser):
    """argparse that reports a usage error in one line (and exit code 2) instead of the usage block, and
    never expands a prefix (`--learning_rat` is a typo to refuse, not `--learning_rate`)."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message: str):
        self.exit(2, f"error: {message} (see `{self.prog} --help`)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="python -m attnrl_core",
                                     description="attnrl: attention-guided RL for self-directed LM training")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    train = sub.add_parser("train", help="train the query policy (the main job)",
                           description="Train the query policy. Every TrainConfig field is a flag.")
    train.add_argument("--resume", action="store_true", help="continue output_dir from its latest valid checkpoint")
    train.add_argument("--no_progress", action="store_true", help="no progress bar")
    add_config_arguments(train)
    train.set_defaults(func=_cmd_train)
    prepare = sub.add_parser("prepare", help="build the embedded model/data caches (offline)")
    prepare.set_defaults(func=_cmd_prepare)
    ev = sub.add_parser("evaluate", help="compare a trained policy with baselines on held-out articles")
    ev.add_argument("--run_dir", required=True, help="run directory to evaluate")
    ev.add_argument("--checkpoint", type=int, default=None, help="episode of the checkpoint (default: latest valid)")
    ev.add_argument("--num_articles", type=_count_or_all, default=16,
                    help="held-out articles to score, in the held-out order that no training seed changes (0 or all: "
                         "every one of a local corpus)")
    ev.add_argument("--seed", type=int, default=0, help="seed of every method's generator (the same for all)")
    ev.add_argument("--samples_per_article", type=_positive, default=4, help="rollouts per held-out unit and method")
    ev.add_argument("--windows_per_article", type=_positive, default=4,
                    help="non-overlapping windows per held-out article, where it is long enough (each a unit)")
    ev.add_argument("--json", action="store_true", help="print the report as one JSON object on the last line")
    ev.add_argument("--no_progress", action="store_true", help="no progress bar (it goes to stderr)")
    ev.set_defaults(func=_cmd_evaluate)
    check = sub.add_parser("learning_check", help="does a run's training reward rise? (first vs last episodes, z)",
                           description="The overfit check's figure: train with --max_train_articles 8 (see "
                                       "EXPERIMENTS.md), then compare the first and last episodes' mean batch reward.")
    check.add_argument("--run_dir", required=True, nargs="+", help="run directories")
    check.add_argument("--window", type=_positive, default=20, help="episodes in each of the two windows")
    check.add_argument("--figure", default=None, help="also plot the runs' reward curves (and its parts) to this PNG")
    check.add_argument("--json", action="store_true", help="print {run_dir: figure} as one JSON object, last line")
    check.set_defaults(func=_cmd_learning_check)
    exp = sub.add_parser("experiment", help="train and evaluate arms x seeds from an experiment file, then aggregate",
                         description="Runs every (arm, seed) of a YAML experiment file (see experiments/), skipping "
                                     "finished runs and resuming interrupted ones, evaluates each final checkpoint "
                                     "and writes summary.json and experiment.png.")
    exp.add_argument("file", help="experiment file, e.g. experiments/first.yaml")
    exp.add_argument("--output_dir", default=None, help="where the runs go (default: runs/experiments/NAME)")
    exp.add_argument("--parallel", type=_positive, default=2, help="runs trained at once (each a process)")
    exp.add_argument("--markdown", action="store_true",
                     help="print the tables of the runs trained and evaluated so far as markdown (EXPERIMENTS.md's); "
                          "trains nothing")
    exp.add_argument("--figure", default=None,
                     help="also draw the summary's figure to this PNG (with --markdown: the runs done so far)")
    exp.set_defaults(func=_cmd_experiment)
    bench = sub.add_parser("bench", help="measure rollout/update throughput against a naive path and the hardware")
    bench.add_argument("--preset", choices=["embedded", "llama-3.2-3b-shape", "tiny-shape"], default="embedded",
                       help="embedded: SmolLM2-135M on CPU; llama-3.2-3b-shape: random 3B weights (for a GPU); "
                            "tiny-shape: random 2-layer weights (the GPU proof's dry run)")
    bench.add_argument("--json", action="store_true", help="print one JSON object on the last line")
    bench.add_argument("--batch_size", type=int, default=None, help="trajectories per batch (default: the preset's)")
    bench.add_argument("--num_kv_pairs", type=int, default=None,
                       help="pairs per article (default: the preset's); steps = ceil(subset_fraction * pairs)")
    bench.add_argument("--skip_naive", action="store_true", help="skip the (slow) naive reference path")
    bench.add_argument("--num_threads", type=int, default=0,
                       help="CPU threads (0: this process's share of the cores among running attnrl processes)")
    bench.add_argument("--compile", action="store_true",
                       help="also time the rollout with its decode steps compiled (train's --compile 1), and the compile")
    bench.set_defaults(func=_cmd_bench)
    memory = sub.add_parser("memory", help="the memory plan of a run and the sizes that fit a GPU (no GPU needed)",
                            description="Each term of a run's memory (weights, KV cache, kept logits, activations, "
                                        "loss buffers) from its config and its model's shape, the peak of each "
                                        "phase, what the card spends beyond it (CUDA context, the allocator's blocks, "
                                        "cuBLAS workspaces), and the rollout chunk and update micro-batch that fit "
                                        "--gpu_memory. Every TrainConfig field is a flag.")
    memory.add_argument("--gpu_memory", default="16GB",
                        help="the card's memory to fit, e.g. 16GB, 24GiB (default 16GB; the CUDA context is counted in)")
    memory.add_argument("--gpu_arch", default=None,
                        help="the card's compute capability, e.g. sm75 (T4), sm80 (A100), sm86, sm89, sm90 (H100) "
                             "(default: this machine's GPU, else sm80)")
    memory.add_argument("--json", action="store_true", help="print one JSON object")
    add_config_arguments(memory)
    memory.set_defaults(func=_cmd_memory)
    ret = sub.add_parser("retrieval", help="does the similarity find a pair from its own key? (held-out articles)",
                         description="Each held-out pair's key text is written as the query (the path a generated "
                                     "query takes) and scored against its article's keys: top1, p(own) x candidates, "
                                     "entropy at the setting the flags give (SPEC's without them), or --sweep over "
                                     "every layer x temperatures 1, 2, 4, 8 x readouts. Every TrainConfig field is a "
                                     "flag; the preset defaults to embedded.")
    ret.add_argument("--run_dir", default=None, help="score a run's newest valid adapter (default: the base model)")
    ret.add_argument("--sweep", action="store_true", help="every layer x temperature x readout, as a table")
    ret.add_argument("--figure", default=None, help="with --sweep: draw top1 by layer to this PNG")
    ret.add_argument("--num_articles", type=_count_or_all, default=0,
                     help="held-out articles (0 or all: every one of a local corpus)")
    ret.add_argument("--windows_per_article", type=_positive, default=4,
                     help="non-overlapping windows per held-out article, where it is long enough (each a unit)")
    ret.add_argument("--json", action="store_true", help="print the result as one JSON object on the last line")
    add_config_arguments(ret)
    ret.set_defaults(func=_cmd_retrieval)
    doctor = sub.add_parser("doctor", help="check the environment and say what to fix")
    doctor.add_argument("--output_dir", default="runs", help="where checkpoints will go (disk space check)")
    doctor.set_defaults(func=_cmd_doctor)
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}".splitlines()[0], file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
