#!/usr/bin/env bash
# BASE (95 M) on LibriSpeech 960 h with the upstream hyper-parameters
# (transformers' speech-pretraining README, "Base"). Point LIBRISPEECH at the OpenSLR root
# (split folders or split .tar.gz files); pick BACKEND=cuda|ipu|cpu. Extra flags pass through:
#   LIBRISPEECH=/data/LibriSpeech BACKEND=cuda torchrun --nproc_per_node 8 ... (see README)
#   LIBRISPEECH=/data/LibriSpeech bash recipes/base.sh --learning_rate 0.005
# BACKEND=ipu runs Graphcore's BASE pipeline on a POD16 (recipes/ipu/README.md): 4 replicas
# of 4 IPUs, micro-batch 1 of up to 15.6 s, accumulation 32 (128 utterances per update), fp16.
set -euo pipefail
export RECIPE=base
if [ "${BACKEND:-auto}" = ipu ]; then
  BATCH_FLAGS="--ipu_config_name recipes/ipu/wav2vec2-base-ipu.json
  --per_device_train_batch_size 1 --max_duration_in_seconds 15.6 --adam_epsilon 1e-04"
else
  BATCH_FLAGS="--gradient_accumulation_steps 4 --per_device_train_batch_size 8
  --max_duration_in_seconds 20.0 --adam_epsilon 1e-06 --gradient_checkpointing"
fi
export TRAIN_FLAGS="--preset base --max_train_steps 200000 --num_warmup_steps 32000
  --learning_rate 0.001 --weight_decay 0.01 --min_duration_in_seconds 2.0 --logging_steps 1
  --saving_steps 10000 --adam_beta1 0.9 --adam_beta2 0.98 $BATCH_FLAGS ${TRAIN_FLAGS_EXTRA:-}"
exec bash "$(dirname "${BASH_SOURCE[0]}")/pretrain.sh" "$@"
