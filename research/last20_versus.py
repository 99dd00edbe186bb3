"""Two runs on the same seed and articles compared over their last 20 episodes (§7.3: the K-step hindsight run
against the one-step run): the training oracle fraction and the batch reward's query and adapter parts, each as
B - A with a Welch t 95% interval over episodes (the runs share articles but not random draws, so unpaired).
Usage: python research/last20_versus.py RUN_A RUN_B"""
import sys
from pathlib import Path

from attnrl_core.files import read_jsonl
from choice_halves import series, welch


def main(a: str, b: str) -> None:
    last_a, last_b = (read_jsonl(Path(run) / "metrics.jsonl")[-20:] for run in (a, b))
    for key in ("oracle_fraction", "query_reward", "adapter_reward"):
        print(f"{key:16s} last 20, A -> B: "
              f"{welch(series(last_a, key), series(last_b, key)).replace('last - first', 'B - A')}")


if __name__ == "__main__":
    main(*sys.argv[1:3])
