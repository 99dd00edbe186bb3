"""The Python half of `benchmarks/gpu_proof.sh` (see there): a random model saved locally, and the decode step's proof.

  python benchmarks/gpu_proof.py model DIR [--tiny]
      Llama-3.2-3B's shape (28 layers, hidden 3072, 24/8 heads of 128, vocabulary 128,256) with random weights,
      or a 2-layer tiny one with `--tiny` (the CPU dry run), saved with the embedded SmolLM2 tokenizer (its ids
      fit either vocabulary) so that `train --model_name DIR` loads it like a Hub model, offline.
  python benchmarks/gpu_proof.py decode DIR OUT.json [--rows R] [--steps S]
      One rollout's decode step at SPEC's sizes (2 x 64 rows: policy and base; the cache at SPEC's final length,
      filled to its mean): milliseconds per step as plain forward passes, as the fixed-shape step, and compiled
      (`--compile`); on CUDA one fixed-shape and one compiled step under `torch.cuda.set_sync_debug_mode("error")`
      (a host synchronisation raises; tests/test_cuda.py runs the whole token loop so), the bytes a step must
      read (weights, the float32 head's input, the KV cache to its position) and the measured copy bandwidth, so
      `fraction_of_bandwidth_bound` is the step's time against the time to read those bytes once. The bound is
      the plain step's: the fixed-shape step reads its whole buffer, past the position too (at SPEC's sizes
      about twice the cache bytes at the mean position).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from attnrl_core.bench import SHAPES
from attnrl_core.config import TrainConfig
from attnrl_core.data import encode_separators
from attnrl_core.decoding import BufferedCache, DecodeStep, forward_logits
from attnrl_core.host import synchronize
from attnrl_core.model import attach_adapter, float32_head, gqa_attention, load_tokenizer, policy_and_base


def save_model(out: Path, tiny: bool) -> None:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    config = LlamaConfig(**SHAPES["tiny-shape" if tiny else "llama-3.2-3b-shape"], tie_word_embeddings=True, rope_theta=500000.0,
                         max_position_embeddings=4096, bos_token_id=1, eos_token_id=2)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.save_pretrained(out)
    load_tokenizer(TrainConfig.from_preset("embedded")).save_pretrained(out)


def _step_ms(fn, steps: int, device: torch.device) -> float:
    fn()  # warm: allocation, compile or graph capture
    fn()
    synchronize(device)
    t = time.perf_counter()
    for _ in range(steps):
        fn()
    synchronize(device)
    return (time.perf_counter() - t) / steps * 1e3


def _bandwidth(device: torch.device) -> float:
    """Bytes per second of a large device-to-device copy (read + write counted)."""
    n = 2**30 if device.type == "cuda" else 2**26
    a, b = torch.empty(n, dtype=torch.uint8, device=device), torch.empty(n, dtype=torch.uint8, device=device)
    ms = _step_ms(lambda: b.copy_(a), 10, device)
    return 2 * n / (ms / 1e3)


@torch.inference_mode()
def decode_proof(model_dir: Path, rows: int, steps: int) -> dict:
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    cfg = TrainConfig.from_preset("llama-3.2-3b" if cuda else "embedded", model_name=str(model_dir),
                                  device=str(device))
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16 if cuda else torch.float32,
                                                 attn_implementation=gqa_attention()).to(device)
    model = attach_adapter(float32_head(model), cfg).eval()
    sep = encode_separators(load_tokenizer(cfg))
    P = math.ceil(cfg.subset_fraction * cfg.num_kv_pairs)  # steps
    q, r = sep.query.numel(), sep.response.numel()
    step_length = q + cfg.tokens_per_query + r + cfg.tokens_per_value  # as `rollout` lays a step out
    final = sep.bos.numel() + q + cfg.tokens_per_key + r + cfg.tokens_per_value + P * step_length
    both = policy_and_base(model, rows, device)
    vocab = model.config.vocab_size
    token = torch.randint(10, vocab, (2 * rows, 1), device=device)

    def cache_at(decode: DecodeStep | None):
        cache = BufferedCache(model.config, final) if decode is None else decode.cache(model.config, final)
        forward_logits(model, torch.randint(10, vocab, (2 * rows, final // 2), device=device), cache, 1, both)
        return cache

    result = {"device": torch.cuda.get_device_name(device) if cuda else "cpu", "rows": 2 * rows,
              "cache_length": final, "position": final // 2, "torch": torch.__version__}
    plain = cache_at(None)

    def plain_step():
        forward_logits(model, token, plain, 1, both)
        plain.crop(-1)  # back to the same length: every timed step reads the same cache

    result["plain_ms"] = _step_ms(plain_step, steps, device)
    for name, compiled in (("fixed_shape_ms", False), ("compiled_ms", True)):
        decode = DecodeStep(compiled=compiled, device=device)
        cache = cache_at(decode)
        position = torch.full((1,), final // 2, dtype=torch.long, device=device)

        def step():
            decode.step(model, token, cache.layers, position, both)  # writes the same position again: no advance

        t = time.perf_counter()
        step()
        synchronize(device)
        result[name.replace("_ms", "_first_call_s")] = time.perf_counter() - t
        result[name] = _step_ms(step, steps, device)
        if cuda:  # a value read or a blocking copy inside the step raises here
            torch.cuda.set_sync_debug_mode("error")
            try:
                step()
                result[name.replace("_ms", "_sync_free")] = True
            finally:
                torch.cuda.set_sync_debug_mode("default")
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    per_position = sum(2 * l.key_buffer[:, :, 0].numel() * l.key_buffer.element_size() for l in plain.layers)
    result["bytes_per_step"] = weights + per_position * (final // 2)  # the weights once, the cache to the position
    result["bandwidth_bytes_per_second"] = _bandwidth(device)
    bound_ms = result["bytes_per_step"] / result["bandwidth_bytes_per_second"] * 1e3
    result["bandwidth_bound_ms"] = bound_ms
    for name in ("plain_ms", "fixed_shape_ms", "compiled_ms"):
        result[name.replace("_ms", "_fraction_of_bandwidth_bound")] = bound_ms / result[name]
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    m = sub.add_parser("model")
    m.add_argument("dir", type=Path)
    m.add_argument("--tiny", action="store_true")
    d = sub.add_parser("decode")
    d.add_argument("dir", type=Path)
    d.add_argument("out", type=Path)
    d.add_argument("--rows", type=int, default=64)
    d.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()
    if args.command == "model":
        save_model(args.dir, args.tiny)
    else:
        result = decode_proof(args.dir, args.rows, args.steps)
        args.out.write_text(json.dumps(result, indent=2))
        print(json.dumps(result))


if __name__ == "__main__":
    main()
