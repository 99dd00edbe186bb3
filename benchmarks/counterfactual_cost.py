"""What `--counterfactual_samples K` costs per episode (issue 39, BENCHMARKS.md): on the embedded preset with the
decisive experiment's sizes (8 trajectories, 16 pairs, one thread), times one rollout at K = 1 (SPEC's), 2 and 3,
without and with the per-step oracle (`--training_oracle`), each after one untimed rollout of the same work, and
reports the peak memory the process reached. Usage: python benchmarks/counterfactual_cost.py  (a quiet machine;
a few minutes)"""
import json
import resource
import time

import torch

from attnrl_core.config import TrainConfig
from attnrl_core.data import encode_separators, iter_key_value_batches
from attnrl_core.embeddings import key_embedding_fn
from attnrl_core.model import head_geometry, load_policy, resolve_device
from attnrl_core.rollout import rollout, rollout_options

torch.set_num_threads(1)
torch.manual_seed(0)
cfg = TrainConfig.from_preset("embedded", num_kv_pairs=16, generation_batch_size=8)
device = resolve_device(cfg)
model, tokenizer = load_policy(cfg, device)
sep, geo = encode_separators(tokenizer), head_geometry(model)
batch = next(iter_key_value_batches(cfg, tokenizer, key_embedding_fn(model, device)))


def timed(fn, repeats: int = 2) -> float:
    """Seconds of the last of `repeats` runs (the first is untimed warm-up)."""
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
    return time.perf_counter() - start


result = {"trajectories": cfg.generation_batch_size, "num_kv_pairs": cfg.num_kv_pairs,
          "threads": torch.get_num_threads()}
for k in (1, 2, 3):
    options = rollout_options(cfg.replace(counterfactual_samples=k))
    for oracle in (False, True):
        seconds = timed(lambda: rollout(model, batch, sep, geo, oracle=oracle, **options))
        result[f"rollout_k{k}{'_oracle' if oracle else ''}_s"] = round(seconds, 2)
        print(f"K = {k}, oracle {oracle}: {seconds:.2f} s", flush=True)
result["peak_rss_gb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20, 2)
print(json.dumps(result))
