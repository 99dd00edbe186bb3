"""`python -m attnrl_core bench`: rollout and update throughput, against a naive path and the hardware.

The same batch (articles, pools, seed, greedy decoding) is rolled out two ways in one process:

  cached  `rollout.rollout`: policy and base model decode together in one mixed-adapter batch over a KV
          cache allocated once and extended step by step, logits only where needed.
  naive   SPEC.md read plainly (`naive`): every step re-encodes the whole context with `generate`,
          scores the value with separate full forward passes, and loops over heads for the similarity.

Both must choose the same pairs and give the same rewards (to float tolerance). Useful model FLOPs
come from `accounting` (the cached path's minimal work; the naive path is charged the same useful
work, so its extra re-encoding shows up as lower throughput; a trained token is one the update reads,
up to each trajectory's last query token) and are compared with the machine's own measured matmul
rate (fp32 on CPU, bf16 on GPU). Each phase is timed after one untimed run of the same size: the
steady state of a long run (the naive path included).
Imports attnrl_core.accounting, .config, .data, .embeddings, .host, .model, .naive, .rollout and .training.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass

import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from .accounting import forward_flops, rollout_work, training_flops, update_work
from .config import EMBEDDED_DATASET, TrainConfig
from .data import encode_separators, iter_key_value_batches
from .embeddings import key_embedding_fn
from .host import keep_freed_memory, peak_memory_bytes, reset_peak_memory, share_cpu, sharing_cpu, synchronize
from .model import (adapter_parameters, attach_adapter, float32_head, gqa_attention, head_geometry, load_policy,
                    load_tokenizer, resolve_device, resolve_dtype)
from .naive import naive_rollout
from .rollout import decode_step_for, rollout, rollout_options
from .training import load_values, make_optimizer, read_length, update_options, update_policy


# -- hardware limits -------------------------------------------------------------------------------------
def matmul_flops_per_second(device: torch.device, size: int = 2048, repeats: int = 10) -> float:
    """The machine's own dense matmul rate: fp32 on CPU, bf16 on GPU."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if device.type == "cuda":
        size = 8192
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    for _ in range(2):
        a @ b
    synchronize(device)
    t = time.perf_counter()
    for _ in range(repeats):
        a @ b
    synchronize(device)
    return 2 * size**3 * repeats / (time.perf_counter() - t)


# -- the benchmark ---------------------------------------------------------------------------------------------
PRESETS = {  # SPEC.md's batch sizes: on a CPU too, 64 rows per weight read is where decoding pays
    "embedded": {"preset": "embedded", "generation_batch_size": 64, "training_batch_size": 16},
    "llama-3.2-3b-shape": {"preset": "llama-3.2-3b", "generation_batch_size": 64, "training_batch_size": 16},
    # the GPU proof's dry run (benchmarks/gpu_proof.sh --dry_run): the same code path on the CPU in seconds
    "tiny-shape": {"preset": "embedded", "generation_batch_size": 4, "training_batch_size": 2},
}

SHAPES = {  # random-weight models (no download) for the *-shape presets
    "llama-3.2-3b-shape": dict(vocab_size=128256, hidden_size=3072, intermediate_size=8192, num_hidden_layers=28,
                               num_attention_heads=24, num_key_value_heads=8, head_dim=128),
    "tiny-shape": dict(vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, head_dim=16),
}


def _random_model(preset: str, cfg: TrainConfig, device: torch.device):
    """Random weights in a preset's shape (`SHAPES`): speed and memory are honest, text is not."""
    config = LlamaConfig(**SHAPES[preset], tie_word_embeddings=True, rope_theta=500000.0,
                         max_position_embeddings=131072, bos_token_id=1)
    with torch.device(device):  # built in its dtype on the device: no float32 copy of 3B weights on the host
        model = AutoModelForCausalLM.from_config(config, dtype=resolve_dtype(cfg, device)).eval()
    model.set_attn_implementation(gqa_attention())
    tokenizer = load_tokenizer(TrainConfig.from_preset("embedded"))  # ids fit in the larger vocabulary
    return attach_adapter(float32_head(model), cfg), tokenizer


@dataclass
class _Timed:
    seconds: float
    peak_bytes: int


def _timed(device, fn, num_threads: int = 0):
    share_cpu(num_threads)  # follow the other attnrl processes that started or stopped meanwhile
    reset_peak_memory(device)
    synchronize(device)
    t = time.perf_counter()
    out = fn()
    synchronize(device)
    return out, _Timed(time.perf_counter() - t, peak_memory_bytes(device))


