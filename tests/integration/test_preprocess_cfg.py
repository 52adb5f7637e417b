"""A model config's own ``preprocess_cfg`` reaches every path that creates the model by name.

The transforms themselves are inspected (Normalize mean/std, resize and crop), for open_clip's
factory, the unmodified training CLI, stock clip_benchmark on a checkpoint, the export read with
the plugin disabled, and the Table 2 tool.
"""
import json
import sys
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
from PIL import Image
from torchvision import transforms as T

from conlip_plugin.integration.activation import CONFIG_DIR
from tiny_configs import hf_base

PY = sys.executable
HALF = {"mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5]}
OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)


def describe(transform) -> dict:
    """The steps of an open_clip image transform that decide what the model sees."""
    out = {}
    for step in transform.transforms:
        if isinstance(step, T.Normalize):
            out["mean"], out["std"] = [round(float(v), 6) for v in step.mean], [round(float(v), 6) for v in step.std]
        elif isinstance(step, T.RandomResizedCrop):
            out["random_crop"] = (tuple(step.size), tuple(step.scale), step.interpolation.value)
        elif isinstance(step, T.Resize):
            out["resize"] = (step.size, step.interpolation.value)
        elif isinstance(step, T.CenterCrop):
            out["center_crop"] = tuple(step.size)
    return out


def _tiny_with(preprocess: dict) -> dict:
    cfg = json.loads((CONFIG_DIR / "conlip-tiny.json").read_text())
    cfg["preprocess_cfg"] = preprocess
    return cfg


@pytest.fixture(scope="module")
def configs(tmp_path_factory) -> Path:
    """``conlip-tiny-half`` (conlip-tiny with mean = std = 0.5) and a plain, non-ConLIP base with its
    own preprocessing, registered here and (through CONLIP_MODEL_CONFIGS) in subprocesses."""
    root = tmp_path_factory.mktemp("pp_configs")
    (root / "conlip-tiny-half.json").write_text(json.dumps(_tiny_with(HALF)))
    base = dict(hf_base(32), preprocess_cfg={"mean": [0.2, 0.3, 0.4], "std": [0.6, 0.7, 0.8],
                                             "interpolation": "bilinear", "resize_mode": "squash"})
    (root / "pptest-base.json").write_text(json.dumps(base))
    open_clip.add_model_config(root)
    return root


@pytest.fixture(scope="module")
def half_checkpoint(configs, tmp_path_factory) -> Path:
    """A checkpoint of conlip-tiny-half as open_clip_train writes it (random weights)."""
    model = open_clip.create_model("conlip-tiny-half", pretrained_text=False)
    path = tmp_path_factory.mktemp("pp_ckpt") / "epoch_1.pt"
    torch.save({"epoch": 1, "name": "half", "state_dict": model.state_dict()}, path)
    return path


def test_factory_applies_the_config_section_to_both_transforms(configs):
    model, train, val = open_clip.create_model_and_transforms("conlip-tiny-half", pretrained_text=False)
    assert describe(val) == {"resize": (64, "bicubic"), "center_crop": (64, 64), **HALF}
    assert describe(train) == {"random_crop": ((64, 64), (0.9, 1.0), "bicubic"), **HALF}
    assert model.visual.preprocess_cfg["mean"] == HALF["mean"] and model.visual.preprocess_cfg["size"] == (64, 64)
    # The section never reaches the model constructor (open_clip would raise TypeError on it).
    assert "preprocess_cfg" not in open_clip.factory.get_model_config("conlip-tiny-half")


def test_configs_without_the_section_keep_open_clips_defaults(configs):
    _, _, val = open_clip.create_model_and_transforms("conlip-tiny", pretrained_text=False)
    assert describe(val)["mean"] == [round(v, 6) for v in OPENAI_MEAN]


def test_explicit_choices_win_over_the_config(configs):
    _, _, val = open_clip.create_model_and_transforms("conlip-tiny-half", pretrained_text=False,
                                                      image_mean=(0.1, 0.2, 0.3), image_resize_mode="squash")
    assert describe(val) == {"resize": ((64, 64), "bicubic"), "mean": [0.1, 0.2, 0.3], "std": HALF["std"]}
    model = open_clip.create_model("conlip-tiny-half", pretrained_text=False, force_preprocess_cfg={"std": [1, 1, 1]})
    assert model.visual.preprocess_cfg["std"] == [1, 1, 1] and model.visual.preprocess_cfg["mean"] == HALF["mean"]


