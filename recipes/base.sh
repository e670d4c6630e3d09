#!/usr/bin/env bash
# BASE (95 M) on LibriSpeech 960 h with the upstream hyper-parameters
# (shared/seed/speech-pretraining-README.md, "Base"). Point LIBRISPEECH at the OpenSLR root
# (split folders or split .tar.gz files); pick BACKEND=cuda|ipu|cpu. Extra flags pass through:
#   LIBRISPEECH=/data/LibriSpeech BACKEND=cuda torchrun --nproc_per_node 8 ... (see README)
#   LIBRISPEECH=/data/LibriSpeech bash recipes/base.sh --learning_rate 0.005
set -euo pipefail
export RECIPE=base
export TRAIN_FLAGS="--preset base --max_train_steps 200000 --num_warmup_steps 32000
  --gradient_accumulation_steps 4 --learning_rate 0.001 --weight_decay 0.01
  --max_duration_in_seconds 20.0 --min_duration_in_seconds 2.0 --logging_steps 1
  --saving_steps 10000 --per_device_train_batch_size 8 --adam_beta1 0.9 --adam_beta2 0.98
  --adam_epsilon 1e-06 --gradient_checkpointing ${TRAIN_FLAGS_EXTRA:-}"
exec bash "$(dirname "${BASH_SOURCE[0]}")/pretrain.sh" "$@"
