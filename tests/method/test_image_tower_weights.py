"""conlip_cfg.image_weights: the formats of the paper's ImageNet-21k ViT load into the timm tower,
exactly; transformers ViT folders and other architectures are refused with the fix named."""
import copy
from pathlib import Path
from typing import Dict

import numpy as np
import open_clip
import pytest
import timm
import torch
from safetensors.torch import save_file

import conlip_plugin
from conlip_plugin.method.tower_weights import load_image_tower_weights

IN21K_CLASSES = 21843


@pytest.fixture(scope="module")
def tiny_tower() -> torch.nn.Module:
    """conlip-tiny's image tower: open_clip's TimmModel around timm's test_vit, token pool, no head."""
    conlip_plugin.activate()
    return open_clip.create_model("conlip-tiny", pretrained_text=False).visual


@pytest.fixture
def tower(tiny_tower) -> torch.nn.Module:
    return copy.deepcopy(tiny_tower)


def source_vit(trunk: torch.nn.Module, num_classes: int = IN21K_CLASSES, **arch) -> torch.nn.Module:
    """A randomly initialised timm test_vit with a classifier, at the tower's image size."""
    torch.manual_seed(1)
    return timm.create_model("test_vit", num_classes=num_classes, img_size=trunk.patch_embed.img_size, **arch)