def test_force_image_size_sets_the_transform_size(configs):
    _, _, val = open_clip.create_model_and_transforms("conlip-tiny-half", pretrained_text=False, force_image_size=96)
    assert describe(val) == {"resize": (96, "bicubic"), "center_crop": (96, 96), **HALF}


def test_any_registered_config_and_its_conlip_wrap_use_the_base_section(configs):
    expected = {"resize": ((64, 64), "bilinear"), "mean": [0.2, 0.3, 0.4], "std": [0.6, 0.7, 0.8]}
    for name in ("pptest-base", "pptest-base+conlip-cl", "pptest-base+conlip"):
        _, _, val = open_clip.create_model_and_transforms(name, pretrained_text=False)
        assert describe(val) == expected, name


def test_paper_configs_carry_the_in21k_normalisation():
    for name in ("conlip-vit-b16-bert", "conlip-vit-b16-bert-cl", "conlip-vit-b16-bert-vanilla"):
        section = json.loads((CONFIG_DIR / f"{name}.json").read_text())["preprocess_cfg"]
        assert section["mean"] == section["std"] == [0.5, 0.5, 0.5], name


@pytest.mark.parametrize("section,message", [
    ({"mean": [0.5, 0.5]}, r"mean must be three numbers"),
    ({"std": [0.5, 0.0, 0.5]}, r"std must be positive"),
    ({"normalize": True}, r"unknown keys \['normalize'\]"),
    ({"resize_mode": "crop"}, r"resize_mode must be one of"),
    ({"size": 224}, r"size is 224 but vision_cfg.image_size is 64.*remove preprocess_cfg.size"),
    ([0.5, 0.5, 0.5], r"must be an object"),
])
def test_a_wrong_section_is_refused_with_the_fix(tmp_path, section, message):
    (tmp_path / "pptest-bad.json").write_text(json.dumps(_tiny_with(section)))
    open_clip.add_model_config(tmp_path)
    with pytest.raises(ValueError, match=message):
        open_clip.create_model("pptest-bad", pretrained_text=False)


@pytest.fixture
def restore_logging():
    """open_clip_train's main sets every logger's level and adds root handlers; undo that."""
    import logging

    root = logging.getLogger()
    handlers = list(root.handlers)
    levels = {name: logging.getLogger(name).level for name in ["", *logging.root.manager.loggerDict]}
    yield
    root.handlers[:] = handlers
    for name, level in levels.items():
        logging.getLogger(name).setLevel(level)


def test_training_cli_uses_the_config_unless_flags_say_otherwise(configs, caption_data, tmp_path, monkeypatch,
                                                                 restore_logging):
    """open_clip_train.main itself, up to the point where it builds its data from the transforms."""
    import open_clip_train.main as train_main

    seen = []

    class Built(Exception):
        pass

    def capture(args, transforms, **kwargs):
        seen.append(transforms)
        raise Built

    monkeypatch.setattr(train_main, "get_data", capture)
    monkeypatch.chdir(tmp_path)
    base = ["--model", "conlip-tiny-half", "--train-data", str(caption_data["csv"]), "--dataset-type", "csv",
            "--batch-size", "4", "--device", "cpu", "--precision", "fp32", "--workers", "0", "--logs", str(tmp_path)]
    runs = (("plain", []), ("flags", ["--image-mean", "0.1", "0.2", "0.3"]),
            ("paper", ["--aug-cfg", "use_timm=True", "scale=(1.0,1.0)", "ratio=(1.0,1.0)"]))
    for name, extra in runs:
        with pytest.raises(Built):
            train_main.main([*base, "--name", name, *extra])
    (train_plain, val_plain), (train_flags, _), (train_paper, _) = seen
    assert describe(train_plain) == {"random_crop": ((64, 64), (0.9, 1.0), "bicubic"), **HALF}
    assert describe(val_plain) == {"resize": (64, "bicubic"), "center_crop": (64, 64), **HALF}
    assert describe(train_flags)["mean"] == [0.1, 0.2, 0.3] and describe(train_flags)["std"] == HALF["std"]
    # The README's flags for the paper's training transform: the centred square, resized, every time.
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (90, 130, 3), dtype=np.uint8))
    centred = T.Compose([T.CenterCrop(90), T.Resize(64, interpolation=T.InterpolationMode.BICUBIC),
                         T.ToTensor(), T.Normalize(HALF["mean"], HALF["std"])])(image)
    assert all(torch.allclose(train_paper(image), centred, atol=1e-6) for _ in range(3))


