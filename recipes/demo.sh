#!/usr/bin/env bash
# The demo: a synthetic LibriSpeech of real (eSpeak NG) speech → WebDataset shards.
# Everything it writes goes under $WORK (default exp/demo inside the checkout).
#   bash recipes/demo.sh                   # all stages
#   STAGE=1 STOP_STAGE=1 bash recipes/demo.sh --num_workers 2   # extra flags go to make_shards
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
WORK=${WORK:-$REPO/exp/demo}
STAGE=${STAGE:-0}
STOP_STAGE=${STOP_STAGE:-1}
SEED=${SEED:-0}
NUM_SPEAKERS=${NUM_SPEAKERS:-8}          # 8 speakers x 2 chapters x 12 utterances ≈ 0.7 h
UTTERANCES_PER_CHAPTER=${UTTERANCES_PER_CHAPTER:-12}
SAMPLES_PER_SHARD=${SAMPLES_PER_SHARD:-24}

log() { echo "$(date '+%H:%M:%S') [demo] $*"; }
cd "$REPO"
mkdir -p "$WORK"

if [ "$STAGE" -le 0 ] && [ "$STOP_STAGE" -ge 0 ] && [ ! -f "$WORK/.corpus.done" ]; then
  log "stage 0: synthesising the demo corpus under $WORK/LibriSpeech"
  for split in train-clean-100 dev-clean; do
    seed=$SEED; [ "$split" = dev-clean ] && seed=$((SEED + 1))
    python tools/make_demo_corpus.py --output_dir "$WORK/LibriSpeech" --split "$split" \
      --num_speakers "$NUM_SPEAKERS" --utterances_per_chapter "$UTTERANCES_PER_CHAPTER" \
      --seed "$seed"
  done
  touch "$WORK/.corpus.done"
fi

if [ "$STAGE" -le 1 ] && [ "$STOP_STAGE" -ge 1 ] && [ ! -f "$WORK/.shards.done" ]; then
  for split in train-clean-100 dev-clean; do
    log "stage 1: sharding $split into $WORK/shards/$split"
    python tools/make_shards.py "$WORK/LibriSpeech/$split" --output_dir "$WORK/shards/$split" \
      --samples_per_shard "$SAMPLES_PER_SHARD" --min_duration_in_seconds 2.0 \
      --max_duration_in_seconds 20.0 --shuffle --seed "$SEED" "$@"
  done
  python tools/make_shards.py --verify --output_dir "$WORK/shards/train-clean-100"
  touch "$WORK/.shards.done"
fi
log "done: shards in $WORK/shards"
