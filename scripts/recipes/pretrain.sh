#!/usr/bin/env bash
# Paper pre-training: ConLIP or a baseline on CC3M+CC12M webdataset shards (img2dataset output).
#   VARIANT=conlip|cl|vanilla DATA='/data/cc5m/{00000..00529}.tar' NUM_SAMPLES=5300000 bash pretrain.sh
# Needs CONLIP_BERT_DIR and CONLIP_VIT_WEIGHTS (see docs/training.md). Paper: 8 A100s, about 60 h (5.3M)
# or 100 h (9.5M) per model, i.e. 480 / 800 GPU-hours.
set -euo pipefail
: "${DATA:?set DATA to the training shards}" "${NUM_SAMPLES:?set NUM_SAMPLES}"
VARIANT=${VARIANT:-conlip}; NPROC=${NPROC:-8}; BATCH_PER_GPU=${BATCH_PER_GPU:-$((4096 / NPROC))}; EPOCHS=${EPOCHS:-30}
case "$VARIANT" in conlip) model=conlip-vit-b16-bert ;; cl|vanilla) model=conlip-vit-b16-bert-$VARIANT ;;
  *) echo "VARIANT must be conlip, cl or vanilla" >&2; exit 2 ;; esac
source "$(dirname "$0")/common.sh"
exec torchrun --nproc_per_node "$NPROC" -m open_clip_train.main --model "$model" \
  --train-data "$DATA" --dataset-type webdataset --train-num-samples "$NUM_SAMPLES" \
  --batch-size "$BATCH_PER_GPU" --workers "${WORKERS:-8}" "${PAPER_OPTIM[@]}" \
  --save-frequency 1 --name "${NAME:-pretrain-$VARIANT}" --resume latest "$@"