def test_clip_benchmark_on_a_checkpoint_uses_the_config(configs, half_checkpoint):
    from clip_benchmark.models import load_clip

    _, transform, _ = load_clip(model_type="open_clip", model_name="conlip-tiny-half",
                                pretrained=str(half_checkpoint), cache_dir=None, device="cpu")
    assert describe(transform) == {"resize": (64, "bicubic"), "center_crop": (64, 64), **HALF}


def test_table2_tool_reads_images_with_the_config(configs, half_checkpoint, caption_data):
    from conlip_plugin.evaluation.attention import model_and_loader

    _, loader = model_and_loader("conlip-tiny-half", str(half_checkpoint), str(caption_data["csv"]), separator=",")
    assert describe(loader.dataset.transforms) == {"resize": (64, "bicubic"), "center_crop": (64, 64), **HALF}


@pytest.mark.slow
def test_export_records_the_preprocessing_for_a_process_without_the_plugin(configs, half_checkpoint, tmp_path, run):
    from conlip_plugin.export import export_inference_model

    out = export_inference_model("conlip-tiny-half", str(half_checkpoint), str(tmp_path / "export"))
    written = json.loads((out / "open_clip_config.json").read_text())
    assert written["preprocess_cfg"]["mean"] == HALF["mean"] and "preprocess_cfg" not in written["model_cfg"]
    probe = (
        "import json, open_clip\n"
        "from torchvision import transforms as T\n"
        "assert 'conlip-tiny' not in open_clip.list_models(), 'the plugin is active'\n"
        f"_, _, val = open_clip.create_model_and_transforms('local-dir:{out}')\n"
        "steps = {type(s).__name__: s for s in val.transforms}\n"
        "print(json.dumps({'mean': [float(v) for v in steps['Normalize'].mean],\n"
        "                  'std': [float(v) for v in steps['Normalize'].std],\n"
        "                  'resize': steps['Resize'].size, 'crop': list(steps['CenterCrop'].size)}))\n"
    )
    proc = run([PY, "-c", probe], tmp_path, env={"CONLIP_PLUGIN_DISABLE": "1"})
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == {**HALF, "resize": 64, "crop": [64, 64]}


@pytest.mark.slow
def test_stock_training_cli_trains_the_copy_without_normalisation_flags(configs, caption_data, tmp_path, run):
    from clip_benchmark.models import load_clip

    run([PY, "-m", "open_clip_train.main", "--model", "conlip-tiny-half", "--train-data", str(caption_data["csv"]),
         "--dataset-type", "csv", "--csv-separator", ",", "--csv-img-key", "filepath", "--csv-caption-key", "title",
         "--batch-size", "10", "--epochs", "1", "--lr", "5e-4", "--precision", "fp32", "--device", "cpu",
         "--workers", "1", "--name", "half"], tmp_path, env={"CONLIP_MODEL_CONFIGS": str(configs)})
    log = (tmp_path / "logs" / "half" / "out.log").read_text()
    final = next(line for line in log.splitlines() if "Final image preprocessing configuration set" in line)
    assert "'mean': [0.5, 0.5, 0.5], 'std': [0.5, 0.5, 0.5]" in final
    _, transform, _ = load_clip(model_type="open_clip", model_name="conlip-tiny-half", cache_dir=None, device="cpu",
                                pretrained=str(tmp_path / "logs" / "half" / "checkpoints" / "epoch_1.pt"))
    assert describe(transform) == {"resize": (64, "bicubic"), "center_crop": (64, 64), **HALF}
