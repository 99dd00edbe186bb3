#!/usr/bin/env bash
# Carry an experiment's runs across sessions whose machine is not kept (only git is): copy each run's config,
# metrics, trajectories, evaluation reports and its newest checkpoint (what `experiment` needs to skip a finished
# run or resume a cut one) from SRC to DST. Older checkpoints stay behind.
#   bash experiments/keep.sh runs/experiments/second experiments/kept/second    # keep (then git add, commit)
#   bash experiments/keep.sh experiments/kept/second runs/experiments/second    # restore, then run `experiment`
set -euo pipefail
SRC=${1:?usage: keep.sh SRC DST}
DST=${2:?usage: keep.sh SRC DST}
for run in "$SRC"/*/; do
  run=${run%/}; name=$(basename "$run")
  [[ -f "$run/config.json" ]] || continue
  newest=$(ls -d "$run"/checkpoints/episode-* 2>/dev/null | sort -t- -k2 -n | tail -1 || true)
  [[ -n "$newest" ]] || continue  # nothing to resume from yet
  rm -rf "${DST:?}/$name.tmp"
  mkdir -p "$DST/$name.tmp/checkpoints"
  for f in config.json metrics.jsonl trajectories.jsonl; do [[ -f "$run/$f" ]] && cp "$run/$f" "$DST/$name.tmp/"; done
  [[ -d "$run/eval" ]] && cp -r "$run/eval" "$DST/$name.tmp/"
  cp -r "$newest" "$DST/$name.tmp/checkpoints/"
  rm -rf "${DST:?}/$name" && mv "$DST/$name.tmp" "$DST/$name"
  echo "$name: $(wc -l < "$run/metrics.jsonl") episodes, kept $(basename "$newest")"
done