def run_benchmark(preset: str = "embedded", skip_naive: bool = False, **overrides) -> dict:
    spec = dict(PRESETS[preset])
    cfg = TrainConfig.from_preset(spec.pop("preset"), **{**spec, **overrides})
    device = resolve_device(cfg)
    # registered before the model loads, so that benches started together see each other
    with sharing_cpu(device):
        return _benchmark(cfg, preset, device, skip_naive)


def _benchmark(cfg: TrainConfig, preset: str, device: torch.device, skip_naive: bool) -> dict:
    keep_freed_memory(device)
    torch.manual_seed(cfg.seed)
    if preset in SHAPES:
        model, tokenizer = _random_model(preset, cfg, device)
        cfg = cfg.replace(dataset_name=EMBEDDED_DATASET, dataset_config="")
    else:
        model, tokenizer = load_policy(cfg, device)
    sep, geo = encode_separators(tokenizer), head_geometry(model)
    params = sum(p.numel() for p in model.parameters())
    embed = key_embedding_fn(model, device, layer=cfg.similarity_layer, how=cfg.similarity_readout)
    batch = next(iter_key_value_batches(cfg, tokenizer, embed))
    B = batch.batch_size
    kwargs = dict(**rollout_options(cfg), greedy=True)  # greedy: the naive path must choose the same pairs

    # Each phase is timed after one untimed run of the same size: a long run's steady state. The first
    # episode of a run also pays for growing the heap (and CUDA's caching allocator) to the phase's peak.
    share_cpu(cfg.num_threads)
    rollout(model, batch, sep, geo, **kwargs)
    traj, t_cached = _timed(device, lambda: rollout(model, batch, sep, geo, **kwargs), cfg.num_threads)
    result = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else
              f"cpu ({torch.get_num_threads()} threads)", "preset": preset, "batch_size": B,
              "steps": batch.pool.shape[1], "params": params}
    result["flop_formula"] = ("rollout 2N/token read + 2VH/logit; update 4N/trained token + 4VH/query position; "
                              "N = non-embedding params")
    rollout_cost = rollout_work(traj)
    tokens_read = rollout_cost.tokens
    result["rollout_seconds"] = t_cached.seconds
    result["rollout_trajectories_per_second"] = B / t_cached.seconds
    result["rollout_tokens_per_second"] = tokens_read / t_cached.seconds
    result["rollout_peak_memory_bytes"] = t_cached.peak_bytes
    if cfg.compile:  # the same rollout with the decode steps compiled: its first run compiles, then steady state
        decode = decode_step_for(cfg, device)
        first, t_first = _timed(device, lambda: rollout(model, batch, sep, geo, decode_step=decode, **kwargs),
                                cfg.num_threads)
        compiled, t_compiled = _timed(device, lambda: rollout(model, batch, sep, geo, decode_step=decode, **kwargs),
                                      cfg.num_threads)
        result["compiled_rollout_seconds"] = t_compiled.seconds
        result["compile_seconds"] = t_first.seconds - t_compiled.seconds  # what the first rollout paid on top
        result["compiled_speedup"] = t_cached.seconds / t_compiled.seconds
        result["compiled_tokens_match"] = bool(torch.equal(compiled.tokens.cpu(), traj.tokens.cpu()))
        result["compiled_max_reward_difference"] = (compiled.rewards.float() - traj.rewards.float()).abs().max().item()
    if not skip_naive:  # timed after one untimed run too, so the speedup compares steady states
        naive_rollout(model, batch, sep, geo, cfg.tokens_per_query, cfg.temperature)
        (chosen, rewards), t_naive = _timed(device, lambda: naive_rollout(model, batch, sep, geo, cfg.tokens_per_query,
                                                                          cfg.temperature), cfg.num_threads)
        same_pairs = torch.equal(chosen.cpu(), traj.choices.cpu())
        result["naive_seconds"] = t_naive.seconds
        result["naive_trajectories_per_second"] = B / t_naive.seconds
        result["speedup_vs_naive"] = t_naive.seconds / t_cached.seconds
        result["pairs_match"] = same_pairs
        result["max_reward_difference"] = (rewards.float() - traj.rewards.float()).abs().max().item()
        result["rewards_match"] = same_pairs and result["max_reward_difference"] < 1e-3
        result["naive_peak_memory_bytes"] = t_naive.peak_bytes

    optimizer = make_optimizer(model, cfg)
    selected = torch.ones(B, dtype=torch.bool)
    adapter = adapter_parameters(model)
    policy = [p.detach().clone() for p in adapter]
    update_policy(model, make_optimizer(model, cfg), traj, torch.arange(B) < cfg.training_batch_size,
                  training_batch_size=cfg.training_batch_size, **update_options(cfg))  # warm-up: one micro-batch
    load_values(adapter, policy)  # the timed update starts from the policy that rolled the batch out
    upd, t_update = _timed(device, lambda: update_policy(model, optimizer, traj, selected,
                                                         training_batch_size=cfg.training_batch_size,
                                                         **update_options(cfg)), cfg.num_threads)
    update_cost = update_work(B, read_length(traj.query_positions), traj.query_positions.numel())
    trained_tokens = update_cost.tokens  # what the update reads
    result["update_seconds"] = t_update.seconds
    result["update_tokens_per_second"] = trained_tokens / t_update.seconds
    result["update_peak_memory_bytes"] = t_update.peak_bytes

    peak = matmul_flops_per_second(device)
    vh = model.config.vocab_size * model.config.hidden_size
    non_embedding = params - vh * (1 if model.config.tie_word_embeddings else 2)
    rollout_flops = forward_flops(rollout_cost, non_embedding, vh)
    update_flops = training_flops(update_cost, non_embedding, vh)
    result["matmul_flops_per_second"] = peak
    result["rollout_flops_per_second"] = rollout_flops / t_cached.seconds
    result["update_flops_per_second"] = update_flops / t_update.seconds
    result["fraction_of_matmul_peak"] = (rollout_flops + update_flops) / (t_cached.seconds + t_update.seconds) / peak
    result["rollout_fraction_of_matmul_peak"] = result["rollout_flops_per_second"] / peak
    result["update_fraction_of_matmul_peak"] = result["update_flops_per_second"] / peak
    result["peak_memory_bytes"] = max(t_cached.peak_bytes, t_update.peak_bytes)
    return result


