"""Paper Table 2 on your checkpoints: cross-attention weight on the other modality's CLS slot.

For each checkpoint (ConLIP or Vanilla, any size), runs the token-level heads on a CSV of
image-caption pairs and reports the mean and standard deviation of the weight from text tokens to
the image CLS slot (ConMLM / MLM head) and from image patches to the text CLS slot (ConMIM / MIM
head), as a table (stdout, table.md), results.json and a bar plot (table2.png). Images are
preprocessed exactly as the model's evaluation transform does (its config's ``preprocess_cfg``).

    conlip-attention --csv data.csv --out report/ \\
        --checkpoint ConLIP=conlip-tiny:logs/a/checkpoints/epoch_8.pt \\
        --checkpoint Vanilla=conlip-tiny-vanilla:logs/b/checkpoints/epoch_8.pt
"""
import argparse
import itertools
import json
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import torch

ROWS = (("mlm_layer0", "text tokens -> image CLS (MLM head)"), ("mim_layer0", "image patches -> text CLS (MIM head)"))


def parse_checkpoint(spec: str) -> Tuple[str, str, str]:
    """``LABEL=MODEL:PATH`` -> (label, model name, checkpoint path)."""
    try:
        label, rest = spec.split("=", 1)
        model, path = rest.rsplit(":", 1)
    except ValueError:
        raise SystemExit(f"--checkpoint {spec!r}: write LABEL=MODEL:PATH, e.g. ConLIP=conlip-tiny:epoch_8.pt")
    if not Path(path).is_file():
        raise SystemExit(f"--checkpoint {spec!r}: {path} is not a file")
    return label, model, path


def model_and_loader(model_name: str, checkpoint: str, csv: str, img_key: str = "filepath",
                     caption_key: str = "title", separator: str = "\t", batch_size: int = 32):
    """The checkpoint's model and a loader over the CSV with the model's own evaluation transform."""
    import open_clip
    from open_clip_train.data import CsvDataset

    model, _, preprocess = open_clip.create_model_and_transforms(model_name, pretrained=checkpoint)
    data = CsvDataset(csv, preprocess, img_key, caption_key, separator, tokenizer=open_clip.get_tokenizer(model_name))
    return model, torch.utils.data.DataLoader(data, batch_size=batch_size, shuffle=False)


def analyse(model_name: str, checkpoint: str, args: argparse.Namespace) -> Dict[str, dict]:
    from conlip_plugin.evaluation.analysis import instance_slot_attention

    model, loader = model_and_loader(model_name, checkpoint, args.csv, args.csv_img_key, args.csv_caption_key,
                                     args.csv_separator, args.batch_size)
    torch.manual_seed(args.seed)
    return instance_slot_attention(model, itertools.islice(loader, args.batches))


def plot(results: Dict[str, Dict[str, dict]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.2))
    labels = list(results)
    width = 0.8 / max(1, len(labels))
    for j, label in enumerate(labels):
        means = [results[label].get(key, {}).get("mean", 0.0) for key, _ in ROWS]
        stds = [results[label].get(key, {}).get("std", 0.0) for key, _ in ROWS]
        ax.bar([i + j * width for i in range(len(ROWS))], means, width, yerr=stds, capsize=3, label=label)
    ax.set_xticks([i + width * (len(labels) - 1) / 2 for i in range(len(ROWS))], [name for _, name in ROWS], fontsize=8)
    ax.set_ylabel("cross-attention weight on the CLS slot")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def table(results: Dict[str, Dict[str, dict]]) -> str:
    lines = ["| model | " + " | ".join(name for _, name in ROWS) + " |", "|---|" + "---|" * len(ROWS)]
    for label, res in results.items():
        cells = [f"{res[k]['mean']:.3f} ± {res[k]['std']:.3f}" if k in res else "n/a" for k, _ in ROWS]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(prog="conlip-attention", description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", action="append", required=True, help="LABEL=MODEL:PATH (repeat)")
    parser.add_argument("--csv", required=True)
    parser.add_argument("--csv-img-key", default="filepath")
    parser.add_argument("--csv-caption-key", default="title")
    parser.add_argument("--csv-separator", default="\t")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--batches", type=int, default=None, help="at most this many batches")
    parser.add_argument("--seed", type=int, default=0, help="seeds the masking")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    from conlip_plugin.integration.activation import activate

    activate()
    args.out.mkdir(parents=True, exist_ok=True)
    results = {label: analyse(model, path, args) for label, model, path in map(parse_checkpoint, args.checkpoint)}
    text = table(results)
    print(text)
    (args.out / "table.md").write_text(text + "\n")
    (args.out / "results.json").write_text(json.dumps(results, indent=2))
    plot(results, args.out / "table2.png")
    print(f"wrote {args.out / 'table.md'}, results.json and table2.png")


if __name__ == "__main__":
    main()
