"""attnrl_core: attention-guided RL for self-directed language-model training.

Data flows one way: config -> data -> model (+ embeddings) -> rollout -> training -> run directory.

Modules, lowest first (each imports only modules above it):
  tracking    optional TensorBoard / trackio / W&B reporting
  config      TrainConfig and its presets
  distributed data parallelism: ranks from torchrun / accelerate, each rank's rows, gradient sums
  files       durable writes: atomic replace, synced appends, torn-line-tolerant JSON lines
  host        seeding, CPU allocator and core sharing, peak memory, hardware summary
  assets      the embedded model and Wikipedia sample, built once into a cache
  corpus      articles from the Hub, the embedded sample or local files; the held-out split; stream positions
  data        articles -> token tensors -> key/value batches
  model       base model + LoRA adapter, head geometry, adapter on/off
  embeddings  query/key embeddings, the GQA-aware similarity, the choice's log-prob
  decoding    the preallocated KV cache, sampling, scoring a continuation
  memory      the memory plan: each term of a run's memory from its config and model shape; sizes that fit
  trajectory  a batch of trajectories as [B, P] tensors and its derived views
  rollout     batched trajectories (policy and base model in one batch) and rewards
  accounting  tokens and FLOPs of a rollout and an update, from shapes
  diagnostics selection diagnostics, paired statistics, the learning check's figure (pure)
  filtering   running reward statistics and the selection threshold (pure)
  loss        REINFORCE + KL loss, reward baselines, value NLL (pure)
  training    the update phase and its optimizer
  memtrace    the plan's check: the real rollout and update micro-batch on `meta`, live bytes counted
  resilience  out-of-memory fallbacks around rollout and update
  checkpoint  atomic, hashed checkpoints
  rundir      the run directory's format: metrics, trajectory records, reading a run
  viz         figures
  evaluate    held-out comparison with baselines
  run         the training loop
  experiment  arms x seeds of runs, evaluated and aggregated
  naive       the naive reference path (SPEC read plainly) the cached rollout is checked against
  bench       throughput against the naive path and the hardware
  doctor      environment checks
  __main__    the command line and TrainConfig's flags
"""

import logging

__version__ = "0.1.0"

# bitsandbytes logs, when it is imported on a CPU without the optional `kernels` package, that it could
# not load a 4-bit kernel this project never uses; peft imports it, so the filter must exist before any
# module does. Exactly that message is dropped; everything else bitsandbytes says still shows.
logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(lambda record: "gemm_4bit_forward" not in record.msg)
# The same import, on a CPU with AVX-512 BF16 and `kernels` installed (transformers >= 5.25 requires it), asks
# the Hub for that 4-bit kernel (bitsandbytes/backends/cpu/ops.py: get_kernel("kernels-community/quantization-
# bitsandbytes")); with HF_HUB_OFFLINE=1 `kernels` logs that it skips the publisher check, then the load fails
# and the message above is dropped. Nothing here uses 4-bit CPU matmuls, so exactly that line is dropped too.
logging.getLogger("kernels._internals.hf_hub").addFilter(
    lambda record: "kernels-community/quantization-bitsandbytes" not in str(record.msg))
