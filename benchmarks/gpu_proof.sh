#!/usr/bin/env bash
# One prepared proof of the GPU path, for the day a GPU is lent (docs/gpu.md; issue 28). In at most about
# 8 minutes on one H100/H200, every figure as JSON in one folder:
#   1. the wheels it is handed (WHEELS=DIR: installed into /tmp/site, first on PYTHONPATH);
#   2. a Llama-3.2-3B-shaped model with random weights, saved locally (no Hub);
#   3. `train` at SPEC's sizes for 3 episodes in bf16, the process held to 16 GB
#      (`torch.cuda.set_per_process_memory_fraction`), SIGKILLed after its first checkpoint, then `--resume`d;
#      each episode's peak allocated and reserved memory per phase (train.json) beside the memory plan's figures
#      for the card and the bare CUDA context (memory.json);
#   4. the tests that need CUDA (`pytest -m cuda`: tests/test_cuda.py);
#   5. the decode step timed plain, fixed-shape and compiled against the HBM bound, the fixed-shape and compiled
#      steps run under `torch.cuda.set_sync_debug_mode("error")` (benchmarks/gpu_proof.py decode);
#   6. `bench --preset llama-3.2-3b-shape --compile --json`: rollout eager and compiled, update MFU against a
#      measured bf16 matmul.
# Usage: [WHEELS=DIR] bash benchmarks/gpu_proof.sh [--dry_run] [OUT]   (OUT defaults to runs/gpu-proof-DATE)
# It stops at once, in one line, where transformers or peft is older than pyproject.toml's bound (bring them as
# WHEELS); torch cannot travel as a wheel (the CUDA build is gigabytes), so an older torch is recorded and used.
# Each step has a time limit, and steps.log says when each began (seconds since the start).
# --dry_run: the same steps on the CPU at a tiny size (2 layers, 4 rows), float32, no memory cap: the script
# itself is tested in CI (tests/test_gpu_proof.py).
set -euo pipefail
[[ -z "${WHEELS:-}" ]] || WHEELS=$(cd "$WHEELS" && pwd)  # a relative WHEELS is the caller's, not the repository's
cd "$(dirname "$0")/.."
DRY=0
if [[ "${1:-}" == "--dry_run" ]]; then DRY=1; shift; fi
OUT=${1:-runs/gpu-proof-$(date +%Y%m%d-%H%M%S)}
PY=${PY:-python3}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
log() { echo "[gpu_proof $(date +%H:%M:%S) +${SECONDS}s] $*" | tee -a "$OUT/steps.log"; }

if [[ -n "${WHEELS:-}" ]]; then
  log "installing the wheels in $WHEELS"
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$WHEELS"/*.whl
  export PYTHONPATH="/tmp/site:$PYTHONPATH"
