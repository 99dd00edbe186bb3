"""Command line: `python -m attnrl_core {train,prepare} ...`; `python -m attnrl_core --help` lists them.

Bad input ends with one line naming the problem and the fix, exit code 2, and nothing written.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time

from .config import TrainConfig, add_config_arguments, config_from_args


def _cmd_train(args: argparse.Namespace) -> int:
    from .run import train

    if args.resume:
        import json
        from pathlib import Path

        if not args.output_dir:
            raise ValueError("--resume needs --output_dir DIR of the run to continue")
        stored = Path(args.output_dir) / "config.json"
        if not stored.is_file():
            raise ValueError(f"--resume: {stored} does not exist: is {args.output_dir!r} a run directory?")
        data = json.loads(stored.read_text())
        if args.num_episodes is not None:
            data["num_episodes"] = int(args.num_episodes)
        cfg = TrainConfig.from_preset(data.pop("preset"), **data)
    else:
        cfg = config_from_args(args)
    t0 = time.perf_counter()
    out = train(cfg, resume=args.resume, progress=not args.no_progress)
    print(f"run finished in {time.perf_counter() - t0:.1f}s: {out}")
    return 0


def _cmd_prepare(args: argparse.Namespace) -> int:
    """Build the embedded caches (model safetensors copy, Wikipedia parquet) and report the load times."""
    from .assets import embedded_dataset_file, embedded_model_dir

    t0 = time.perf_counter()
    print(f"embedded model:   {embedded_model_dir()}  ({time.perf_counter() - t0:.1f}s)")
    t0 = time.perf_counter()
    print(f"embedded dataset: {embedded_dataset_file()}  ({time.perf_counter() - t0:.1f}s)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m attnrl_core",
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
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
