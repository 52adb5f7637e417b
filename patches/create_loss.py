"""Give ConLIP models their loss in open_clip_train, and refuse flags that cannot work.

Why: open_clip 3.3's ``create_loss(args)`` knows only CLIP / CoCa / SigLIP / distillation
losses, and ``open_clip_train.main`` binds ``from open_clip import create_loss`` when it starts.
What: wraps ``open_clip.create_loss`` (and ``open_clip.factory.create_loss``): for a model
whose config has ``conlip_cfg`` it checks the run's flags, then returns ``ConLIPLoss`` with a
``HealthMonitor`` on rank 0 (collapse warning and health lines in the run's log, see
``conlip_plugin.reliability.monitor``), or, with ``instance_loss: recipe``, the loss open_clip itself builds
from the flags (``ClipLoss``, ``SigLipLoss``, ``DistillClipLoss``) inside ``RecipeWithTokenLosses``;
any other model gets open_clip's own loss. For: open_clip_torch 3.3.x.
"""
import functools
from typing import TYPE_CHECKING, Any, Callable, Optional

from conlip_plugin.integration.patching import wrap

if TYPE_CHECKING:
    from conlip_plugin.method.config import ConLIPCfg
    from conlip_plugin.reliability.monitor import HealthMonitor

_REFUSED = (
    ("accum_freq", lambda v: v is not None and v > 1,
     "--accum-freq > 1 re-runs every micro-batch's forward, and DCL's negatives are the momentum keys of "
     "the step's whole global batch plus the queue, which the re-run would gather and enqueue twice; use a "
     "smaller --batch-size per GPU or more GPUs for a larger global batch instead"),
    ("distill", bool,
     "--distill feeds a teacher's CLIP logits to a CLIP loss; ConLIP's loss has no such term. "
     "Train without --distill-model/--distill-pretrained"),
    ("siglip", bool,
     "--siglip swaps the loss for SigLIP's; ConLIP's instance loss is DCL/InfoNCE with momentum queues. "
     "To keep SigLIP's loss and add ConMLM/ConMIM, use BASE+conmlm-conmim (conlip_cfg.instance_loss 'recipe')"),
    ("horovod", bool, "--horovod is not supported: the queues are all-gathered with torch.distributed; use torchrun"),
    ("precision", lambda v: v not in ("fp32", "amp", "amp_bf16", "amp_bfloat16", "tf32"),
     "ConLIP keeps its momentum encoders and queues in fp32: use --precision amp, amp_bf16 or fp32"),
)


def health_monitor_for(args, cfg: "ConLIPCfg") -> Optional["HealthMonitor"]:
    """Rank 0's monitor for this run (None elsewhere: one log, and collapse is global).

    Collapse is judged after open_clip's ``--warmup`` steps, but never before ``MIN_WARMUP``.
    """
    from conlip_plugin.reliability.monitor import MIN_WARMUP, HealthMonitor, negatives_per_query

    if args.rank != 0:
        return None
    negatives = negatives_per_query(cfg.queue_size, args.batch_size * args.world_size, cfg.in_batch_negatives)
    return HealthMonitor(negatives, cfg.instance_loss, warmup=max(args.warmup, MIN_WARMUP),
                         world_size=args.world_size)


def conlip_loss_for(args, model_cfg: dict, recipe_loss: Callable[[Any], Any]):
    """Check ``args`` against ConLIP's needs, then build its loss; ``recipe_loss(args)`` is
    open_clip's own factory, whose loss a model with ``instance_loss: recipe`` keeps."""
    from conlip_plugin.method.config import ConLIPCfg
    from conlip_plugin.reliability.finite_steps import set_checkpoint_dir
    from conlip_plugin.method.loss import ConLIPLoss, RecipeWithTokenLosses

    cfg = ConLIPCfg.from_dict(model_cfg["conlip_cfg"])
    set_checkpoint_dir(getattr(args, "checkpoint_path", None))
    if not cfg.momentum_queues:
        return RecipeWithTokenLosses.from_cfg(recipe_loss(args), cfg)
    problems = [why for key, bad, why in _REFUSED if bad(getattr(args, key, None))]
    if problems:
        raise SystemExit(f"conlip-plugin: model {args.model!r} cannot train with these flags:\n- "
                         + "\n- ".join(problems))
    return ConLIPLoss.from_cfg(cfg, rank=args.rank, monitor=health_monitor_for(args, cfg))


def _conlip_aware(original: Callable) -> Callable:
    import open_clip.factory as factory

    @functools.wraps(original)
    def create_loss(args):
        model_cfg = factory.get_model_config(args.model)
        if isinstance(model_cfg, dict) and "conlip_cfg" in model_cfg:
            return conlip_loss_for(args, model_cfg, original)
        return original(args)

    return create_loss


def apply() -> None:
    import open_clip
    import open_clip.factory as factory

    wrap(factory, "create_loss", _conlip_aware, patch=__name__.rpartition(".")[2], also=(open_clip,))