fi
# the versions it runs with, recorded; it stops here, in one line, if transformers or peft is older than the bounds
"$PY" - "$OUT/versions.json" <<'EOF' || { log "versions: $(cat "$OUT/versions.json")"; exit 2; }
import json, sys
import peft, torch, transformers
from attnrl_core.doctor import MIN_VERSIONS, _version_tuple
found = {"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__}
open(sys.argv[1], "w").write(json.dumps({**found, "cuda": torch.cuda.is_available()}))
old = [f"{p} {found[p]} < {MIN_VERSIONS[p]}" for p in ("transformers", "peft")
       if _version_tuple(found[p]) < _version_tuple(MIN_VERSIONS[p])]
if old:
    sys.exit(f"gpu_proof: {', '.join(old)}: bring newer wheels with WHEELS=DIR (docs/gpu.md)")
EOF
log "versions: $(cat "$OUT/versions.json")"

if [[ $DRY == 1 ]]; then
  TINY=(--tiny); ROWS=2; CAP=0
  SIZES=(--preset embedded --generation_batch_size 4 --training_batch_size 2 --num_kv_pairs 6 --tokens_per_key 5
         --tokens_per_value 4 --tokens_per_query 3 --warmup_trajectories 0 --filter_num_sd 0)
  BENCH=(--preset tiny-shape --batch_size 4 --num_kv_pairs 6)
else
  TINY=(); ROWS=64; CAP=16
  SIZES=(--preset llama-3.2-3b --dtype bfloat16 --warmup_trajectories 0 --filter_num_sd 0)
  BENCH=(--preset llama-3.2-3b-shape)
fi

log "2. a random model in $OUT/model"
timeout 180 "$PY" benchmarks/gpu_proof.py model "$OUT/model" "${TINY[@]}"

# train's entry point with the process held to CAP GB of the GPU first (0: no cap)
TRAIN=("$PY" -c "import sys, runpy, torch
cap = $CAP * 10**9
if cap and torch.cuda.is_available():
    torch.cuda.set_per_process_memory_fraction(min(1.0, cap / torch.cuda.get_device_properties(0).total_memory))
sys.argv = ['attnrl_core'] + sys.argv[1:]
runpy.run_module('attnrl_core', run_name='__main__')")
RUN="$OUT/train"
rm -rf "$RUN"
log "3. train 3 episodes, SIGKILL after the first checkpoint, resume"
"${TRAIN[@]}" train "${SIZES[@]}" --model_name "$OUT/model" --dataset_name embedded:gensim-enwiki \
  --dataset_config "" --num_episodes 3 --checkpoint_every 1 --no_progress --output_dir "$RUN" \
  > "$OUT/train.log" 2>&1 &
pid=$!
for _ in $(seq 480); do  # at most 4 minutes to the first checkpoint
  [[ -d "$RUN/checkpoints/episode-1" ]] && break
  kill -0 "$pid" 2>/dev/null || break
  sleep 0.5
done
kill -9 "$pid" 2>/dev/null || true  # the SIGKILL after the first checkpoint (or at the time limit, without one)
wait "$pid" 2>/dev/null || true
[[ -d "$RUN/checkpoints/episode-1" ]] || { log "train wrote no checkpoint: see $OUT/train.log"; tail -20 "$OUT/train.log"; exit 1; }
timeout 300 "${TRAIN[@]}" train --resume --output_dir "$RUN" --no_progress >> "$OUT/train.log" 2>&1 || \
  { log "the resumed train failed or ran out of time: see $OUT/train.log"; tail -20 "$OUT/train.log"; exit 1; }
"$PY" - "$RUN" > "$OUT/train.json" <<'EOF'
import json, sys
rows = [json.loads(line) for line in open(f"{sys.argv[1]}/metrics.jsonl")]
keys = ("episode", "reward", "seconds", "peak_memory_bytes", "tokens_per_second", "rollout_chunk", "micro_batch",
        # on CUDA, each phase's peaks of every episode (issue 38): the plan's error is read off these
        "rollout_peak_allocated_bytes", "rollout_peak_reserved_bytes", "update_peak_allocated_bytes",
        "update_peak_reserved_bytes", "outside_allocator_bytes")
print(json.dumps({"episodes": [{k: r.get(k) for k in keys} for r in rows]}))
EOF
log "train: $(cat "$OUT/train.json")"
# beside it, the plan's figures for the same run and card, and the bare CUDA context (before any kernel loads)
"$PY" -m attnrl_core memory "${SIZES[@]}" --gpu_memory "$([[ $CAP == 0 ]] && echo 16 || echo "$CAP")GB" --json \
  > "$OUT/memory_plan.json"
"$PY" - "$OUT/memory_plan.json" > "$OUT/memory.json" <<'EOF'
import json, sys
import torch
plan = json.loads(open(sys.argv[1]).read())
context = None
if torch.cuda.is_available():
    torch.zeros(1, device="cuda")
    free, total = torch.cuda.mem_get_info()
    context = total - free - torch.cuda.memory_reserved()
print(json.dumps({"context_bytes": context, "plan_rollout": plan["chosen"]["plan"]["card"]["rollout"],
                  "plan_update": plan["chosen"]["plan"]["card"]["update"], "gpu_arch": plan["gpu_arch"],
                  "allocator_setting": plan["allocator_setting"]}))
EOF
log "memory: $(cat "$OUT/memory.json")"
[[ $(wc -l < "$RUN/metrics.jsonl") == 3 ]] || { log "expected 3 episodes after the resume"; exit 1; }

log "4. the tests that need CUDA"
if "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  timeout 240 "$PY" -m pytest -q -p no:cacheprovider -m cuda tests > "$OUT/cuda_tests.log" 2>&1 || \
    { log "CUDA tests failed: see $OUT/cuda_tests.log"; tail -5 "$OUT/cuda_tests.log"; }
else
  echo "no CUDA: skipped" > "$OUT/cuda_tests.log"
fi

log "5. the decode step: plain, fixed-shape and compiled, host-sync checked on CUDA"
timeout 300 "$PY" benchmarks/gpu_proof.py decode "$OUT/model" "$OUT/decode.json" --rows "$ROWS" > "$OUT/decode.log" 2>&1 || \
  { tail -20 "$OUT/decode.log"; exit 1; }
log "decode: $(cat "$OUT/decode.json" | tr -d '\n ')"

log "6. bench, eager and compiled"
timeout 300 "$PY" -m attnrl_core bench "${BENCH[@]}" --skip_naive --compile --json > "$OUT/bench.log" 2>&1 || \
  { tail -20 "$OUT/bench.log"; exit 1; }
tail -1 "$OUT/bench.log" > "$OUT/bench.json"
log "bench: $(cat "$OUT/bench.json")"
log "done: $OUT"
