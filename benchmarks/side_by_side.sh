#!/usr/bin/env bash
# Side-by-side runs on the CPU (BENCHMARKS.md): the wall time of one `bench --batch_size 8 --skip_naive`
# alone, then of two started together. Each process takes its share of the cores among the attnrl
# processes running (host.share_cpu), so two should take about twice as long as one on 2 cores, not 5-20x.
# Run it on a quiet machine: `bash benchmarks/side_by_side.sh` (about 4 minutes on 2 cores).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
ARGS=(-m attnrl_core bench --batch_size 8 --skip_naive --json)
log=$(mktemp -d)

start=$(date +%s.%N)
"$PY" "${ARGS[@]}" > "$log/alone.txt" 2>&1
alone=$(echo "$(date +%s.%N) - $start" | bc)
echo "one process alone:        ${alone} s"

start=$(date +%s.%N)
"$PY" "${ARGS[@]}" > "$log/a.txt" 2>&1 &
a=$!
"$PY" "${ARGS[@]}" > "$log/b.txt" 2>&1 &
b=$!
wait "$a"; first=$(echo "$(date +%s.%N) - $start" | bc)
wait "$b"; both=$(echo "$(date +%s.%N) - $start" | bc)
echo "two processes together:   ${first} s and ${both} s (ratio $(echo "scale=2; $both / $alone" | bc) of one alone)"
for f in alone a b; do
  tail -1 "$log/$f.txt" | "$PY" -c "import json,sys; r=json.load(sys.stdin); print('  $f: rollout %.1f s, update %.1f s on %s' % (r['rollout_seconds'], r['update_seconds'], r['device']))"
done
