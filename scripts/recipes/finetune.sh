#!/usr/bin/env bash
# Paper fine-tuning at image size 336 from a pre-training checkpoint (position embeddings are
# resized by open_clip's --force-image-size; ConLIP's momentum tower and masker follow).
#   DATASET=flickr30k|mscoco PRETRAINED=logs/pretrain-conlip/checkpoints/epoch_30.pt \
#   DATA='/data/flickr30k/train/{00..28}.tar' bash finetune.sh
# DATA names shards written by `conlip-prepare train-shards` (it prints the
# pattern); the sample count of those shards is read from the sizes.json beside them.
set -euo pipefail
: "${DATASET:?flickr30k or mscoco}" "${PRETRAINED:?a pre-training checkpoint}" "${DATA:?a brace pattern of train shards}"
VARIANT=${VARIANT:-conlip}; NPROC=${NPROC:-8}; BATCH_PER_GPU=${BATCH_PER_GPU:-$((4096 / NPROC))}; EPOCHS=${EPOCHS:-30}
case "$VARIANT" in conlip) model=conlip-vit-b16-bert ;; cl|vanilla) model=conlip-vit-b16-bert-$VARIANT ;;
  *) echo "VARIANT must be conlip, cl or vanilla" >&2; exit 2 ;; esac
NUM_SAMPLES=$(python3 -c "import sys; from open_clip_train.data import get_dataset_size
n = get_dataset_size(sys.argv[1])[0]
sys.exit(f'no sizes.json beside {sys.argv[1]}: write the shards with conlip-prepare train-shards') if n is None else print(n)" "$DATA")
source "$(dirname "$0")/common.sh"
exec torchrun --nproc_per_node "$NPROC" -m open_clip_train.main --model "$model" --pretrained "$PRETRAINED" \
  --force-image-size 336 --train-data "$DATA" --dataset-type webdataset --train-num-samples "$NUM_SAMPLES" \
  --batch-size "$BATCH_PER_GPU" --workers "${WORKERS:-8}" "${PAPER_OPTIM[@]}" \
  --save-frequency 1 --name "${NAME:-finetune-$DATASET-$VARIANT}" --resume latest "$@"
