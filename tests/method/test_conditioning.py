"""What the ConMLM / ConMIM heads see (spec steps 5, 6 and Variants), and the eval-mode contract."""
from contextlib import contextmanager

import pytest
import torch
import torch.nn.functional as F

from conlip_plugin.method.loss import ConLIPLoss
from model_state import deterministic

CAPTIONS = ["a photo of a cat sitting on a sofa", "two dogs", "a red car parked on a quiet street at night",
            "people walking in the park"]
B = len(CAPTIONS)
IMAGE_KEYS = {"image_features", "text_features", "logit_scale", "image_momentum_features",
              "text_momentum_features", "image_queue", "text_queue"}


pytestmark = pytest.mark.usefixtures("one_thread")


def _build(name):
    import open_clip

    torch.manual_seed(0)
    model = open_clip.create_model(name, output_dict=True)
    text = open_clip.get_tokenizer(name)(CAPTIONS)
    return deterministic(model), text


@pytest.fixture(scope="module")
def conlip():
    return _build("conlip-tiny")


@pytest.fixture(scope="module")
def vanilla():
    return _build("conlip-tiny-vanilla")


@pytest.fixture(scope="module")
def cl():
    return _build("conlip-tiny-cl")


@contextmanager
def capture(model):
    """Record the heads' inputs, the masks drawn, and (with retained grad) the towers' token states."""
    seen = {}
    handles = []

    def head_hook(name):
        def hook(module, args, kwargs):
            names = ("x", "query_mask", "memory", "memory_mask")
            call = dict(zip(names, args))
            call.update(kwargs)
            if call["memory"].requires_grad:
                call["memory"].retain_grad()
            seen[name] = call
        return hook

    def keep(name):
        def hook(module, args, output):
            seen[name] = output
        return hook

    def keep_grad(name):
        def hook(module, args, output):
            tensor = output if torch.is_tensor(output) else output.last_hidden_state
            if tensor.requires_grad:
                tensor.retain_grad()
            seen[name] = tensor
        return hook

    for head in ("mlm_head", "mim_head"):
        if hasattr(model, head):
            handles.append(getattr(model, head).register_forward_pre_hook(head_hook(head), with_kwargs=True))
    if hasattr(model, "patch_masker"):
        handles.append(model.patch_masker.register_forward_hook(keep("patch_mask")))
    if hasattr(model, "text_masker"):
        handles.append(model.text_masker.register_forward_hook(keep("text_mask")))
    handles.append(model.visual.trunk.norm.register_forward_hook(keep_grad("image_states")))
    handles.append(model.text.transformer.register_forward_hook(keep_grad("text_states")))
    try:
        yield seen
    finally:
        for h in handles:
            h.remove()


@torch.no_grad()
def complete_image_tokens(model, image):
    """Pass (A) computed on its own: the timm trunk in eval mode, no mask."""
    was = model.training
    model.eval()
    try:
        return model.visual.trunk.forward_features(image)
    finally:
        model.train(was)


@torch.no_grad()
def masked_image_tokens(model, image, patch_mask):
    """Pass (C) written out: mask token in place of the patch embedding, then positions, blocks, norm."""
    trunk = model.visual.trunk
    was = model.training
    model.eval()
    try:
        x = trunk.patch_embed(image)  # (B, h, w, D) with dynamic image size, else (B, N, D)
        mask = patch_mask.view(x.shape[:-1] + (1,))
        x = torch.where(mask, model.image_mask_token.view(-1), x)
        x = trunk._pos_embed(x)
        x = trunk.norm_pre(x)
        x = trunk.blocks(x)
        return trunk.norm(x)
    finally:
        model.train(was)


@torch.no_grad()
def text_tokens(model, ids):
    was = model.training
    model.eval()
    try:
        return model.text.transformer(input_ids=ids, attention_mask=(ids != 0).long()).last_hidden_state
    finally:
        model.train(was)


def _loss_terms(model, out):
    return ConLIPLoss.from_cfg(model.conlip_cfg)(**out, output_dict=True)


