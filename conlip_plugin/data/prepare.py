"""Retrieval data for ConLIP: clip_benchmark's offline evaluation layout and webdataset training shards.

clip_benchmark fetches the Karpathy-split annotation files with ``wget`` when they are missing;
offline that leaves a 0-byte file and every later run fails. ``eval-layout`` writes those files
from Karpathy's own split JSON and places the test images where clip_benchmark looks, so the
evaluation never downloads anything; ``check`` validates such a layout. ``train-shards`` turns the
JSON's training splits into webdataset shards for open_clip, and ``subset`` draws a reproducible
random subset (the paper's 200k / 5.3M / 9.5M pairs) from existing shards such as img2dataset's
CC3M / CC12M output.

This is the ``conlip-prepare`` command; ``python -m conlip_plugin.data.prepare`` and
``python scripts/prepare_retrieval_data.py`` in a checkout run the same.

Usage:
    # Karpathy test split in clip_benchmark's layout, checked after writing
    conlip-prepare eval-layout --dataset flickr30k \\
        --karpathy-json dataset_flickr30k.json --images flickr30k-images --out data/flickr30k
    conlip-prepare eval-layout --dataset mscoco \\
        --karpathy-json dataset_coco.json --images coco --out data/mscoco   # coco/ holds val2014/
    clip_benchmark eval --dataset flickr30k --dataset_root data/flickr30k --task zeroshot_retrieval ...
    clip_benchmark eval --dataset mscoco_captions --dataset_root data/mscoco --task zeroshot_retrieval ...

    # re-check a layout, e.g. after clip_benchmark failed with an IndexError
    conlip-prepare check --dataset flickr30k --root data/flickr30k --expect-images 1000

    # Karpathy train + restval pairs as shards with sizes.json (and a CSV for --dataset-type csv)
    conlip-prepare train-shards --karpathy-json dataset_coco.json \\
        --images coco --out shards/coco-train --csv

    # 5.3M random pairs out of CC3M + CC12M shards, the same pairs for the same seed and shard files
    conlip-prepare subset \\
        --shards '/data/cc3m/{00000..00331}.tar::/data/cc12m/{00000..01242}.tar' \\
        --count 5300000 --seed 0 --out /data/cc5m
"""

import argparse
from pathlib import Path

from conlip_plugin.data.karpathy import EVAL_DATASETS, check, eval_layout
from conlip_plugin.data.shards import report_shards, subset, train_shards


def build_parser() -> argparse.ArgumentParser:
    """The subcommands eval-layout, check, train-shards and subset, with this module's usage as help."""
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)

    p = commands.add_parser("eval-layout", help="write clip_benchmark's offline layout of the Karpathy test split")
    p.add_argument("--dataset", required=True, choices=sorted(EVAL_DATASETS))
    p.add_argument("--karpathy-json", required=True, type=Path, help="dataset_flickr30k.json or dataset_coco.json")
    p.add_argument("--images", required=True, type=Path,
                   help="flickr30k-images/, or the COCO folder holding val2014/")
    p.add_argument("--out", required=True, type=Path, help="the --dataset_root to give clip_benchmark")
    p.add_argument("--link", default="symlink", choices=["symlink", "copy", "hardlink"])
    p.add_argument("--expect-images", type=int)

    p = commands.add_parser("check", help="validate a layout written by eval-layout (or by hand)")
    p.add_argument("--dataset", required=True, choices=sorted(EVAL_DATASETS))
    p.add_argument("--root", required=True, type=Path)
    p.add_argument("--expect-images", type=int)

    p = commands.add_parser("train-shards", help="Karpathy splits as webdataset shards with sizes.json")
    p.add_argument("--karpathy-json", required=True, type=Path)
    p.add_argument("--images", required=True, type=Path,
                   help="flickr30k-images/, or the COCO folder holding train2014/ and val2014/")
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--splits", nargs="+", default=["train", "restval"], choices=["train", "restval", "val", "test"])
    p.add_argument("--shard-size", type=int, default=1000)
    p.add_argument("--csv", action="store_true", help="also write SPLITS.csv (filepath, title; tab separated)")
    p.add_argument("--seed", type=int, default=0, help="seed of the pair order")

    p = commands.add_parser("subset", help="reproducible random subset of existing webdataset shards")
    p.add_argument("--shards", required=True, help="brace pattern(s), '::'-separated, e.g. '/d/{00000..00331}.tar'")
    p.add_argument("--count", required=True, type=int)
    p.add_argument("--seed", required=True, type=int)
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--shard-size", type=int, default=10000)
    return parser


def main(argv: list[str] | None = None) -> None:
    """The `conlip-prepare` command (argv: its arguments; default sys.argv)."""
    args = build_parser().parse_args(argv)
    if args.command == "eval-layout":
        eval_layout(args.dataset, args.karpathy_json, args.images, args.out, args.link, args.expect_images)
    elif args.command == "check":
        check(args.dataset, args.root, args.expect_images)
    elif args.command == "train-shards":
        summary = train_shards(args.karpathy_json, args.images, args.out, args.splits, args.shard_size,
                               args.csv, args.seed)
        report_shards(summary, args.out)
        if summary.csv:
            print(f"csv: {summary.csv} (open_clip: --train-data {summary.csv} --dataset-type csv)")
    else:
        report_shards(subset(args.shards, args.count, args.seed, args.out, args.shard_size), args.out)
        print(f"manifest of the chosen keys: {args.out / 'manifest.tsv'}")


if __name__ == "__main__":
    main()
