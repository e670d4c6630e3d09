#!/usr/bin/env bash
# Shared by demo.sh, base.sh and large.sh: shard LibriSpeech, then pre-train.
# Knobs come from the calling recipe (or the environment); "$@" goes to the trainer.
#   stage 1: tools/make_shards.py for the train splits and the eval split (.done markers)
#   stage 2: python -m w2v_stream.train
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
: "${RECIPE:?set by the calling recipe}"
WORK=${WORK:-$REPO/exp/$RECIPE}
LIBRISPEECH=${LIBRISPEECH:-$WORK/LibriSpeech}      # OpenSLR root, or where split .tar.gz lie
SHARDS=${SHARDS:-$WORK/shards}                      # made here unless they exist (.done)
TRAIN_SPLITS=${TRAIN_SPLITS:-train-clean-100 train-clean-360 train-other-500}
EVAL_SPLIT=${EVAL_SPLIT:-dev-clean}
BACKEND=${BACKEND:-auto}
STAGE=${STAGE:-1}
STOP_STAGE=${STOP_STAGE:-2}
SHARD_WORKERS=${SHARD_WORKERS:-$(nproc)}
: "${TRAIN_FLAGS:?set by the calling recipe}"

log() { echo "$(date '+%H:%M:%S') [$RECIPE] $*"; }
cd "$REPO"
mkdir -p "$WORK"

split_input() {  # a split folder under the root, else its OpenSLR archive
  if [ -d "$LIBRISPEECH/$1" ]; then echo "$LIBRISPEECH/$1"; else echo "$LIBRISPEECH/$1.tar.gz"; fi
}

if [ "$STAGE" -le 1 ] && [ "$STOP_STAGE" -ge 1 ]; then
  if [ ! -f "$SHARDS/train/.done" ]; then
    inputs=(); for s in $TRAIN_SPLITS; do inputs+=("$(split_input "$s")"); done
    log "stage 1: sharding $TRAIN_SPLITS into $SHARDS/train"
    python tools/make_shards.py "${inputs[@]}" --output_dir "$SHARDS/train" --shuffle \
      --num_workers "$SHARD_WORKERS" ${SHARD_FLAGS:-}
    touch "$SHARDS/train/.done"
  fi
  if [ ! -f "$SHARDS/eval/.done" ]; then
    log "stage 1: sharding $EVAL_SPLIT into $SHARDS/eval"
    python tools/make_shards.py "$(split_input "$EVAL_SPLIT")" --output_dir "$SHARDS/eval" \
      --num_workers "$SHARD_WORKERS" ${SHARD_FLAGS:-}
    touch "$SHARDS/eval/.done"
  fi
fi

if [[ $BACKEND == ipu && $TRAIN_FLAGS == *--gradient_checkpointing* ]]; then
  # torch's recompute: poptorch does not trace it (its own recomputation options apply).
  log "BACKEND=ipu: leaving out --gradient_checkpointing"
  TRAIN_FLAGS=${TRAIN_FLAGS//--gradient_checkpointing/}
fi

if [ "$STAGE" -le 2 ] && [ "$STOP_STAGE" -ge 2 ]; then
  log "stage 2: pre-training into $WORK/model"
  resume=()
  if ls -d "$WORK"/model/checkpoint-* >/dev/null 2>&1; then resume=(--resume_from_checkpoint latest); fi
  # shellcheck disable=SC2086  # TRAIN_FLAGS is a list of flags
  python -m w2v_stream.train --train_shards "$SHARDS/train" --eval_shards "$SHARDS/eval" \
    --output_dir "$WORK/model" --backend "$BACKEND" $TRAIN_FLAGS "${resume[@]}" "$@"
  log "done: checkpoints in $WORK/model"
fi
