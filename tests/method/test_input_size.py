"""Fine-tuning at another image size (open_clip's force_image_size) from a ConLIP checkpoint."""
import json

import open_clip
import torch


def register_fixed_position_config(folder, name: str) -> None:
    """conlip-tiny with a ViT whose position embeddings have a fixed size (test_vit resamples
    them on the fly, so it would not show the problem)."""
    cfg = open_clip.get_model_config("conlip-tiny")
    cfg["vision_cfg"].update(timm_model_name="vit_tiny_patch16_224", image_size=224)
    cfg["embed_dim"] = 192
    cfg["text_cfg"]["hf_proj_type"] = "linear"
    (folder / "configs").mkdir()
    (folder / "configs" / f"{name}.json").write_text(json.dumps(cfg))
    open_clip.add_model_config(folder / "configs")


def test_force_image_size_resizes_momentum_tower_and_masker(tmp_path):
    register_fixed_position_config(tmp_path, "conlip-test-fixed-pos")
    base = open_clip.create_model("conlip-test-fixed-pos")
    torch.save({"state_dict": base.state_dict()}, tmp_path / "ckpt.pt")
    model = open_clip.create_model("conlip-test-fixed-pos", pretrained=str(tmp_path / "ckpt.pt"), force_image_size=96)
    assert model.visual.trunk.pos_embed.shape[1] == 1 + 6 * 6
    model.train()
    ids = open_clip.get_tokenizer("conlip-test-fixed-pos")(["a red square", "a blue bar"])
    out = model(torch.randn(2, 3, 96, 96), ids)
    assert model.momentum_visual.trunk.pos_embed.shape == model.visual.trunk.pos_embed.shape
    assert model.patch_masker.grid_size == (6, 6)
    assert out["mim_targets"].shape == (2 * 18, 16 * 16 * 3)


def test_checkpoint_fine_tuned_at_another_size_loads_at_that_size(tmp_path):
    register_fixed_position_config(tmp_path, "conlip-test-fixed-pos2")
    tuned = open_clip.create_model("conlip-test-fixed-pos2", force_image_size=96)
    ids = open_clip.get_tokenizer("conlip-test-fixed-pos2")(["a red square", "a blue bar"])
    tuned.train()(torch.randn(2, 3, 96, 96), ids)  # the first training step resizes the momentum tower
    torch.save({"epoch": 1, "state_dict": tuned.state_dict()}, tmp_path / "tuned.pt")
    # As clip_benchmark loads it: no force_image_size, the checkpoint decides.
    model, _, preprocess = open_clip.create_model_and_transforms("conlip-test-fixed-pos2",
                                                                 pretrained=str(tmp_path / "tuned.pt"))
    assert model.visual.image_size == (96, 96) and model.momentum_visual.trunk.pos_embed.shape[1] == 37
    assert torch.equal(model.visual.trunk.pos_embed, tuned.visual.trunk.pos_embed)
    image = torch.randn(2, 3, 96, 96)
    with torch.no_grad():
        assert torch.allclose(model.eval().encode_image(image), tuned.eval().encode_image(image), atol=1e-5)


def test_force_image_size_resizes_the_open_clip_vit_momentum_tower(tmp_path):
    """open_clip's own ViT: load_checkpoint resizes the online tower's position embeddings only."""
    base = open_clip.create_model("conlip-emoji")
    torch.save({"state_dict": base.state_dict()}, tmp_path / "ckpt.pt")
    model = open_clip.create_model("conlip-emoji", pretrained=str(tmp_path / "ckpt.pt"), force_image_size=96)
    grid = (96 // 8) ** 2 + 1
    assert model.visual.positional_embedding.shape[0] == grid
    assert model.momentum_visual.positional_embedding.shape == model.visual.positional_embedding.shape
    # the momentum tower's embeddings were resized from its own, as the online tower's were
    torch.testing.assert_close(model.momentum_visual.positional_embedding, model.visual.positional_embedding)


def test_plain_weights_at_another_size_fill_and_resize_the_momentum_tower(tmp_path):
    register_fixed_position_config(tmp_path, "conlip-test-fixed-pos3")
    tuned = open_clip.create_model("conlip-test-fixed-pos3", force_image_size=96)
    plain = {k: v for k, v in tuned.state_dict().items() if not k.startswith(("momentum_", "image_queue", "text_queue"))}
    torch.save({"state_dict": plain}, tmp_path / "plain.pt")
    model = open_clip.create_model("conlip-test-fixed-pos3", pretrained=str(tmp_path / "plain.pt"))
    assert model.visual.image_size == (96, 96)
    assert torch.equal(model.momentum_visual.trunk.pos_embed, tuned.visual.trunk.pos_embed)
