"""ConLIP's losses: DCL / InfoNCE against momentum keys and queues (Eq. 9-12), MLM, MIM, and the
token losses added to a recipe's own instance loss (open_clip's ``ClipLoss``, ``SigLipLoss``, ...)."""
from typing import Dict, Optional

import torch
import torch.nn.functional as F
from torch import nn

from conlip_plugin.method.config import ConLIPCfg
from conlip_plugin.reliability.finite_steps import observe_loss_terms
from conlip_plugin.method.masking import IGNORE_INDEX
from conlip_plugin.reliability.monitor import HealthMonitor


def _autocast_disabled(device: torch.device) -> torch.autocast:
    """Autocast off on ``device``, for the losses' fp32 math.

    Inside open_clip's autocast region a matmul casts even fp32 operands down, quantising logits
    near 1/tau = 20 in steps of 1/64 (fp16) or 1/8 (bf16).
    """
    return torch.autocast(device_type=device.type, enabled=False)


def instance_contrastive_loss(
        queries: torch.Tensor,
        keys: torch.Tensor,
        queue: torch.Tensor,
        scale: torch.Tensor,
        offset: int = 0,
        decoupled: bool = True,
        in_batch_negatives: bool = True,
) -> torch.Tensor:
    """One direction of the instance loss, averaged over the local queries.

    ``queries`` (B, D): normalised online embeddings of this rank; ``keys`` (G, D): normalised
    momentum keys of the global batch, query ``i``'s positive at ``offset + i``; ``queue`` (K, D).
    DCL drops the positive from the log-sum-exp, InfoNCE keeps it. Computed in fp32, autocast off.
    """
    b = queries.shape[0]
    with _autocast_disabled(queries.device):
        candidates = torch.cat([keys, queue], dim=0).float()
        logits = scale.float() * queries.float() @ candidates.t()
        rows = torch.arange(b, device=logits.device)
        positive_col = rows + offset
        positive = logits[rows, positive_col]
        in_batch = torch.zeros_like(logits, dtype=torch.bool)
        in_batch[:, : keys.shape[0]] = True
        is_positive = torch.zeros_like(in_batch)
        is_positive[rows, positive_col] = True
        excluded = is_positive if decoupled else torch.zeros_like(is_positive)
        if not in_batch_negatives:
            excluded = excluded | (in_batch & ~is_positive)
        negatives = logits.masked_fill(excluded, float("-inf"))
        return (torch.logsumexp(negatives, dim=1) - positive).mean()


def token_losses(names: Dict[str, str], weights: Dict[str, float], mlm_logits: Optional[torch.Tensor],
                 mlm_labels: Optional[torch.Tensor], mim_predictions: Optional[torch.Tensor],
                 mim_targets: Optional[torch.Tensor]) -> Dict[str, torch.Tensor]:
    """The weighted ConMLM / ConMIM terms (or Vanilla's) that the model's output holds, by name."""
    losses = {}
    if mlm_logits is not None:
        losses[names["mlm"]] = weights["mlm"] * masked_token_loss(mlm_logits, mlm_labels)
    if mim_predictions is not None:
        losses[names["mim"]] = weights["mim"] * masked_pixel_loss(mim_predictions, mim_targets)
    return losses


def masked_token_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over the labels that are not ``IGNORE_INDEX`` (0 if there are none).

    The model passes a fixed number of rows per caption, filler rows ignored; dividing by the
    count on device keeps the step free of host syncs. Computed in fp32, autocast off.
    """
    with _autocast_disabled(logits.device):
        total = F.cross_entropy(logits.float(), labels, ignore_index=IGNORE_INDEX, reduction="sum")
    return total / (labels != IGNORE_INDEX).sum().clamp(min=1)


def masked_pixel_loss(predictions: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean absolute error over the masked patches' pixels (SimMIM), 0 if there are none.

    Computed in fp32, autocast off.
    """
    with _autocast_disabled(predictions.device):
        errors = (predictions.float() - targets.float()).abs()
        return errors.mean() if errors.numel() else errors.sum()


