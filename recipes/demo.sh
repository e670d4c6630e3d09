#!/usr/bin/env bash
# The demo, the README's main command: on 2 CPU cores in under 10 minutes it synthesises a
# small LibriSpeech of real (eSpeak NG) speech, shards it, pre-trains the `demo` model for a
# few hundred updates and prints the eval loss before and after. Everything it writes goes
# under $WORK (default exp/demo). Extra flags go to the trainer:
#   bash recipes/demo.sh                      # all stages
#   STAGE=2 bash recipes/demo.sh --max_train_steps 50
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
export RECIPE=demo
export WORK=${WORK:-$REPO/exp/demo}
export TRAIN_SPLITS=train-clean-100 EVAL_SPLIT=dev-clean
export SHARD_FLAGS="--samples_per_shard 24"
export SHARD_WORKERS=${SHARD_WORKERS:-2}
export BACKEND=${BACKEND:-cpu}
STAGE=${STAGE:-0}
SEED=${SEED:-0}
NUM_SPEAKERS=${NUM_SPEAKERS:-8}          # 8 speakers x 2 chapters x 12 utterances ≈ 0.7 h
UTTERANCES_PER_CHAPTER=${UTTERANCES_PER_CHAPTER:-12}
export TRAIN_FLAGS="--preset demo --max_train_steps ${STEPS:-300} --num_warmup_steps 30
  --learning_rate 1e-3 --per_device_train_batch_size 4 --max_duration_in_seconds 8
  --min_duration_in_seconds 2 --num_buckets 3 --logging_steps 25 --saving_steps 100
  --seed $SEED --num_workers 2"

log() { echo "$(date '+%H:%M:%S') [demo] $*"; }
cd "$REPO"
mkdir -p "$WORK"
if [ "$STAGE" -le 0 ] && [ ! -f "$WORK/.corpus.done" ]; then
  log "stage 0: synthesising the demo corpus under $WORK/LibriSpeech"
  for split in train-clean-100 dev-clean; do
    seed=$SEED; [ "$split" = dev-clean ] && seed=$((SEED + 1))
    python tools/make_demo_corpus.py --output_dir "$WORK/LibriSpeech" --split "$split" \
      --num_speakers "$NUM_SPEAKERS" --utterances_per_chapter "$UTTERANCES_PER_CHAPTER" \
      --seed "$seed"
  done
  touch "$WORK/.corpus.done"
fi
STAGE=$(( STAGE < 1 ? 1 : STAGE )) bash recipes/pretrain.sh "$@"
python - "$WORK/model" <<'PY'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
evals = [r for r in map(json.loads, open(out / "metrics.jsonl")) if "eval_loss" in r]
first, last = evals[0], evals[-1]
print(f"eval loss: {first['eval_loss']:.3f} at step {first['step']} -> "
      f"{last['eval_loss']:.3f} at step {last['step']}; its contrastive term "
      f"{first['eval_contrastive_loss']:.3f} -> {last['eval_contrastive_loss']:.3f} "
      f"(uniform guessing: ln 101 = 4.615); accuracy {first['eval_accuracy']:.1%} -> "
      f"{last['eval_accuracy']:.1%} (chance: about 1%)")
ckpts = sorted(out.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
print(f"model saved in {ckpts[-1]} (Wav2Vec2ForPreTraining.from_pretrained loads it)")
print(f"training report: {out / 'report.png'}")
PY
