"""Would hindsight on the query make the choice pay if it were fitted? (EXPERIMENTS.md §7.3.) On ONE fixed batch
of 8 training trajectories of the overfit setting (8 articles, 16 pairs, the retriever setting), rolled out once
with every pair left scored, takes hindsight steps (`--hindsight_weight 1`'s step, its targets fixed: the
best-scored pair's key at each step of that first roll-out) and every few steps rolls the same batch out again
(the same random draws) and prints, at the first step, whose context every roll-out shares: the hindsight NLL
per token of the target key, the share of rows whose sampled query reproduces the target key's tokens (all of
them, and their first half), the share whose chosen pair is the target pair, and the per-step oracle fraction
(the first step, then every step). Memorising on one batch is the point: it asks whether the method's path from
a key-like query to a paying choice is open, not whether training finds it.
Usage: python research/hindsight_fit_one_batch.py [steps [every [learning_rate]]]  (one thread; minutes on the
CPU)"""
import sys

import torch

from attnrl_core.diagnostics import oracle_fraction
from attnrl_core.rollout import rollout, rollout_options
from attnrl_core.training import hindsight_options, hindsight_step, hindsight_targets, make_optimizer
from choice_setup import embedded_setup

steps = int(sys.argv[1]) if len(sys.argv) > 1 else 40
every = int(sys.argv[2]) if len(sys.argv) > 2 else 5
lr = float(sys.argv[3]) if len(sys.argv) > 3 else 1e-3
cfg, model, sep, geo, batches = embedded_setup(max_train_articles=8, num_kv_pairs=16, learning_rate=lr,
                                               similarity_readout="last", temperature=8.0, hindsight_weight=1.0,
                                               generation_batch_size=8)
opt = make_optimizer(model, cfg)
batch, mine = next(batches)


def roll():
    torch.manual_seed(1)  # the same draws every time: only the adapter differs between roll-outs
    return rollout(model, mine, sep, geo, oracle=True, **rollout_options(cfg))


first = roll()
targets = hindsight_targets(first)[..., :cfg.tokens_per_query]  # [B, P, Tq]
target_pair = first.candidate_rewards.nan_to_num(float("-inf")).argmax(dim=2)[:, 0]  # [B]
half = cfg.tokens_per_query // 2


def report(step: int, nll: float | None) -> None:
    traj = first if step == 0 else roll()
    q = traj.queries[:, 0].cpu()  # [B, Tq]
    chosen = traj.candidate_scores("reward")[0]
    best, mean = traj.candidate_best_and_mean("reward")
    f0 = oracle_fraction(chosen[:, 0].float().numpy(), mean[:, 0].numpy(), best[:, 0].numpy(), num_samples=1)
    fall = oracle_fraction(*(x.float().flatten().numpy() for x in (chosen, mean, best)), num_samples=1)
    print(f"step {step:3d}  hindsight NLL/token {'  n/a' if nll is None else f'{nll:5.2f}'}  "
          f"query = target key {(q == targets[:, 0]).all(dim=1).float().mean():.2f} "
          f"(first half {(q[:, :half] == targets[:, 0, :half]).all(dim=1).float().mean():.2f})  "
          f"chose the target pair {(traj.choices[:, 0].cpu() == target_pair).float().mean():.2f}  "
          f"oracle fraction: first step {f0['fraction']:+.2f}, every step {fall['fraction']:+.2f}", flush=True)


report(0, None)
for i in range(1, steps + 1):
    r = hindsight_step(model, opt, first, training_batch_size=cfg.training_batch_size, **hindsight_options(cfg))
    if i % every == 0:
        report(i, r.nll / first.num_steps)  # per token and step; measured before step i, so one step behind
