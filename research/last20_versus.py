"""Two runs on the same seed and articles compared over their last 20 episodes (§7.3: the K-step hindsight run
against the one-step run): the training oracle fraction and the batch reward's query and adapter parts, each as
B - A with a Welch t 95% interval over episodes (the runs share articles but not random draws, so unpaired).
Usage: python research/last20_versus.py RUN_A RUN_B"""
import json
import sys
from pathlib import Path

import numpy as np

from choice_halves import welch


def last20(run: str, key: str) -> np.ndarray:
    rows = [json.loads(line) for line in (Path(run) / "metrics.jsonl").read_text().splitlines()]
    return np.array([np.nan if r.get(key) is None else r[key] for r in rows[-20:]], dtype=float)


def main(a: str, b: str) -> None:
    for key in ("oracle_fraction", "query_reward", "adapter_reward"):
        print(f"{key:16s} last 20, A -> B: {welch(last20(a, key), last20(b, key)).replace('last - first', 'B - A')}")


if __name__ == "__main__":
    main(*sys.argv[1:3])
