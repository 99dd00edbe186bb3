#!/usr/bin/env bash
# Issue 39's hindsight overfit check (EXPERIMENTS.md §7.3): the overfit setting (the retriever setting, the lever
# setting, --hindsight_weight 1) on 8 training articles, 60 episodes, one thread each: seed 0 on the first 8 training
# articles (hindsight-s0), then seed 1 on the next 8 (hindsight-s1-next8, --skip_train_articles 8: another seed and
# other articles, as a replication of the check should be). A finished
# run is skipped and a cut one resumed (checkpoints every 5 episodes), so it can run in the background across
# sessions; run it from a clone at a fixed commit so that code changes do not mix into it:
#   git clone . ../clone-hind && cd ../clone-hind && PY=$PWD/../main/.venv/bin/python bash research/hindsight_overfit.sh OUT
# STEPS=K takes --hindsight_steps K (runs named hindsight-kK-sS...); SEEDS="1" runs only those seeds.
set -u
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
OUT=${1:-runs/overfit39}
STEPS=${STEPS:-1}
SEEDS=${SEEDS:-0 1}
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" OMP_NUM_THREADS=1
for seed in $SEEDS; do
  skip=$((8 * seed))
  run="$OUT/hindsight-$([[ $STEPS == 1 ]] || echo "k$STEPS-")s$seed$([[ $seed == 0 ]] || echo -next8)"
  if [[ -f "$run/metrics.jsonl" && $(wc -l < "$run/metrics.jsonl") -ge 60 ]]; then continue; fi
  if [[ -d "$run/checkpoints" ]]; then
    "$PY" -m attnrl_core train --resume --output_dir "$run" --no_progress >> "$run.log" 2>&1 || exit 1
  else
    "$PY" -m attnrl_core train --preset embedded --num_kv_pairs 16 --max_train_articles 8 --skip_train_articles "$skip" \
      --num_episodes 60 --num_threads 1 --checkpoint_every 5 --seed "$seed" --training_oracle 1 --learning_rate 1e-3 \
      --kl_reference base --reward_baseline leave_one_out --trajectories_per_article 4 --choice_in_loss 1 \
      --similarity_readout last --temperature 8 --hindsight_weight 1 --hindsight_steps "$STEPS" --no_progress --output_dir "$run" \
      >> "$run.log" 2>&1 || exit 1
  fi
done
