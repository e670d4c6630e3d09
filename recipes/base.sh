#!/usr/bin/env bash
# BASE (95 M) on LibriSpeech 960 h with the upstream hyper-parameters (transformers'
# speech-pretraining README, "Base"; the schedule is in pretrain.sh). Point LIBRISPEECH at the
# OpenSLR root (split folders or split .tar.gz files); pick BACKEND=cuda|ipu|cpu; NPROC=8 for
# 8 GPUs (torchrun), NNODES/NODE_RANK/MASTER_ADDR for several machines. Extra flags pass through:
#   LIBRISPEECH=/data/LibriSpeech BACKEND=cuda NPROC=8 bash recipes/base.sh
#   LIBRISPEECH=/data/LibriSpeech bash recipes/base.sh --learning_rate 0.005
# BACKEND=ipu runs Graphcore's BASE pipeline on a POD16 (recipes/ipu/README.md): 4 replicas
# of 4 IPUs, micro-batch 1 of up to 15.6 s, accumulation 32 (128 utterances per update), fp16.
set -euo pipefail
export RECIPE=base
export SIZE_FLAGS="--preset base"
export GPU_FLAGS="--gradient_accumulation_steps 4 --per_device_train_batch_size 8"
export IPU_CONFIG=recipes/ipu/wav2vec2-base-ipu.json
exec bash "$(dirname "${BASH_SOURCE[0]}")/pretrain.sh" "$@"
