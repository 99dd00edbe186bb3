#!/usr/bin/env bash
# Time per episode of one training process and of a data-parallel run of two (torchrun, gloo on the CPU),
# with the same global batch (BENCHMARKS.md). On 2 cores: one process with both threads, against two
# processes of one thread each. Episode 1 (warm-up) is left out of the mean.
# Run it on a quiet machine: `bash benchmarks/data_parallel.sh` (about 3 minutes on 2 cores).
# On N GPUs: `NPROC=N THREADS=0 ARGS="--preset embedded --device cuda ..." bash benchmarks/data_parallel.sh`.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
NPROC=${NPROC:-2}
THREADS=${THREADS:-1}
read -r -a RUN <<< "${ARGS:---preset embedded --generation_batch_size 8 --training_batch_size 4 --num_kv_pairs 8 --num_episodes 6 --warmup_trajectories 8 --filter_num_sd 0 --lora_dropout 0 --checkpoint_every 100 --no_progress}"
out=$(mktemp -d)

"$PY" -m attnrl_core train "${RUN[@]}" --num_threads $((THREADS * NPROC)) --output_dir "$out/one" > "$out/one.log" 2>&1
"$PY" -m torch.distributed.run --standalone --nproc_per_node "$NPROC" -m attnrl_core train "${RUN[@]}" \
    --num_threads "$THREADS" --output_dir "$out/many" > "$out/many.log" 2>&1
"$PY" - "$out" "$NPROC" <<'PYEOF'
import json, statistics, sys
from pathlib import Path
out, n = Path(sys.argv[1]), int(sys.argv[2])
for name, label in (("one", "1 process"), ("many", f"{n} processes")):
    m = [json.loads(line) for line in (out / name / "metrics.jsonl").read_text().splitlines()][1:]
    s = [r["seconds"] for r in m]
    print(f"{label:12s}: {statistics.mean(s):.2f} s per episode (SD {statistics.stdev(s):.2f}, episodes 2-{len(s) + 1}), "
          f"rollout {statistics.mean(r['rollout_seconds'] for r in m):.2f} s, update "
          f"{statistics.mean(r['update_seconds'] for r in m):.2f} s, "
          f"{statistics.mean(r['tokens_per_second_per_device'] for r in m):.0f} tokens/s per device")
a = [json.loads(l)["reward"] for l in (out / "one" / "metrics.jsonl").read_text().splitlines()]
b = [json.loads(l)["reward"] for l in (out / "many" / "metrics.jsonl").read_text().splitlines()]
# Episode 1 runs the same adapter in both: its rewards differ only by rounding. Later episodes follow updates whose
# sums ran on different thread counts, which Adam's normalised steps amplify until samples differ.
print(f"episode 1 reward difference (same adapter, different thread counts): {abs(a[0] - b[0]):.1e}; "
      f"largest over all episodes: {max(abs(x - y) for x, y in zip(a, b)):.1e}")
PYEOF
