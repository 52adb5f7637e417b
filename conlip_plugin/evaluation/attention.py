"""Paper Table 2 on your checkpoints: cross-attention weight on the other modality's CLS slot.

ConLIP's claim is mechanistic: conditioning the heads on the complete image's (text's) CLS makes
them use it. This measures, over real batches of a CSV of image-caption pairs, the weight from the
masked text's tokens to memory slot 0 (the image CLS) in the ConMLM head, and from the masked
image's patches to slot 0 (the text CLS) in the ConMIM head. Slot 0 is the complete other
modality's CLS for ConLIP and Vanilla alike (with a CLS-first text tower), so their numbers compare
directly. Images are preprocessed exactly as the model's evaluation transform does (its config's
``preprocess_cfg``); the report is a table (stdout, table.md), results.json and a bar plot (table2.png).

    conlip-attention --csv data.csv --out report/ \\
        --checkpoint ConLIP=conlip-tiny:logs/a/checkpoints/epoch_8.pt \\
        --checkpoint Vanilla=conlip-tiny-vanilla:logs/b/checkpoints/epoch_8.pt
"""
import argparse
import itertools
import json
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Tuple

import torch

from conlip_plugin.method.model import ConLIP
from conlip_plugin.method.towers import HFTextTokens

ROWS = (("mlm_layer0", "text tokens -> image CLS (MLM head)"), ("mim_layer0", "image patches -> text CLS (MIM head)"))


def _instance_slot_weights(weights: torch.Tensor, valid_queries: torch.Tensor) -> torch.Tensor:
    """Weights (B, heads, Q, S) on slot 0, for the valid queries only, flattened."""
    slot = weights[..., 0]
    keep = valid_queries[:, None, :].expand_as(slot)
    return slot[keep].double()


@torch.no_grad()
def instance_slot_attention(model: ConLIP, batches: Iterable[Tuple[torch.Tensor, torch.Tensor]]) -> Dict[str, dict]:
    """Mean and standard deviation of the cross-attention weight on the instance slot.

    Runs the training forward (masking, both heads) without dropout, leaving the momentum
    encoders and queues as they were; per layer of each head (a shared layer applied twice
    reports the last application), over every valid query of every batch.
    """
    heads = {name: getattr(model, f"{name}_head") for name in ("mlm", "mim") if hasattr(model, f"{name}_head")}
    if not heads:
        raise ValueError("this model has no token-level heads (a CL model): nothing to analyse")
    if "mim" in heads and model.conlip_cfg.variant == "vanilla" and not isinstance(model.text_adapter, HFTextTokens):
        raise ValueError(
            "a Vanilla model on open_clip's causal text tower: its ConMIM memory starts with the start-of-text "
            "state, not the caption's instance state, so slot 0 does not compare with ConLIP's; analyse "
            "models with a CLS-first (Hugging Face) text tower."
        )
    was_training, pending = model.training, model.keys_to_enqueue
    model.eval()
    samples: Dict[str, List[torch.Tensor]] = {}
    for head in heads.values():
        head.record_cross_attention(True)
    try:
        for images, texts in batches:
            model.forward_train(images, texts)
            for name, head in heads.items():
                for i, layer in enumerate(head.layers):
                    w = layer.cross_attn.last_weights
                    valid = head.last_query_mask
                    if valid is None:
                        valid = torch.ones(w.shape[0], w.shape[2], dtype=torch.bool, device=w.device)
                    samples.setdefault(f"{name}_layer{i}", []).append(_instance_slot_weights(w, valid))
    finally:
        for head in heads.values():
            head.record_cross_attention(False)
        model.keys_to_enqueue = pending
        model.train(was_training)
    out = {}
    for key, parts in samples.items():
        values = torch.cat(parts)
        out[key] = {"mean": values.mean().item(), "std": values.std(unbiased=False).item(), "count": values.numel()}
    return out


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
