"""Why an experiment's arms resolve trained - random differently (EXPERIMENTS.md §7.4): per arm, the seeds'
held-out per-unit rewards averaged, then the SD of the trained choice's and the random choice's reward, of their
difference, and their correlation (common random numbers make a near-uniform choice track the random baseline).
Usage: python research/crn_correlation.py KEPT_DIR ARM [ARM ...]   (e.g. experiments/kept/third spec levers retriever)"""
import json
import sys
from pathlib import Path

import numpy as np


def main(kept: str, arms: list[str]) -> None:
    for arm in arms:
        runs = sorted(Path(kept).glob(f"{arm}-s*/eval/episode-*.json"))
        units = [json.loads(f.read_text())["per_unit"] for f in runs]
        trained = np.mean([u["trained"]["reward"] for u in units], axis=0)
        random = np.mean([u["random"]["reward"] for u in units], axis=0)
        print(f"{arm:10s} {len(runs)} seeds, {trained.size} units: SD trained {trained.std(ddof=1):.3f}, random "
              f"{random.std(ddof=1):.3f}, trained - random {(trained - random).std(ddof=1):.3f}; "
              f"correlation {np.corrcoef(trained, random)[0, 1]:.2f}")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
