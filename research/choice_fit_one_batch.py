"""Diagnostic for issue 25 (EXPERIMENTS.md §6): can the selection step fit p_select to its target on ONE fixed
batch of the real embedded model? Rolls one batch of 8 out with the candidates scored, then takes 15 selection
steps on that same trajectory and prints the mean choice KL and selection entropy after each.
Usage: python research/choice_fit_one_batch.py [learning_rate [similarity_temperature]]  (one thread; minutes on
the CPU)"""
import sys

import torch

from attnrl_core.diagnostics import selection_entropy
from attnrl_core.embeddings import selection_probabilities
from attnrl_core.loss import choice_target_kl
from attnrl_core.rollout import rollout, rollout_options
from attnrl_core.training import choice_target_options, choice_target_step, make_optimizer
from choice_setup import embedded_setup

lr = float(sys.argv[1]) if len(sys.argv) > 1 else 1e-3
similarity_temperature = float(sys.argv[2]) if len(sys.argv) > 2 else 1.0
cfg, model, sep, geo, batches = embedded_setup(max_train_articles=8, num_kv_pairs=16, learning_rate=lr,
                                               temperature=similarity_temperature, choice_target_weight=20.0,
                                               choice_target_temperature=0.1, generation_batch_size=8)
opt = make_optimizer(model, cfg)
batch, mine = next(batches)
traj = rollout(model, mine, sep, geo, oracle=True, **rollout_options(cfg))
opts = choice_target_options(cfg)


def state() -> tuple[float, float]:
    """The batch's mean choice KL and selection entropy under the current adapter."""
    with torch.no_grad():
        model.eval()
        p = selection_probabilities(model, traj.queries, traj.batch.key_embeddings, traj.available, cfg.temperature,
                                    cfg.similarity_layer)
        kl = choice_target_kl(p, traj.candidate_rewards, cfg.choice_target_temperature).mean().item()
        return kl, selection_entropy(p, traj.available_counts)


print("step 0", state(), flush=True)
for i in range(1, 16):
    r = choice_target_step(model, opt, traj, training_batch_size=cfg.training_batch_size, **opts)
    print("step", i, "grad", round(r.grad_norm, 2), state(), flush=True)
