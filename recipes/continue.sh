#!/usr/bin/env bash
# Continued pre-training on your own audio from released weights (README, "Your own audio"):
# AUDIO (a folder of audio, a fairseq .tsv or a lhotse manifest) -> shards (long recordings
# cut at pauses into pieces of at most 20 s) -> pre-training from INIT's weights. Extra flags
# go to the trainer, after the recipe's (so they win):
#   AUDIO=/data/podcasts bash recipes/continue.sh
#   AUDIO=/data/calls EVAL_AUDIO=/data/calls-dev INIT=facebook/wav2vec2-large-lv60 NPROC=8 \
#     BACKEND=cuda bash recipes/continue.sh --learning_rate 3e-5
set -euo pipefail
export RECIPE=continue
: "${AUDIO:?point AUDIO at your audio folder or manifest}"
INIT=${INIT:-facebook/wav2vec2-base}  # a hub id (transformers' cache) or a local folder
export TRAIN_INPUTS=$AUDIO EVAL_INPUTS=${EVAL_AUDIO:-}
export SHARD_FLAGS="--max_segment_seconds 20 --min_duration_in_seconds 2"
export INIT_FROM=$INIT
# A tenth of BASE's from-scratch peak, warmed up over a tenth of the run: the weights start
# near a minimum and Adam's moments start at zero. The gumbel temperature stays at 0.5, where
# the released model's schedule ended, so the codebook is not re-randomised.
export TRAIN_FLAGS="--max_train_steps ${STEPS:-20000} --num_warmup_steps ${WARMUP:-2000}
  --learning_rate ${LR:-5e-5} --lr_scheduler_type linear --weight_decay 0.01
  --max_gumbel_temperature 0.5 --min_gumbel_temperature 0.5 --feature_grad_mult 0.1
  --feature_penalty_weight 10 --gradient_accumulation_steps 4 --per_device_train_batch_size 8
  --max_duration_in_seconds 20 --min_duration_in_seconds 2 --logging_steps 10
  --saving_steps 1000"
exec bash "$(dirname "${BASH_SOURCE[0]}")/pretrain.sh" "$@"
