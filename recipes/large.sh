#!/usr/bin/env bash
# LARGE (317 M) on LibriSpeech 960 h with the upstream hyper-parameters (transformers'
# speech-pretraining README, "Large"). Same knobs as base.sh.
# BACKEND=ipu: 2 replicas of an 8-IPU pipeline on a POD16, micro-batch 1 of up to 15.6 s,
# accumulation 64 (128 utterances per update), fp16; the placement is an estimate
# (recipes/ipu/README.md).
set -euo pipefail
export RECIPE=large
export SIZE_FLAGS="--preset large"
export GPU_FLAGS="--gradient_accumulation_steps 8 --per_device_train_batch_size 2"
export IPU_CONFIG=recipes/ipu/wav2vec2-large-ipu.json
exec bash "$(dirname "${BASH_SOURCE[0]}")/pretrain.sh" "$@"
