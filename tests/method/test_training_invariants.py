"""ConLIP's own recipe: the process rank reaches the loss, the momentum keys, a fixed τ."""
import argparse
import copy
import math
from typing import Tuple

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conlip_plugin.method.loss import ConLIPLoss
from model_state import deterministic
from float64_loops import loop_dot, loop_logsumexp

CAPTIONS = ["a photo of a cat sitting on a sofa", "two dogs", "a red car parked on a quiet street at night",
            "people walking in the park"]
B = len(CAPTIONS)

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny() -> Tuple[nn.Module, torch.Tensor]:
    import open_clip

    torch.manual_seed(0)
    model = open_clip.create_model("conlip-tiny", output_dict=True)
    return deterministic(model), open_clip.get_tokenizer("conlip-tiny")(CAPTIONS)


def _train_args(rank: int, world_size: int, batch_size: int) -> argparse.Namespace:
    """What open_clip_train passes to ``create_loss(args)``: here process ``rank`` is the first GPU of its node."""
    return argparse.Namespace(
        model="conlip-tiny", rank=rank, local_rank=0, world_size=world_size, batch_size=batch_size,
        warmup=0, accum_freq=1, distill=False, siglip=False, horovod=False, precision="fp32",
        local_loss=False, gather_with_grad=False, coca_caption_loss_weight=0.0, coca_contrastive_loss_weight=0.0,
    )


def _dcl_loop(queries: torch.Tensor, keys: torch.Tensor, queue: torch.Tensor, scale: float, b: int) -> torch.Tensor:
    """DCL for local queries of rank 1 of 2 in float64: query i's positive is global key ``b + i``."""
    total = torch.zeros((), dtype=torch.float64)
    for i in range(b):
        pos = b + i
        s_pos = scale * loop_dot(queries[i], keys[pos])
        negatives = [scale * loop_dot(queries[i], keys[j]) for j in range(keys.shape[0]) if j != pos]
        negatives += [scale * loop_dot(queries[i], queue[r]) for r in range(queue.shape[0])]
        total = total + (-s_pos + loop_logsumexp(negatives))
    return total / b


def test_create_loss_uses_the_process_rank_to_find_positives():
    """The process's rank reaches ConLIPLoss through open_clip.create_loss (positive of query i is key B*rank+i)."""
    import open_clip

    import conlip_plugin

    conlip_plugin.activate()
    b, d, k, scale = 3, 8, 5, 20.0
    loss = open_clip.create_loss(_train_args(rank=1, world_size=2, batch_size=b))
    assert isinstance(loss, ConLIPLoss)
    g = torch.Generator().manual_seed(7)
    unit = lambda *s: F.normalize(torch.randn(*s, generator=g, dtype=torch.float64), dim=-1)
    img, txt, img_keys, txt_keys, img_queue, txt_queue = (unit(b, d), unit(b, d), unit(2 * b, d), unit(2 * b, d),
                                                          unit(k, d), unit(k, d))
    terms = loss(image_features=img.float(), text_features=txt.float(), logit_scale=torch.tensor(scale),
                 image_momentum_features=img_keys.float(), text_momentum_features=txt_keys.float(),
                 image_queue=img_queue.float(), text_queue=txt_queue.float(), output_dict=True)
    want = _dcl_loop(img, txt_keys, txt_queue, scale, b) + _dcl_loop(txt, img_keys, img_queue, scale, b)
    assert list(terms) == ["dcl_loss"]
    assert terms["dcl_loss"].item() == pytest.approx(want.item(), rel=1e-5, abs=1e-5)


@torch.no_grad()
def _reference_keys(tower: nn.Module, inputs: torch.Tensor) -> torch.Tensor:
    """A float64, eval-mode copy of a momentum tower on the given inputs, L2-normalised by hand."""
    twin = copy.deepcopy(tower).double().eval()
    x = twin(inputs.double() if inputs.is_floating_point() else inputs)
    return x / x.pow(2).sum(-1, keepdim=True).sqrt()


def test_momentum_keys_are_unit_norm_momentum_embeddings_of_the_complete_inputs(tiny):
    """Keys = normalize(momentum tower(complete image / caption)): not masked inputs, not online towers."""
    model, text = tiny
    with torch.no_grad():  # momentum towers differ from the online ones, as after some EMA steps
        torch.manual_seed(11)
        for p in list(model.momentum_visual.parameters()) + list(model.momentum_text.parameters()):
            p.add_(0.05 * torch.randn_like(p))
    torch.manual_seed(12)
    image = torch.randn(B, 3, 64, 64)
    seen = {}
    handle = model.text_masker.register_forward_hook(lambda m, a, out: seen.update(masked_ids=out[0]))
    try:
        out = model(image, text)
    finally:
        handle.remove()
        model.keys_to_enqueue = None
    assert not torch.equal(seen["masked_ids"], text)  # the masked caption differs from the complete one
    for key, tower, inputs in (("image_momentum_features", model.momentum_visual, image),
                               ("text_momentum_features", model.momentum_text, text)):
        got = out[key]
        assert got.dtype == torch.float32 and not got.requires_grad
        assert got.shape == (B, model.image_queue.features.shape[1])
        norms = got.double().norm(dim=-1)
        assert torch.all((norms - 1).abs() < 1e-5), (key, norms)
        torch.testing.assert_close(got.double(), _reference_keys(tower, inputs), rtol=0, atol=1e-5)


def test_logit_scale_is_fixed_through_a_real_training_step(tiny):
    """τ stays fixed: logit_scale = ln(1/τ), no gradient, unchanged by an open_clip_train AdamW step."""
    model, text = tiny
    tau = model.conlip_cfg.temperature
    assert not model.logit_scale.requires_grad
    assert model.logit_scale.item() == pytest.approx(math.log(1.0 / tau), rel=1e-7)
    before_scale = model.logit_scale.detach().clone()
    # open_clip_train.main's optimizer: trainable parameters, logit_scale in the no-decay group
    exclude = lambda n, p: p.ndim < 2 or "bn" in n or "ln" in n or "bias" in n or "logit_scale" in n
    named = list(model.named_parameters())
    optimizer = torch.optim.AdamW(
        [{"params": [p for n, p in named if exclude(n, p) and p.requires_grad], "weight_decay": 0.0},
         {"params": [p for n, p in named if not exclude(n, p) and p.requires_grad], "weight_decay": 0.2}],
        lr=1e-2, betas=(0.9, 0.98), eps=1e-6)
    watched = model.visual.trunk.cls_token
    watched_before = watched.detach().clone()
    torch.manual_seed(13)
    model.zero_grad(set_to_none=True)
    out = model(torch.randn(B, 3, 64, 64), text)
    assert out["logit_scale"].item() == pytest.approx(1.0 / tau, rel=1e-6)
    ConLIPLoss.from_cfg(model.conlip_cfg)(**out).backward()
    optimizer.step()
    with torch.no_grad():  # open_clip_train.train's clamp after every step
        model.logit_scale.clamp_(0, math.log(100))
    assert not torch.equal(watched, watched_before)  # the step did train the towers
    assert model.logit_scale.grad is None
    assert torch.equal(model.logit_scale.detach(), before_scale)
    assert model.logit_scale.item() == pytest.approx(math.log(1.0 / tau), rel=1e-7)
    model.zero_grad(set_to_none=True)
