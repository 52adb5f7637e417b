"""Training captions cut to the batch's longest: every loss term, gradient and queue key equals the
padded step's (float64, the same masks), for each text tower family and variant."""
import json
import math

import open_clip
import pytest
import torch
from open_clip.loss import ClipLoss

import conlip_plugin
from conlip_plugin.method.loss import ConLIPLoss, RecipeWithTokenLosses
from conlip_plugin.method.text_padding import TrimCaptions, inexact_reason, trim_padding, trimmed_length
from model_state import deterministic
from tiny_configs import native_base

CAPTIONS = ["a red square", "two blue bars on a white ground", "a green circle", "x"]
MODELS = ["conlip-tiny", "conlip-tiny-cl", "conlip-tiny-vanilla", "conlip-tiny-clip+conmlm-conmim",
          "padtest-native+conlip", "padtest-native+conlip-cl", "padtest-native+conmlm-conmim"]

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module", autouse=True)
def native(tmp_path_factory):
    conlip_plugin.activate()
    folder = tmp_path_factory.mktemp("padtest")
    (folder / "padtest-native.json").write_text(json.dumps(native_base(32)))
    open_clip.add_model_config(folder)


def test_trimmed_length_is_the_longest_caption_rounded_up_within_the_context():
    ids = torch.zeros(3, 24, dtype=torch.long)
    ids[0, :5] = 7
    ids[2, :11] = 7
    ids[2, 3] = 0  # a pad id inside a caption does not end it
    assert trimmed_length(ids, 0, 8) == 16 and trimmed_length(ids, 0, 1) == 11
    assert trimmed_length(ids, 0, 32) == 24  # never past the context
    assert trimmed_length(torch.zeros(2, 24, dtype=torch.long), 0, 8) == 8
    out = trim_padding(ids, 0, 8)
    assert torch.equal(out, ids[:, :16]) and out.is_contiguous()
    assert torch.equal(trim_padding(ids, 5, 8), ids)  # nothing is the pad id 5: nothing goes


def test_collate_wrapper_trims_the_texts_of_each_batch():
    batch = [(torch.zeros(3), torch.tensor([4, 5, 0, 0, 0, 0, 0, 0, 0, 0])) for _ in range(2)]
    images, texts = TrimCaptions(torch.utils.data.default_collate, 0, 4)(batch)
    assert images.shape == (2, 3) and texts.shape == (2, 4)


def test_towers_that_read_padding_are_not_trimmed():
    assert inexact_reason(open_clip.get_model_config("conlip-tiny")) is None
    assert inexact_reason(native_base()) is None
    assert "causal mask" in inexact_reason({"text_cfg": {"no_causal_mask": True, "pool_type": "last"}})
    assert "'last'" in inexact_reason({"text_cfg": {"pool_type": "last"}})


def _float64_model(name: str):
    torch.manual_seed(0)
    model = deterministic(open_clip.create_model(name, pretrained_text=False, output_dict=True)).double()
    return model


def _step(model, loss_fn, images, ids, masks):
    """One forward and backward with the given masks; the loss terms, gradients and queue keys."""
    model.zero_grad(set_to_none=True)
    model._masks = lambda image, text: masks
    try:
        out = model(images, ids)
    finally:
        del model._masks
    losses = loss_fn(**out, output_dict=True)
    sum(losses.values()).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    keys = model.keys_to_enqueue
    model.keys_to_enqueue = None
    return {k: v.detach() for k, v in losses.items()}, grads, keys


@pytest.mark.parametrize("name", MODELS)
def test_trimmed_step_equals_the_padded_step(name):
    model = _float64_model(name)
    cfg = model.conlip_cfg
    loss_fn = RecipeWithTokenLosses.from_cfg(ClipLoss(), cfg) if not cfg.momentum_queues else ConLIPLoss.from_cfg(cfg)
    tokenizer = open_clip.get_tokenizer(name)
    ids = tokenizer(CAPTIONS)
    pad = getattr(getattr(tokenizer, "tokenizer", None), "pad_token_id", None) or 0
    short = trim_padding(ids, pad, 8)
    assert short.shape[1] < ids.shape[1]
    torch.manual_seed(1)
    images = torch.randn(len(CAPTIONS), 3, 64, 64, dtype=torch.float64)
    masks = model._masks(images, ids) if cfg.uses_heads else (None, None, None, None)
    cut = tuple(m if m is None or i == 0 else m[:, :short.shape[1]] for i, m in enumerate(masks))
    if cut[2] is not None:  # every chosen MLM position survives the cut
        assert (cut[2] != -100).sum() == (masks[2] != -100).sum()
    padded_losses, padded_grads, padded_keys = _step(model, loss_fn, images, ids, masks)
    losses, grads, keys = _step(model, loss_fn, images, short, cut)
    assert losses.keys() == padded_losses.keys()
    for term, value in padded_losses.items():
        assert losses[term].item() == pytest.approx(value.item(), rel=1e-6, abs=1e-9), term
    assert grads.keys() == padded_grads.keys() and grads
    for param, grad in padded_grads.items():
        torch.testing.assert_close(grads[param], grad, rtol=1e-6, atol=1e-9, msg=param)
    if cfg.momentum_queues:
        for got, want in zip(keys, padded_keys):
            torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-9)


def test_the_training_loader_yields_trimmed_captions(caption_data, tmp_path):
    """open_clip_train's own get_data, through the patch: the CSV loader's batches are cut."""
    from open_clip_train.data import get_data
    from open_clip_train.params import parse_args

    args = parse_args(["--model", "conlip-tiny", "--train-data", str(caption_data["csv"]), "--dataset-type", "csv",
                       "--csv-separator", ",", "--csv-img-key", "filepath", "--csv-caption-key", "title",
                       "--batch-size", "6", "--workers", "0"])
    args.distributed, args.world_size, args.rank = False, 1, 0
    _, train, val = open_clip.create_model_and_transforms("conlip-tiny")
    tokenizer = open_clip.get_tokenizer("conlip-tiny")
    images, texts = next(iter(get_data(args, (train, val), tokenizer=tokenizer)["train"].dataloader))
    context = tokenizer.context_length
    assert texts.shape[1] % 8 == 0 and texts.shape[1] < context
    assert (texts[:, -8:] != 0).any()  # the last bucket holds a real token
    args.model = "conlip-tiny-clip"  # not a ConLIP model: untouched
    _, texts = next(iter(get_data(args, (train, val), tokenizer=tokenizer)["train"].dataloader))
    assert texts.shape[1] == context
    assert math.isfinite(images.sum().item())


def test_compiled_forward_is_one_graph_per_length_bucket():
    """torch.compile meets one shape per bucket: one graph each, reused, no graph break."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    torch.manual_seed(0)
    model = open_clip.create_model("conlip-tiny", pretrained_text=False, output_dict=True).train()
    compiled = torch.compile(model, backend="eager")
    ids = open_clip.get_tokenizer("conlip-tiny")(["a b c d e f g h i j k l m n o p q r s t", "b", "c", "d"])
    images = torch.randn(4, 3, 64, 64)
    for length in (8, 16, 24, 8, 16):
        cut = ids.clone()
        cut[:, length - 1:] = 0
        batch = trim_padding(cut, 0, 8)
        assert batch.shape[1] == length
        compiled(images, batch)
        model.keys_to_enqueue = None
    assert counters["stats"]["unique_graphs"] == 3
    assert not counters["graph_break"]
