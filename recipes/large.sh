#!/usr/bin/env bash
# LARGE (317 M) on LibriSpeech 960 h with the upstream hyper-parameters
# (shared/seed/speech-pretraining-README.md, "Large"). Same knobs as base.sh.
set -euo pipefail
export RECIPE=large
export TRAIN_FLAGS="--preset large --max_train_steps 200000 --num_warmup_steps 32000
  --gradient_accumulation_steps 8 --learning_rate 0.001 --weight_decay 0.01
  --max_duration_in_seconds 20.0 --min_duration_in_seconds 2.0 --logging_steps 1
  --saving_steps 10000 --per_device_train_batch_size 2 --adam_beta1 0.9 --adam_beta2 0.98
  --adam_epsilon 1e-06 --gradient_checkpointing ${TRAIN_FLAGS_EXTRA:-}"
exec bash "$(dirname "${BASH_SOURCE[0]}")/pretrain.sh" "$@"