def format_result(r: dict) -> str:
    rows = [("device", r["device"]), ("preset", f"{r['preset']} (B={r['batch_size']}, {r['steps']} steps, "
                                                f"{r['params'] / 1e6:.0f}M params)"),
            ("cached rollout", f"{r['rollout_trajectories_per_second']:.2f} traj/s, "
                               f"{r['rollout_tokens_per_second']:.0f} tok/s, {r['rollout_seconds']:.1f}s")]
    if "compiled_rollout_seconds" in r:
        rows += [("compiled rollout", f"{r['compiled_rollout_seconds']:.1f}s ({r['compiled_speedup']:.2f}x eager; "
                                      f"compiling {r['compile_seconds']:.1f}s); same tokens: "
                                      f"{r['compiled_tokens_match']}, max reward diff "
                                      f"{r['compiled_max_reward_difference']:.2e}")]
    if "naive_seconds" in r:
        rows += [("naive rollout", f"{r['naive_trajectories_per_second']:.2f} traj/s, {r['naive_seconds']:.1f}s"),
                 ("speedup", f"{r['speedup_vs_naive']:.2f}x; same pairs: {r['pairs_match']}, "
                             f"max reward diff {r['max_reward_difference']:.2e}")]
    gf = 1e9
    rows += [("update", f"{r['update_tokens_per_second']:.0f} trained tok/s, {r['update_seconds']:.1f}s"),
             ("matmul rate", f"{r['matmul_flops_per_second'] / gf:.1f} GFLOP/s"),
             ("useful FLOP/s", f"rollout {r['rollout_flops_per_second'] / gf:.1f} "
                               f"({r['rollout_fraction_of_matmul_peak']:.0%}), update "
                               f"{r['update_flops_per_second'] / gf:.1f} ({r['update_fraction_of_matmul_peak']:.0%}), "
                               f"episode {r['fraction_of_matmul_peak']:.0%} of matmul"),
             ("peak memory", f"rollout {r['rollout_peak_memory_bytes'] / 2**30:.2f} GiB, "
                             f"update {r['update_peak_memory_bytes'] / 2**30:.2f} GiB")]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:{width}}  {v}" for k, v in rows)


def main_bench(preset: str, as_json: bool, skip_naive: bool, batch_size: int | None = None,
               num_kv_pairs: int | None = None, num_threads: int = 0, compile: bool = False) -> int:
    overrides = {"num_threads": num_threads, "compile": int(compile)}
    if batch_size is not None:
        overrides.update(generation_batch_size=batch_size,
                         training_batch_size=min(batch_size, PRESETS[preset]["training_batch_size"]))
    if num_kv_pairs is not None:
        overrides["num_kv_pairs"] = num_kv_pairs
    result = run_benchmark(preset, skip_naive=skip_naive, **overrides)
    print(format_result(result))
    if as_json:
        print(json.dumps(result))
    return 0
