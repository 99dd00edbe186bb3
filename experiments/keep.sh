#!/usr/bin/env bash
# Keep an experiment's finished runs in git, slimmed to what its tables need: each run's config, metrics and
# evaluation reports (the per-unit values every interval is computed from), and the summary; no checkpoints or
# trajectories (they made the tracked tree 43 MiB). `experiment` treats such a run as finished (its metrics
# reach num_episodes and its final evaluation report exists), so `experiment --markdown` and a rerun that adds
# seeds or arms work from the kept copy; a run that is not finished yet is not kept (resume it where it runs).
#   bash experiments/keep.sh runs/experiments/third experiments/kept/third    # then git add, commit
set -euo pipefail
SRC=${1:?usage: keep.sh SRC DST}
DST=${2:?usage: keep.sh SRC DST}
for run in "$SRC"/*/; do
  run=${run%/}; name=$(basename "$run")
  [[ -f "$run/config.json" && -d "$run/eval" ]] || continue  # not evaluated yet: nothing to keep
  rm -rf "${DST:?}/$name.tmp"
  mkdir -p "$DST/$name.tmp/eval"
  cp "$run/config.json" "$run/metrics.jsonl" "$DST/$name.tmp/"
  cp "$run"/eval/*.json "$DST/$name.tmp/eval/"
  rm -rf "${DST:?}/$name" && mv "$DST/$name.tmp" "$DST/$name"
  echo "$name: $(wc -l < "$run/metrics.jsonl") episodes, $(ls "$run"/eval/*.json | wc -l) evaluation report(s)"
done
[[ -f "$SRC/summary.json" ]] && cp "$SRC/summary.json" "$DST/" || true