def with_pre_logits(state: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """As the legacy in21k release: a representation layer before the head."""
    width = state["cls_token"].shape[-1]
    return {**state, "pre_logits.fc.weight": torch.randn(width, width), "pre_logits.fc.bias": torch.randn(width)}


def write_google_npz(vit: torch.nn.Module, path: Path, pre_logits: bool = True) -> None:
    """The original ViT .npz layout, as timm's vision_transformer._load_weights reads it (the inverse
    of its _n2p transposes), with the in21k release's pre_logits and head entries if asked / present."""
    sd = {k: v.detach().numpy() for k, v in vit.state_dict().items()}
    width, heads = vit.embed_dim, vit.blocks[0].attn.num_heads
    w = {
        "embedding/kernel": sd["patch_embed.proj.weight"].transpose(2, 3, 1, 0),
        "embedding/bias": sd["patch_embed.proj.bias"],
        "cls": sd["cls_token"],
        "Transformer/posembed_input/pos_embedding": sd["pos_embed"],
        "Transformer/encoder_norm/scale": sd["norm.weight"],
        "Transformer/encoder_norm/bias": sd["norm.bias"],
    }
    if pre_logits:
        w["pre_logits/kernel"] = np.random.randn(width, width).astype(np.float32)
        w["pre_logits/bias"] = np.random.randn(width).astype(np.float32)
    if "head.weight" in sd:
        w["head/kernel"], w["head/bias"] = sd["head.weight"].T, sd["head.bias"]
    for i in range(len(vit.blocks)):
        b, p = f"blocks.{i}.", f"Transformer/encoderblock_{i}/"
        attn = p + "MultiHeadDotProductAttention_1/"
        for j, name in enumerate(("query", "key", "value")):
            rows = slice(j * width, (j + 1) * width)
            w[f"{attn}{name}/kernel"] = sd[b + "attn.qkv.weight"][rows].T.reshape(width, heads, -1)
            w[f"{attn}{name}/bias"] = sd[b + "attn.qkv.bias"][rows].reshape(heads, -1)
        w[f"{attn}out/kernel"] = sd[b + "attn.proj.weight"].reshape(width, heads, -1).transpose(1, 2, 0)
        w[f"{attn}out/bias"] = sd[b + "attn.proj.bias"]
        for ln, norm in (("LayerNorm_0", "norm1"), ("LayerNorm_2", "norm2")):
            w[f"{p}{ln}/scale"], w[f"{p}{ln}/bias"] = sd[f"{b}{norm}.weight"], sd[f"{b}{norm}.bias"]
        for r in range(2):
            w[f"{p}MlpBlock_3/Dense_{r}/kernel"] = sd[f"{b}mlp.fc{r + 1}.weight"].T
            w[f"{p}MlpBlock_3/Dense_{r}/bias"] = sd[f"{b}mlp.fc{r + 1}.bias"]
    np.savez(path, **w)


def write_checkpoint(vit: torch.nn.Module, path: Path, pre_logits: bool) -> None:
    state = vit.state_dict()
    state = with_pre_logits(state) if pre_logits else state
    if path.suffix == ".safetensors":
        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    elif path.suffix == ".npz":
        write_google_npz(vit, path, pre_logits)
    else:
        torch.save(state, path)


def assert_trunk_equals(trunk: torch.nn.Module, vit: torch.nn.Module) -> None:
    saved = vit.state_dict()
    loaded = trunk.state_dict()
    assert loaded.keys() == {k for k in saved if not k.startswith("head.")}
    for key, value in loaded.items():
        assert torch.equal(value, saved[key]), key


@pytest.mark.parametrize("suffix", [".safetensors", ".pth", ".bin", ".npz"])
@pytest.mark.parametrize("release", ["in21k_head_and_pre_logits", "no_head"])
def test_orig_in21k_formats_load_exactly_into_the_trunk(tower, tmp_path, suffix, release):
    with_head = release != "no_head"
    vit = source_vit(tower.trunk, num_classes=IN21K_CLASSES if with_head else 0)
    assert not torch.equal(tower.trunk.blocks[0].attn.qkv.weight, vit.blocks[0].attn.qkv.weight)
    path = tmp_path / f"vit{suffix}"
    write_checkpoint(vit, path, pre_logits=with_head)
    load_image_tower_weights(tower, str(path))
    assert_trunk_equals(tower.trunk, vit)


def test_config_image_weights_fill_online_and_momentum_towers(tiny_tower, tmp_path):
    vit = source_vit(tiny_tower.trunk)
    write_checkpoint(vit, tmp_path / "vit.safetensors", pre_logits=True)
    cfg = open_clip.get_model_config("conlip-tiny")["conlip_cfg"]
    # conlip-tiny has text_weights false; pretrained_text=False would also skip image_weights
    # (ConLIP reads it as "a full checkpoint follows").
    model = open_clip.create_model("conlip-tiny", conlip_cfg=dict(cfg, image_weights=str(tmp_path / "vit.safetensors")))
    assert_trunk_equals(model.visual.trunk, vit)
    assert_trunk_equals(model.momentum_visual.trunk, vit)


def test_weights_at_another_image_size_resample_position_embeddings(tower, tmp_path):
    torch.manual_seed(1)
    vit = timm.create_model("test_vit", num_classes=0, img_size=64)
    write_checkpoint(vit, tmp_path / "vit64.safetensors", pre_logits=False)
    load_image_tower_weights(tower, str(tmp_path / "vit64.safetensors"))
    assert tower.trunk.pos_embed.shape != vit.pos_embed.shape
    assert torch.equal(tower.trunk.cls_token, vit.cls_token)
    assert torch.equal(tower.trunk.blocks[5].mlp.fc2.weight, vit.blocks[5].mlp.fc2.weight)


@pytest.fixture
def hf_vit_folder(tower, tmp_path) -> Path:
    """A tiny random transformers ViTModel, as google/vit-base-patch16-224-in21k is laid out."""
    from transformers import ViTConfig, ViTModel

    trunk = tower.trunk
    config = ViTConfig(hidden_size=trunk.embed_dim, num_hidden_layers=len(trunk.blocks), num_attention_heads=2,
                       intermediate_size=3 * trunk.embed_dim, image_size=trunk.patch_embed.img_size[0], patch_size=16)
    folder = tmp_path / "vit-hf"
    ViTModel(config).save_pretrained(folder)
    return folder


def test_transformers_vit_folder_is_refused_naming_the_timm_weights(tower, hf_vit_folder):
    before = copy.deepcopy(tower.trunk.state_dict())
    with pytest.raises(ValueError, match=r"transformers 'vit' model.*timm cannot convert.*"
                                         r"timm/vit_base_patch16_224\.orig_in21k.*CONLIP_VIT_WEIGHTS"):
        load_image_tower_weights(tower, str(hf_vit_folder))
    assert all(torch.equal(v, before[k]) for k, v in tower.trunk.state_dict().items())


def test_transformers_vit_weights_files_are_refused(tower, hf_vit_folder, tmp_path):
    """Its model.safetensors, and a ViTForImageClassification's pytorch_model.bin (keys under vit.)."""
    from safetensors.torch import load_file

    state = load_file(hf_vit_folder / "model.safetensors")
    classifier = {**{"vit." + k: v for k, v in state.items()}, "classifier.weight": torch.randn(5, 64)}
    torch.save(classifier, tmp_path / "pytorch_model.bin")
    for path in (hf_vit_folder / "model.safetensors", tmp_path / "pytorch_model.bin"):
        with pytest.raises(ValueError, match=r"Hugging Face transformers ViT key names.*timm cannot convert.*"
                                             r"vit_base_patch16_224\.orig_in21k.*CONLIP_VIT_WEIGHTS"):
            load_image_tower_weights(tower, str(path))


@pytest.mark.parametrize("suffix", [".safetensors", ".npz"])
@pytest.mark.parametrize("arch, found", [
    (dict(embed_dim=32), r"width 32"),
    (dict(depth=3), r"depth 3"),
    (dict(depth=8), r"depth 8"),
    (dict(patch_size=8), r"patch \(8, 8\)"),
])
def test_other_architecture_is_refused_naming_the_mismatch(tower, tmp_path, suffix, arch, found):
    vit = source_vit(tower.trunk, **arch)
    path = tmp_path / f"other{suffix}"
    write_checkpoint(vit, path, pre_logits=False)
    before = copy.deepcopy(tower.trunk.state_dict())
    with pytest.raises(ValueError, match=rf"does not fit the image tower \(a ViT of .*{found}.*; the tower is "
                                         rf"depth 6, width 64, patch \(16, 16\)\)"):
        load_image_tower_weights(tower, str(path))
    assert all(torch.equal(v, before[k]) for k, v in tower.trunk.state_dict().items())


def test_checkpoint_with_other_blocks_is_refused_naming_the_keys(tower, tmp_path):
    vit = source_vit(tower.trunk, num_classes=0, mlp_ratio=2)
    save_file(vit.state_dict(), str(tmp_path / "mlp2.safetensors"))
    with pytest.raises(ValueError, match=r"blocks\.0\.mlp\.fc1\.weight is \(128, 64\) here, \(192, 64\) in the tower"):
        load_image_tower_weights(tower, str(tmp_path / "mlp2.safetensors"))


def test_npz_lacking_a_tensor_is_refused(tower, tmp_path):
    write_google_npz(source_vit(tower.trunk), tmp_path / "full.npz")
    with np.load(tmp_path / "full.npz") as w:
        np.savez(tmp_path / "partial.npz", **{k: w[k] for k in w.files if "encoderblock_2/LayerNorm_2" not in k})
    with pytest.raises(ValueError, match=r"does not fit the image tower \(timm's \.npz loader: .*LayerNorm_2/scale"):
        load_image_tower_weights(tower, str(tmp_path / "partial.npz"))


def test_missing_file_names_the_paper_weights(tower, tmp_path):
    with pytest.raises(FileNotFoundError, match=r"is not a file.*vit_base_patch16_224\.orig_in21k"):
        load_image_tower_weights(tower, str(tmp_path / "absent.safetensors"))


def test_npz_of_another_kind_is_refused(tower, tmp_path):
    with open(tmp_path / "array.npz", "wb") as f:
        np.save(f, np.zeros(3))
    torch.save(source_vit(tower.trunk).state_dict(), tmp_path / "torch.npz")  # a zip archive too
    with pytest.raises(ValueError, match=r"array\.npz is not a \.npz archive.*orig_in21k"):
        load_image_tower_weights(tower, str(tmp_path / "array.npz"))
    with pytest.raises(ValueError, match=r"torch\.npz is not a Google/big_vision ViT \.npz.*orig_in21k"):
        load_image_tower_weights(tower, str(tmp_path / "torch.npz"))
