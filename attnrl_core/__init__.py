"""attnrl_core: attention-guided RL for self-directed language-model training.

Data flows one way: config -> data -> model (+ embeddings) -> rollout -> training -> run directory.
Modules: config, assets, data, model, embeddings, rollout, training, checkpoint, run, viz.
"""

__version__ = "0.1.0"
