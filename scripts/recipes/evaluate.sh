#!/usr/bin/env bash
# Zero-shot or fine-tuned retrieval, paper Table 1: R@1/5/10 both ways on the Karpathy test split.
#   MODEL=conlip-vit-b16-bert CKPT=logs/RUN/checkpoints/epoch_30.pt DATASET=flickr30k ROOT=/data/flickr30k-cb bash evaluate.sh
# ROOT is a folder written by `conlip-prepare eval-layout`. For fine-tuned
# checkpoints add IMAGE_SIZE=336. CKPT may be a training checkpoint or MODEL=local-dir:EXPORT with CKPT unset.
set -euo pipefail
: "${MODEL:?}" "${DATASET:?flickr30k or mscoco}" "${ROOT:?a prepared dataset folder}"
conlip-prepare check --dataset "$DATASET" --root "$ROOT"
case "$DATASET" in flickr30k) cb=flickr30k ;; mscoco) cb=mscoco_captions ;; *) echo "unknown DATASET" >&2; exit 2 ;; esac
out=${OUT:-results/${DATASET}_$(basename "${CKPT:-export}" .pt).json}
mkdir -p "$(dirname "$out")"
args=(eval --model "$MODEL" --dataset "$cb" --dataset_root "$ROOT" --task zeroshot_retrieval
      --recall_k 1 5 10 --output "$out" --batch_size "${BATCH:-64}")
[ -n "${CKPT:-}" ] && args+=(--pretrained "$CKPT")
clip_benchmark "${args[@]}" "$@"
python3 - "$out" <<'PY'
import json, sys
m = json.load(open(sys.argv[1]))["metrics"]
for d, name in (("image", "text->image"), ("text", "image->text")):
    print(f"{name}: " + "  ".join(f"R@{k} {100 * m[f'{d}_retrieval_recall@{k}']:.2f}" for k in (1, 5, 10)))
PY
