#!/usr/bin/env bash
# Shared by demo.sh, base.sh, large.sh and continue.sh: make shards, then pre-train.
# Knobs come from the calling recipe (or the environment); "$@" goes to the trainer.
#   stage 1: w2v-make-shards for the train inputs and the eval inputs (.done markers)
#   stage 2: the trainer, under torchrun when NPROC x NNODES > 1; resumes from the latest
#            checkpoint in WORK/model when there is one (else starts from INIT_FROM's weights
#            when that is set)
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
: "${RECIPE:?set by the calling recipe}"
WORK=${WORK:-$REPO/exp/$RECIPE}
LIBRISPEECH=${LIBRISPEECH:-$WORK/LibriSpeech}      # OpenSLR root, or where split .tar.gz lie
SHARDS=${SHARDS:-$WORK/shards}                      # made here unless they exist (.done)
TRAIN_SPLITS=${TRAIN_SPLITS:-train-clean-100 train-clean-360 train-other-500}
EVAL_SPLIT=${EVAL_SPLIT:-dev-clean}
TRAIN_INPUTS=${TRAIN_INPUTS:-}       # instead of LibriSpeech splits: your audio, one path a line
EVAL_INPUTS=${EVAL_INPUTS:-}
BACKEND=${BACKEND:-auto}
NPROC=${NPROC:-1}                                   # processes (GPUs) per machine
NNODES=${NNODES:-1}                                 # machines; each runs this script with
NODE_RANK=${NODE_RANK:-0}                           # its own NODE_RANK and the same
MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}               # MASTER_ADDR (node 0's address)
MASTER_PORT=${MASTER_PORT:-29500}
STAGE=${STAGE:-1}
STOP_STAGE=${STOP_STAGE:-2}
SHARD_WORKERS=${SHARD_WORKERS:-$(nproc)}
# base.sh and large.sh give SIZE_FLAGS, GPU_FLAGS and IPU_CONFIG; the others give TRAIN_FLAGS.
if [ -z "${TRAIN_FLAGS:-}" ]; then
  : "${SIZE_FLAGS:?set by the calling recipe}"
  SCHEDULE="--max_train_steps 200000 --num_warmup_steps 32000 --learning_rate 0.001
    --weight_decay 0.01 --adam_beta1 0.9 --adam_beta2 0.98 --min_duration_in_seconds 2.0
    --logging_steps 1 --saving_steps 10000"
  if [ "$BACKEND" = ipu ]; then  # Graphcore's example: micro-batch 1 of up to 15.6 s
    DEVICE_FLAGS="--ipu_config_name $IPU_CONFIG --per_device_train_batch_size 1
      --max_duration_in_seconds 15.6 --adam_epsilon 1e-04"
  else
    DEVICE_FLAGS="$GPU_FLAGS --max_duration_in_seconds 20.0 --adam_epsilon 1e-06
      --gradient_checkpointing"
  fi
  TRAIN_FLAGS="$SIZE_FLAGS $SCHEDULE $DEVICE_FLAGS ${TRAIN_FLAGS_EXTRA:-}"
fi

log() { echo "$(date '+%H:%M:%S') [$RECIPE] $*"; }
cd "$REPO"
mkdir -p "$WORK"

split_input() {  # a split folder under the root, else its OpenSLR archive
  if [ -d "$LIBRISPEECH/$1" ]; then echo "$LIBRISPEECH/$1"; else echo "$LIBRISPEECH/$1.tar.gz"; fi
}

if [ "$STAGE" -le 1 ] && [ "$STOP_STAGE" -ge 1 ]; then
  if [ ! -f "$SHARDS/train/.done" ]; then
    if [ -n "$TRAIN_INPUTS" ]; then mapfile -t inputs <<< "$TRAIN_INPUTS"
    else inputs=(); for s in $TRAIN_SPLITS; do inputs+=("$(split_input "$s")"); done; fi
    log "stage 1: sharding ${inputs[*]} into $SHARDS/train"
    # shellcheck disable=SC2086  # SHARD_FLAGS is a list of flags
    python -m w2v_stream.make_shards "${inputs[@]}" --output_dir "$SHARDS/train" --shuffle \
      --num_workers "$SHARD_WORKERS" ${SHARD_FLAGS:-}
    touch "$SHARDS/train/.done"
  fi
  if [ -z "$TRAIN_INPUTS" ] || [ -n "$EVAL_INPUTS" ]; then
    if [ ! -f "$SHARDS/eval/.done" ]; then
      if [ -n "$EVAL_INPUTS" ]; then mapfile -t inputs <<< "$EVAL_INPUTS"
      else inputs=("$(split_input "$EVAL_SPLIT")"); fi
      log "stage 1: sharding ${inputs[*]} into $SHARDS/eval"
      # shellcheck disable=SC2086
      python -m w2v_stream.make_shards "${inputs[@]}" --output_dir "$SHARDS/eval" \
        --num_workers "$SHARD_WORKERS" ${SHARD_FLAGS:-}
      touch "$SHARDS/eval/.done"
    fi
  fi
fi

if [ "$STAGE" -le 2 ] && [ "$STOP_STAGE" -ge 2 ]; then
  log "stage 2: pre-training into $WORK/model"
  start=()
  if ls -d "$WORK"/model/checkpoint-* >/dev/null 2>&1; then
    start=(--resume_from_checkpoint latest)
  elif [ -n "${INIT_FROM:-}" ]; then
    start=(--init_from "$INIT_FROM")
  fi
  eval_flags=()
  if [ -f "$SHARDS/eval/index.json" ]; then eval_flags=(--eval_shards "$SHARDS/eval"); fi
  launch=(python)
  if [ $((NPROC * NNODES)) -gt 1 ]; then
    launch=(python -m torch.distributed.run --nproc_per_node "$NPROC" --nnodes "$NNODES"
            --node_rank "$NODE_RANK" --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT")
  fi
  # shellcheck disable=SC2086  # TRAIN_FLAGS is a list of flags
  "${launch[@]}" -m w2v_stream.train --train_shards "$SHARDS/train" "${eval_flags[@]}" \
    --output_dir "$WORK/model" --backend "$BACKEND" $TRAIN_FLAGS "${start[@]}" "$@"
  python -m w2v_stream.report "$WORK/model" || log "report.png not written (see above)"
  log "done: checkpoints in $WORK/model, training report $WORK/model/report.png"
fi
