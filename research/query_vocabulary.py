"""Did the overfit checks' queries move towards the article's words, or towards one pair? (EXPERIMENTS.md §7.3.)
For each logged training step with at least two pairs left, the share of the query's content words (lower-cased,
letters only, 4 or more, a short stop list left out) that occur in: the article's pairs (keys and values), the
pair the retriever chose (its key), the best-scored pair left (its key: the hindsight target) and, averaged, all
the pairs left (their keys: what a choice at random would find); the same for the step's counterfactual query,
the base model's in the same context, as the control. Printed per run: first 20 vs last 20 episodes (the
episode's mean over its steps) with a Welch t 95% interval over episodes, as `choice_halves.py` does. Text only:
no model runs, only the tokenizer.
Usage: python research/query_vocabulary.py RUN_DIR [RUN_DIR ...]   (runs with trajectories.jsonl and
`max_train_articles`)"""
import itertools
import json
import re
import sys
from pathlib import Path

import numpy as np

from attnrl_core.config import TrainConfig
from attnrl_core.data import cycled_articles, split_key_values
from attnrl_core.model import load_tokenizer
from choice_halves import welch

STOP = set("that with from this were which have their been also they them these other after into more when there "
           "such than then only over most some would could about first where while being those what your".split())


def words(text: str) -> set[str]:
    return {w for w in re.findall(r"[a-z]+", text.lower()) if len(w) >= 4 and w not in STOP}


def share(query: set[str], text: set[str]) -> float:
    return len(query & text) / len(query) if query else np.nan


def article_pairs(cfg: TrainConfig, tok) -> dict[str, tuple[set[str], list[set[str]]]]:
    """article id -> (the words of its pairs, each pair's key words) for the run's training articles, cut into
    pairs as training cuts them."""
    out = {}
    for article, ids in itertools.islice(cycled_articles(cfg, tok, cfg.max_train_articles), cfg.max_train_articles):
        keys, values = split_key_values(ids[None], cfg.num_kv_pairs, cfg.tokens_per_key, cfg.tokens_per_value)
        key_words = [words(tok.decode(k)) for k in keys[0]]
        out[str(article["id"])] = (set().union(*key_words, *(words(tok.decode(v)) for v in values[0])), key_words)
    return out


def step_shares(step: dict, field: str, article: tuple[set[str], list[set[str]]]) -> list[float] | None:
    """[article, chosen, best, mean over the pairs left] shares of `step[field]`'s words; None for a step with
    one pair left."""
    left = [j for j, r in enumerate(step["candidate_rewards"]) if r is not None]
    if len(left) < 2:
        return None
    q, (art, keys) = words(step[field]), article
    best = max(left, key=lambda j: step["candidate_rewards"][j])
    return [share(q, art), share(q, keys[step["pair"]]), share(q, keys[best]),
            float(np.mean([share(q, keys[j]) for j in left]))]


def main(paths: list[str]) -> None:
    for path in paths:
        cfg = TrainConfig.from_file(Path(path) / "config.json")
        if not cfg.max_train_articles or cfg.choice_target_score != "reward":
            sys.exit(f"{path}: needs a run with max_train_articles > 0 and choice_target_score reward (its "
                     "trajectories log only the candidates' rewards): an overfit check's run directory")
        tok = load_tokenizer(cfg)
        articles = article_pairs(cfg, tok)
        per_episode: dict[str, dict[int, list[list[float]]]] = {"query": {}, "counterfactual": {}}
        for line in (Path(path) / "trajectories.jsonl").read_text().splitlines():
            t = json.loads(line)
            for step in t["steps"]:
                for field, by_episode in per_episode.items():
                    s = step_shares(step, field, articles[t["article_id"]])
                    if s is not None:
                        by_episode.setdefault(t["episode"], []).append(s)
        print(f"{path}: share of the query's content words found in ... (first 20 vs last 20 episodes)")
        for field, by_episode in per_episode.items():
            m = np.array([np.nanmean(by_episode[e], axis=0) for e in sorted(by_episode)])  # [episodes, 4]
            half = min(20, len(m) // 2)
            for i, name in enumerate(("the article's pairs", "the chosen pair's key", "the best-scored pair's key",
                                      "the pairs left's keys (mean)")):
                print(f"  {field:14s} {name:30s} {welch(m[:half, i], m[max(half, len(m) - 20):, i])}")
            d = m[:, 1] - m[:, 3]
            print(f"  {field:14s} {'chosen - pairs left':30s} {welch(d[:half], d[max(half, len(m) - 20):])}")
            d = m[:, 2] - m[:, 3]
            print(f"  {field:14s} {'best-scored - pairs left':30s} {welch(d[:half], d[max(half, len(m) - 20):])}")


if __name__ == "__main__":
    main(sys.argv[1:])
