"""What the selection objective costs per episode (issue 25, BENCHMARKS.md): on the embedded preset with the
overfit check's sizes (8 trajectories, 16 pairs, one thread), times one rollout without and with every pair
left scored (`oracle=True`), and the selection objective's steps (1 and 8 per episode), each after one untimed
run of the same work. Usage: python research/choice_cost.py  (run it on a quiet machine; minutes)"""
import json
import time

import torch

from attnrl_core.rollout import rollout, rollout_options
from attnrl_core.training import choice_target_options, choice_target_step, make_optimizer
from choice_setup import embedded_setup

cfg, model, sep, geo, batches = embedded_setup(max_train_articles=8, num_kv_pairs=16, learning_rate=1e-3,
                                               trajectories_per_article=4, choice_target_weight=20.0,
                                               choice_target_temperature=0.1, temperature=4.0, generation_batch_size=8)
opt = make_optimizer(model, cfg)
batch, mine = next(batches)


def timed(fn, repeats: int = 2) -> float:
    """Seconds of the last of `repeats` runs (the first is untimed warm-up)."""
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
    timed.out = out
    return time.perf_counter() - start


plain = timed(lambda: rollout(model, mine, sep, geo, oracle=False, **rollout_options(cfg)))
scored = timed(lambda: rollout(model, mine, sep, geo, oracle=True, **rollout_options(cfg)))
traj = timed.out
opts = choice_target_options(cfg)
steps = {k: timed(lambda k=k: choice_target_step(model, opt, traj, training_batch_size=cfg.training_batch_size,
                                                  **{**opts, "steps": k})) for k in (1, 8)}
print(json.dumps({"rollout_s": round(plain, 2), "rollout_scored_s": round(scored, 2),
                  "choice_step_1_s": round(steps[1], 2), "choice_steps_8_s": round(steps[8], 2),
                  "trajectories": cfg.generation_batch_size, "num_kv_pairs": cfg.num_kv_pairs,
                  "threads": torch.get_num_threads()}))
