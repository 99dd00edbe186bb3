"""Diagnostic for issue 25 (EXPERIMENTS.md §6): is the selection objective's target predictable at all?

Rolls batches of the untrained embedded model out on the 8 training articles of the overfit check with every
candidate scored, and asks, for each of the objective's two targets (`--choice_target_score`: SPEC's `reward`
of each pair left, and its `logprob` term alone), how much of a step's target is a property of the pair (the
same whichever query asked), which a selector could learn by heart, and how much changes from query to query. For each step with two or more pairs left, the pair's mean reward over the *other* rows of the
same article (leave-row-out, each step centred on its own mean) predicts the step's centred rewards:

- `explained`: 1 - SSE / SS of the centred rewards (0: the pair's identity says nothing; 1: everything);
- at each target temperature tau, the mean KL(softmax(r / tau) || q) for q uniform and q = softmax(m / tau),
  and the target's entropy as a fraction of uniform;
- `oracle fraction` of choosing the pair with the highest leave-row-out mean (0: random, 1: oracle), with a 95%
  interval over articles.

Usage: python research/choice_predictability.py [batches [pairs]]   (one thread; ~20 s a batch of 8)
"""
import math
import sys
from collections import defaultdict

import torch

from attnrl_core.rollout import rollout, rollout_options
from choice_setup import embedded_setup

num_batches = int(sys.argv[1]) if len(sys.argv) > 1 else 20
num_pairs = int(sys.argv[2]) if len(sys.argv) > 2 else 16
cfg, model, sep, geo, batches = embedded_setup(max_train_articles=8, num_kv_pairs=num_pairs, generation_batch_size=8,
                                               trajectories_per_article=4)

steps = {"reward": [], "logprob": []}  # score -> [(article, row id, pair indices [K], scores [K])]
for b in range(num_batches):
    batch, mine = next(batches)
    traj = rollout(model, mine, sep, geo, oracle=True, **rollout_options(cfg))
    for score, found in steps.items():
        r = traj.candidate_scores(score)[1].float().cpu()  # [B, P, N], NaN where not available
        for i in range(r.shape[0]):
            for s in range(r.shape[1]):
                pairs = (~r[i, s].isnan()).nonzero()[:, 0]
                if len(pairs) >= 2:
                    found.append((batch.article_ids[i], (b, i), pairs, r[i, s, pairs]))
    print(f"batch {b + 1}/{num_batches}: {len(steps['reward'])} steps", flush=True)


def report(score: str, steps: list) -> None:
    """The module docstring's figures for one target."""
    # a pair's centred reward per row: sums over rows, so that each row's own can be left out
    sums = defaultdict(lambda: [0.0, 0])  # (article, pair) -> [sum, count]
    per_row = defaultdict(lambda: [0.0, 0])  # (article, row, pair) -> [sum, count]
    for article, row, pairs, rewards in steps:
        for p, c in zip(pairs.tolist(), (rewards - rewards.mean()).tolist()):
            for table, key in ((sums, (article, p)), (per_row, (article, row, p))):
                table[key][0] += c
                table[key][1] += 1

    def loo_mean(article, row, p) -> float:
        total, n = sums[(article, p)]
        own, k = per_row[(article, row, p)]
        return (total - own) / (n - k) if n > k else 0.0

    taus = (0.03, 0.1, 0.3, 1.0)
    sse = ss = 0.0
    kl = {t: [0.0, 0.0] for t in taus}  # uniform, pair-mean
    ent = {t: 0.0 for t in taus}
    oracle = defaultdict(list)
    for article, row, pairs, rewards in steps:
        c = rewards - rewards.mean()
        m = torch.tensor([loo_mean(article, row, p) for p in pairs.tolist()])
        m = m - m.mean()
        sse += float(((c - m) ** 2).sum())
        ss += float((c ** 2).sum())
        K = len(pairs)
        for t in taus:
            logt = torch.log_softmax(rewards / t, 0)
            target = logt.exp()
            kl[t][0] += float((target * (logt + math.log(K))).sum())
            kl[t][1] += float((target * (logt - torch.log_softmax(m / t, 0))).sum())
            ent[t] += float(-(target * logt).sum()) / math.log(K)
        spread = float(rewards.max() - rewards.mean())
        if spread > 0:
            oracle[article].append(float(rewards[m.argmax()] - rewards.mean()) / spread)

    n = len(steps)
    print(f"\n[{score}] {n} steps with >= 2 pairs left, {len(oracle)} articles, {num_batches} batches of {cfg.generation_batch_size}")
    print(f"{score} SD within a step {math.sqrt(ss / sum(len(p) for _, _, p, _ in steps)):.4f}; "
          f"explained by the pair's identity (leave-row-out) {1 - sse / ss:+.3f}")
    for t in taus:
        print(f"tau {t:>4}: target entropy / uniform {ent[t] / n:.3f}; KL to uniform {kl[t][0] / n:.4f}, "
              f"to softmax(pair mean / tau) {kl[t][1] / n:.4f}")
    per_article = torch.tensor([sum(v) / len(v) for v in oracle.values()])
    half = 1.96 * float(per_article.std()) / math.sqrt(len(per_article)) if len(per_article) > 1 else float("nan")
    print(f"oracle fraction of the best pair by its mean: {float(per_article.mean()):+.3f} "
          f"[{float(per_article.mean()) - half:+.3f}, {float(per_article.mean()) + half:+.3f}] over articles")


for score, found in steps.items():
    report(score, found)