class ConLIPLoss(nn.Module):
    """Consumes a ConLIP model's training output; returns each term by name, as open_clip logs them.

    ``monitor``: an optional :class:`conlip_plugin.reliability.monitor.HealthMonitor` that sees every call made
    in train mode (open_clip_train calls the loss only to train; ``loss.eval()`` stops it).
    """

    def __init__(
            self,
            instance_loss: str = "dcl",
            in_batch_negatives: bool = True,
            names: Optional[Dict[str, str]] = None,
            rank: int = 0,
            monitor: Optional[HealthMonitor] = None,
            weights: Optional[Dict[str, float]] = None,
    ):
        super().__init__()
        if instance_loss not in ("dcl", "infonce"):
            raise ValueError(f"instance_loss must be 'dcl' or 'infonce', got {instance_loss!r}")
        self.decoupled = instance_loss == "dcl"
        self.in_batch_negatives = in_batch_negatives
        self.names = names or {"instance": f"{instance_loss}_loss", "mlm": "conmlm_loss", "mim": "conmim_loss"}
        self.rank = rank
        self.monitor = monitor
        self.weights = weights or {"mlm": 1.0, "mim": 1.0}

    @classmethod
    def from_cfg(cls, cfg: ConLIPCfg, rank: int = 0, monitor: Optional[HealthMonitor] = None) -> "ConLIPLoss":
        """The loss a model with this ``conlip_cfg`` trains with, on process ``rank``."""
        return cls(cfg.instance_loss, cfg.in_batch_negatives, cfg.loss_names(), rank=rank, monitor=monitor,
                   weights={"mlm": cfg.mlm_weight, "mim": cfg.mim_weight})

    def forward(
            self,
            image_features: torch.Tensor,
            text_features: torch.Tensor,
            logit_scale: torch.Tensor,
            image_momentum_features: torch.Tensor,
            text_momentum_features: torch.Tensor,
            image_queue: torch.Tensor,
            text_queue: torch.Tensor,
            mlm_logits: Optional[torch.Tensor] = None,
            mlm_labels: Optional[torch.Tensor] = None,
            mim_predictions: Optional[torch.Tensor] = None,
            mim_targets: Optional[torch.Tensor] = None,
            output_dict: bool = False,
    ):
        offset = self.rank * image_features.shape[0]
        kwargs = dict(scale=logit_scale, offset=offset, decoupled=self.decoupled,
                      in_batch_negatives=self.in_batch_negatives)
        i2t = instance_contrastive_loss(image_features, text_momentum_features, text_queue, **kwargs)
        t2i = instance_contrastive_loss(text_features, image_momentum_features, image_queue, **kwargs)
        losses = {self.names["instance"]: i2t + t2i}
        losses.update(token_losses(self.names, self.weights, mlm_logits, mlm_labels, mim_predictions, mim_targets))
        if self.training:
            losses = observe_loss_terms(losses)
        if self.monitor is not None and self.training:
            self.monitor.observe(losses, losses[self.names["instance"]], image_features, text_features)
        return losses if output_dict else sum(losses.values())


class RecipeWithTokenLosses(nn.Module):
    """A recipe's own instance loss plus ConMLM / ConMIM: ``recipe + w_mlm * L_mlm + w_mim * L_mim``.

    ``recipe`` is the loss object open_clip builds from the run's flags (``ClipLoss``,
    ``SigLipLoss``, ``DistillClipLoss``); it gets the model's instance outputs (``logit_bias``, a
    teacher's ``dist_*`` features) unchanged and names its own terms.
    """

    def __init__(self, recipe: nn.Module, names: Dict[str, str], weights: Dict[str, float]):
        super().__init__()
        self.recipe = recipe
        self.names = names
        self.weights = weights

    @classmethod
    def from_cfg(cls, recipe: nn.Module, cfg: ConLIPCfg) -> "RecipeWithTokenLosses":
        return cls(recipe, cfg.loss_names(), {"mlm": cfg.mlm_weight, "mim": cfg.mim_weight})

    def forward(
            self,
            image_features: torch.Tensor,
            text_features: torch.Tensor,
            logit_scale: torch.Tensor,
            mlm_logits: Optional[torch.Tensor] = None,
            mlm_labels: Optional[torch.Tensor] = None,
            mim_predictions: Optional[torch.Tensor] = None,
            mim_targets: Optional[torch.Tensor] = None,
            output_dict: bool = False,
            **recipe_inputs: torch.Tensor,
    ):
        losses = self.recipe(image_features, text_features, logit_scale, **recipe_inputs, output_dict=True)
        losses = dict(losses)
        losses.update(token_losses(self.names, self.weights, mlm_logits, mlm_labels, mim_predictions, mim_targets))
        if self.training:
            losses = observe_loss_terms(losses)
        return losses if output_dict else sum(losses.values())