# --------------------------------------------------------------------------------------------
# ConLIP: conditioned memories
# --------------------------------------------------------------------------------------------

def test_conmlm_memory_is_complete_cls_then_masked_patches(conlip):
    model, text = conlip
    model.zero_grad(set_to_none=True)
    torch.manual_seed(1)
    image = torch.randn(B, 3, 64, 64)
    with capture(model) as seen:
        model(image, text)
    call, patch_mask = seen["mlm_head"], seen["patch_mask"]
    masked_ids, labels, _ = seen["text_mask"]
    memory = call["memory"]
    n = patch_mask.shape[1]
    assert memory.shape[:2] == (B, 1 + n)
    assert int(patch_mask.sum()) == B * round(model.conlip_cfg.image_mask_ratio * n)

    complete = complete_image_tokens(model, image)
    masked = masked_image_tokens(model, image, patch_mask)
    # the masked pass's own CLS is different from the complete one...
    assert not torch.allclose(complete[:, 0], masked[:, 0], atol=1e-3)
    # ...and the memory holds the complete image's CLS, then the masked image's patches
    torch.testing.assert_close(memory[:, 0].detach(), complete[:, 0], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(memory[:, 1:].detach(), masked[:, 1:], rtol=1e-4, atol=1e-5)
    assert not torch.allclose(memory[:, 1:].detach(), complete[:, 1:], atol=1e-3)

    # queries: the masked text's token states, with its padding mask
    torch.testing.assert_close(call["x"].detach(), text_tokens(model, masked_ids), rtol=1e-4, atol=1e-5)
    assert torch.equal(call["query_mask"], masked_ids != 0)
    assert torch.equal(masked_ids != 0, text != 0)
    assert call.get("memory_mask") is None
    assert (labels != -100).any(dim=1).all()


def test_conmlm_gradient_reaches_image_encoder_through_complete_cls(conlip):
    model, text = conlip
    model.zero_grad(set_to_none=True)
    torch.manual_seed(2)
    image = torch.randn(B, 3, 64, 64)
    with capture(model) as seen:
        out = model(image, text)
    memory = seen["mlm_head"]["memory"]
    states = seen["image_states"]  # (2B, 1+N, D): pass (A) rows first, then pass (C)
    assert states.shape[0] == 2 * B
    assert memory.requires_grad
    name = model.conlip_cfg.loss_names()["mlm"]
    assert name == "conmlm_loss"
    _loss_terms(model, out)[name].backward()

    assert (memory.grad[:, 0].abs().sum(-1) > 0).all()
    g_complete, g_masked = states.grad[:B], states.grad[B:]
    # pass (A): only the CLS slot carries ConMLM gradient, for every image
    assert (g_complete[:, 0].abs().sum(-1) > 0).all()
    assert torch.count_nonzero(g_complete[:, 1:]) == 0
    # pass (C): the patches do, its CLS does not (it is not used)
    assert torch.count_nonzero(g_masked[:, 0]) == 0
    assert (g_masked[:, 1:].abs().sum(-1) > 0).all()
    # and the image tower's parameters receive it
    assert model.visual.trunk.cls_token.grad is not None and model.visual.trunk.cls_token.grad.abs().sum() > 0
    assert model.image_mask_token.grad is not None and model.image_mask_token.grad.abs().sum() > 0
    model.zero_grad(set_to_none=True)


def test_conmim_memory_is_complete_text_cls_then_masked_tokens(conlip):
    model, text = conlip
    torch.manual_seed(3)
    image = torch.randn(B, 3, 64, 64)
    with capture(model) as seen:
        out = model(image, text)
    call, patch_mask = seen["mim_head"], seen["patch_mask"]
    masked_ids, _, _ = seen["text_mask"]
    memory = call["memory"]
    assert memory.shape[:2] == text.shape

    complete = text_tokens(model, text)
    masked = text_tokens(model, masked_ids)
    assert not torch.allclose(complete[:, 0], masked[:, 0], atol=1e-3)
    torch.testing.assert_close(memory[:, 0].detach(), complete[:, 0], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(memory[:, 1:].detach(), masked[:, 1:], rtol=1e-4, atol=1e-5)
    expected_mask = torch.cat([torch.ones(B, 1, dtype=torch.bool), masked_ids[:, 1:] != 0], dim=1)
    assert torch.equal(call["memory_mask"], expected_mask)
    assert torch.equal(call["memory_mask"], text != 0)
    # queries: the masked image's patch states, no query mask
    torch.testing.assert_close(call["x"].detach(), masked_image_tokens(model, image, patch_mask)[:, 1:],
                               rtol=1e-4, atol=1e-5)
    assert call["query_mask"] is None
    # predictions only at masked patches; targets are those patches' pixels
    assert out["mim_predictions"].shape[0] == int(patch_mask.sum())
    p = model.image_adapter.patch_size
    gw = 64 // p
    rows = [(b, j) for b in range(B) for j in range(patch_mask.shape[1]) if patch_mask[b, j]]
    for r, (b, j) in enumerate(rows[:5]):
        pr, pc = divmod(j, gw)
        block = image[b, :, pr * p:(pr + 1) * p, pc * p:(pc + 1) * p]  # (C, p, p)
        assert out["mim_targets"][r].tolist() == block.permute(1, 2, 0).flatten().tolist()


def test_conmim_gradient_reaches_text_encoder_through_complete_cls(conlip):
    model, text = conlip
    model.zero_grad(set_to_none=True)
    torch.manual_seed(4)
    image = torch.randn(B, 3, 64, 64)
    with capture(model) as seen:
        out = model(image, text)
    states = seen["text_states"]  # (2B, L, D): pass (B) rows first, then pass (D)
    masked_ids, _, _ = seen["text_mask"]
    assert states.shape[0] == 2 * B
    name = model.conlip_cfg.loss_names()["mim"]
    assert name == "conmim_loss"
    _loss_terms(model, out)[name].backward()

    memory = seen["mim_head"]["memory"]
    assert memory.requires_grad and (memory.grad[:, 0].abs().sum(-1) > 0).all()
    g_complete, g_masked = states.grad[:B], states.grad[B:]
    assert (g_complete[:, 0].abs().sum(-1) > 0).all()
    assert torch.count_nonzero(g_complete[:, 1:]) == 0
    assert torch.count_nonzero(g_masked[:, 0]) == 0
    per_token = g_masked.abs().sum(-1)  # (B, L)
    real = masked_ids != 0
    real[:, 0] = False
    assert (per_token[real] > 0).all()
    assert torch.count_nonzero(per_token[masked_ids == 0]) == 0  # padding is masked out
    emb = model.text.transformer.embeddings.word_embeddings.weight
    assert emb.grad is not None and emb.grad.abs().sum() > 0
    model.zero_grad(set_to_none=True)


# --------------------------------------------------------------------------------------------
# Vanilla and CL variants
# --------------------------------------------------------------------------------------------

def test_vanilla_memories_are_the_complete_passes(vanilla):
    model, text = vanilla
    torch.manual_seed(5)
    image = torch.randn(B, 3, 64, 64)
    with capture(model) as seen:
        out = model(image, text)
    mlm, mim = seen["mlm_head"], seen["mim_head"]
    masked_ids, _, _ = seen["text_mask"]
    patch_mask = seen["patch_mask"]

    complete_img = complete_image_tokens(model, image)
    assert mlm["memory"].shape[:2] == complete_img.shape[:2]
    torch.testing.assert_close(mlm["memory"].detach(), complete_img, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(mlm["x"].detach(), text_tokens(model, masked_ids), rtol=1e-4, atol=1e-5)

    complete_txt = text_tokens(model, text)
    torch.testing.assert_close(mim["memory"].detach(), complete_txt, rtol=1e-4, atol=1e-5)
    assert torch.equal(mim["memory_mask"], text != 0)
    torch.testing.assert_close(mim["x"].detach(), masked_image_tokens(model, image, patch_mask)[:, 1:],
                               rtol=1e-4, atol=1e-5)

    terms = _loss_terms(model, out)
    assert set(terms) == {"dcl_loss", "mlm_loss", "mim_loss"}
    assert all(torch.isfinite(v) for v in terms.values())


def test_cl_variant_has_no_heads(cl):
    model, text = cl
    for name in ("mlm_head", "mim_head", "mlm_predictor", "mim_predictor", "patch_masker", "text_masker",
                 "image_mask_token"):
        assert not hasattr(model, name), name
    torch.manual_seed(6)
    with capture(model) as seen:
        out = model(torch.randn(B, 3, 64, 64), text)
    assert set(out) == IMAGE_KEYS
    assert seen["image_states"].shape[0] == B and seen["text_states"].shape[0] == B  # no masked passes
    assert list(_loss_terms(model, out)) == ["dcl_loss"]


# --------------------------------------------------------------------------------------------
# eval mode is the plain open_clip model; train-mode embeddings are the towers' own
# --------------------------------------------------------------------------------------------

def test_eval_forward_is_plain_clip_and_changes_nothing(conlip):
    model, text = conlip
    model.eval()
    try:
        torch.manual_seed(7)
        image = torch.randn(B, 3, 64, 64)
        state = {k: v.detach().clone() for k, v in model.state_dict().items() if torch.is_tensor(v)}
        pending = model.keys_to_enqueue
        out = model(image, text)
        assert set(out) == {"image_features", "text_features", "logit_scale"}
        with torch.no_grad():
            img = F.normalize(model.visual.trunk.forward_features(image)[:, 0], dim=-1)
            txt = F.normalize(text_tokens(model, text)[:, 0], dim=-1)
            torch.testing.assert_close(out["image_features"], F.normalize(model.encode_image(image), dim=-1))
            torch.testing.assert_close(out["text_features"], F.normalize(model.encode_text(text), dim=-1))
        torch.testing.assert_close(out["image_features"], img, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(out["text_features"], txt, rtol=1e-4, atol=1e-5)
        assert out["logit_scale"].item() == pytest.approx(1.0 / model.conlip_cfg.temperature, rel=1e-5)
        after = {k: v for k, v in model.state_dict().items() if torch.is_tensor(v)}
        assert set(after) == set(state)
        for k, v in state.items():
            assert torch.equal(after[k], v), k
        assert model.keys_to_enqueue is pending
    finally:
        model.train()


def test_train_features_equal_eval_encoders(conlip):
    model, text = conlip
    torch.manual_seed(8)
    image = torch.randn(B, 3, 64, 64)
    model.train()
    out = model(image, text)
    model.eval()
    try:
        with torch.no_grad():
            want_img = F.normalize(model.encode_image(image), dim=-1)
            want_txt = F.normalize(model.encode_text(text), dim=-1)
    finally:
        model.train()
    torch.testing.assert_close(out["image_features"].detach(), want_img, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out["text_features"].detach(), want_txt, rtol=1e-4, atol=1e-5)
    assert out["image_features"].requires_grad and out["text_features"].requires_grad
    assert out["logit_scale"].item() == pytest.approx(1.0 / model.conlip_cfg.temperature, rel=1e-5)
    model.keys_to_enqueue = None


def test_patch_dropout_is_refused_with_the_fix():
    import open_clip

    with pytest.raises(ValueError, match="patch_dropout to 0"):
        open_clip.create_model("conlip-emoji", force_patch_dropout=0.5)


def test_open_clip_text_tower_with_a_non_clip_tokenizer_is_refused(tmp_path):
    import json

    import open_clip

    cfg = open_clip.factory.get_model_config("ViT-S-32-alt+conlip")
    cfg["text_cfg"]["hf_tokenizer_name"] = "some-sentencepiece-tokenizer"
    (tmp_path / "conlip-test-spm.json").write_text(json.dumps(cfg))
    open_clip.add_model_config(tmp_path)
    with pytest.raises(ValueError, match="CLIP BPE tokenizer only"):
        open_clip.create_model("conlip-test-spm")
