"""Each speed/memory rewrite computes what the straightforward version computes."""
import copy

import open_clip
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conlip_plugin.method.loss import masked_token_loss
from conlip_plugin.method.masking import IGNORE_INDEX, TextMasker, true_positions_first
from conlip_plugin.method.towers import TimmViTTokens


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = open_clip.create_model("conlip-tiny", output_dict=True)
    for mod in m.modules():
        if isinstance(mod, nn.Dropout):
            mod.p = 0.0
    return m.train()


def test_image_tokens_equal_timm_forward_features(model):
    images = torch.randn(3, 3, 64, 64)
    ours = TimmViTTokens.tokens(model.visual, images)
    assert torch.allclose(ours, model.visual.trunk.forward_features(images), atol=1e-6)


def test_recomputed_blocks_give_the_same_tokens_and_gradients(model):
    """Full and selective recomputation (image_checkpoint_policy) change no value, and the selective
    one keeps tensors for backward that the full one recomputes."""
    images = torch.randn(4, 3, 64, 64)
    mask = torch.zeros(4, 16, dtype=torch.bool)
    mask[:, ::3] = True
    grads, saved = [], []
    for blocks, policy in ((0, "full"), (4, "full"), (4, "selective")):
        twin = copy.deepcopy(model)
        count = [0]

        def pack(t, count=count):
            count[0] += 1
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = TimmViTTokens.tokens(twin.visual, images, mask, twin.image_mask_token, checkpoint_blocks=blocks,
                                       checkpoint_policy=policy)
        (out.square().mean() + out[:, 0].sum()).backward()
        grads.append((out.detach(), twin.image_mask_token.grad.clone(),
                      twin.visual.trunk.blocks[0].attn.qkv.weight.grad.clone()))
        saved.append(count[0])
    for reference, other in ((grads[0], grads[1]), (grads[0], grads[2])):
        for a, b in zip(reference, other):
            assert torch.allclose(a, b, atol=1e-6)
    assert saved[1] < saved[2] < saved[0]


def test_complete_and_masked_passes_as_one_batch_equal_two_batches(model):
    images = torch.randn(3, 3, 64, 64)
    mask = torch.rand(3, 16) < 0.5
    joint = TimmViTTokens.tokens(model.visual, torch.cat([images, images]),
                             torch.cat([torch.zeros_like(mask), mask]), model.image_mask_token)
    complete = TimmViTTokens.tokens(model.visual, images)
    masked = TimmViTTokens.tokens(model.visual, images, mask, model.image_mask_token)
    assert torch.allclose(joint[:3], complete, atol=1e-5) and torch.allclose(joint[3:], masked, atol=1e-5)
    ids = open_clip.get_tokenizer("conlip-tiny")(["a red bar", "two blue circles on white", ""])
    corrupted = ids.clone()
    corrupted[:, 1] = 103
    joint_text = model.text_adapter.tokens(model.text, torch.cat([ids, corrupted]))
    assert torch.allclose(joint_text[:3], model.text_adapter.tokens(model.text, ids), atol=1e-5)
    assert torch.allclose(joint_text[3:], model.text_adapter.tokens(model.text, corrupted), atol=1e-5)


def test_fixed_size_positions_hold_the_boolean_selection_in_order():
    torch.manual_seed(1)
    x = torch.randn(5, 12, 3)
    mask = torch.rand(5, 12) < 0.4
    mask[2] = False
    k = int(mask.sum(1).max())
    picked = true_positions_first(mask, k)
    taken = torch.take_along_dim(x, picked[..., None], dim=1)
    for b in range(5):
        n = int(mask[b].sum())
        expected = [x[b, j].tolist() for j in range(12) if mask[b, j]]
        assert taken[b, :n].tolist() == expected
        assert not mask[b, picked[b, n:]].any()


def test_mlm_bound_covers_every_caption_length():
    masker = TextMasker(50, mask_token_id=4, special_ids=[0, 1, 2], ratio=0.15)
    for length in range(3, 41):
        ids = torch.randint(5, 50, (64, length))
        ids[:, 0], ids[:, -1] = 1, 2
        ids[::2, length // 2:] = 0
        _, labels, _ = masker(ids)
        assert int((labels != IGNORE_INDEX).sum(1).max()) <= masker.max_chosen(length)


def test_fixed_size_mlm_and_mim_outputs_equal_boolean_indexing(model):
    """The model's fixed-size MLM/MIM rows give the losses of the straightforward ``states[mask]``."""
    seen = {}
    hooks = [model.mlm_head.register_forward_hook(lambda m, a, o: seen.__setitem__("mlm", o)),
             model.mim_head.register_forward_hook(lambda m, a, o: seen.__setitem__("mim", o)),
             model.patch_masker.register_forward_hook(lambda m, a, o: seen.__setitem__("patch", o)),
             model.text_masker.register_forward_hook(lambda m, a, o: seen.__setitem__("text", o))]
    ids = open_clip.get_tokenizer("conlip-tiny")(["a red bar", "two blue circles on white", "", "an emoji"])
    images = torch.randn(4, 3, 64, 64)
    torch.manual_seed(3)
    out = model(images, ids)
    for h in hooks:
        h.remove()
    labels = seen["text"][1]
    selected = labels != IGNORE_INDEX
    straight_logits = model.mlm_predictor(seen["mlm"][selected])
    assert out["mlm_logits"].shape[0] == 4 * model.text_masker.max_chosen(ids.shape[1]) > int(selected.sum())
    torch.testing.assert_close(masked_token_loss(out["mlm_logits"], out["mlm_labels"]),
                               F.cross_entropy(straight_logits.double(), labels[selected]).float())
    patch_mask = seen["patch"]
    torch.testing.assert_close(out["mim_predictions"], model.mim_predictor(seen["mim"][patch_mask]))
    p = model.image_adapter.patch_size
    patches = images.reshape(4, 3, 4, p, 4, p).permute(0, 2, 4, 3, 5, 1).reshape(4, 16, -1)
    assert torch.equal(out["mim_targets"], patches[patch_mask])


def test_training_forward_traces_as_one_graph(model):
    """No graph break in the hot path: ``--torchcompile`` compiles the whole ConLIP forward."""
    ids = open_clip.get_tokenizer("conlip-tiny")(["a red bar", "two blue circles on white"])
    explained = torch._dynamo.explain(model)(torch.randn(2, 3, 64, 64), ids)
    assert explained.graph_break_count == 0, [b.reason for b in explained.break_reasons]
    assert explained.graph_count == 1
