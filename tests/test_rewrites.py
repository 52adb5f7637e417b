"""Each speed/memory rewrite computes what the straightforward version computes."""
import copy

import open_clip
import pytest
import torch
from torch import nn

from conlip_plugin.towers import TimmViTTokens


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
    images = torch.randn(4, 3, 64, 64)
    mask = torch.zeros(4, 16, dtype=torch.bool)
    mask[:, ::3] = True
    grads = []
    for blocks in (0, 4):
        twin = copy.deepcopy(model)
        out = TimmViTTokens.tokens(twin.visual, images, mask, twin.image_mask_token, checkpoint_blocks=blocks)
        (out.square().mean() + out[:, 0].sum()).backward()
        grads.append((out.detach(), twin.image_mask_token.grad.clone(),
                      twin.visual.trunk.blocks[0].attn.qkv.weight.grad.clone()))
    for a, b in zip(*grads):
        assert torch.allclose(a, b, atol=1e-6)


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
    joint_text = model._text_tokens.tokens(model.text, torch.cat([ids, corrupted]))
    assert torch.allclose(joint_text[:3], model._text_tokens.tokens(model.text, ids), atol=1e-5)
    assert torch.allclose(joint_text[3:], model._text_tokens.tokens(model.text, corrupted), atol=1e-5)
