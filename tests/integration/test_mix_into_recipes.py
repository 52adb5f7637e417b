"""ConLIP's pieces on other open_clip models: ``BASE+conlip[-cl|-mlm]`` through the real CLI."""
import json
import sys
from pathlib import Path

import open_clip
import pytest
import torch

from tiny_configs import hf_base, native_base
from train_logs import epoch_means

PY = sys.executable
HELPERS = Path(__file__).resolve().parents[1] / "helpers"


def _base_configs() -> dict:
    return {"mixtest-native": native_base(32), "mixtest-hf": hf_base(48)}


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    """The two base configs registered (here and, through CONLIP_MODEL_CONFIGS, in subprocesses),
    each with a plain open_clip checkpoint of random weights."""
    root = tmp_path_factory.mktemp("mix")
    (root / "configs").mkdir()
    out = {"root": root, "env": {"CONLIP_MODEL_CONFIGS": str(root / "configs")}}
    for name, cfg in _base_configs().items():
        (root / "configs" / f"{name}.json").write_text(json.dumps(cfg))
    open_clip.add_model_config(root / "configs")
    for name in _base_configs():
        torch.manual_seed(1)
        model = open_clip.create_model(name, pretrained_text=False)
        torch.save({"state_dict": model.state_dict()}, root / f"{name}.pt")
        out[name] = root / f"{name}.pt"
    return out


PIECES = [("conlip-cl", {"Dcl_loss"}),
          ("conlip-mlm", {"Dcl_loss", "Conmlm_loss"}),
          ("conlip", {"Dcl_loss", "Conmlm_loss", "Conmim_loss"})]


@pytest.fixture(scope="module")
def piece_runs(bases, caption_data, run, tmp_path_factory):
    """Every BASE+piece run of the test below, 3 epochs each, trained by open_clip_train.main from one
    interpreter start (tests/helpers/forked_trainings.py); per model, its folder and exit code."""
    root = tmp_path_factory.mktemp("pieces")
    folders = {f"{base}+{suffix}": root / f"{base}+{suffix}" for base in _base_configs() for suffix, _ in PIECES}
    runs = []
    for model, cwd in folders.items():
        cwd.mkdir()
        base = model.split("+")[0]
        runs.append({"cwd": str(cwd), "argv": [
            "--model", model, "--pretrained", str(bases[base]),
            "--train-data", str(caption_data["csv"]), "--dataset-type", "csv", "--csv-separator", ",",
            "--csv-img-key", "filepath", "--csv-caption-key", "title", "--batch-size", "10", "--epochs", "3",
            "--lr", "1e-3", "--warmup", "1", "--precision", "fp32", "--device", "cpu", "--workers", "1",
            "--seed", "0", "--log-every-n-steps", "1", "--name", "mix"]})
    (root / "runs.json").write_text(json.dumps(runs))
    run([PY, str(HELPERS / "forked_trainings.py"), str(root / "runs.json")], root, env=bases["env"])
    exits = json.loads((root / "runs.exits.json").read_text())
    return {model: (cwd, code) for (model, cwd), code in zip(folders.items(), exits)}


@pytest.mark.slow
@pytest.mark.parametrize("base", ["mixtest-native", "mixtest-hf"])
@pytest.mark.parametrize("suffix,terms", PIECES)
def test_each_piece_trains_through_the_cli_with_falling_losses(piece_runs, base, suffix, terms):
    model = f"{base}+{suffix}"
    tmp_path, code = piece_runs[model]
    assert code == 0, f"open_clip_train.main exited {code}:\n{(tmp_path / 'train.out').read_text()[-6000:]}"
    means = epoch_means((tmp_path / "logs" / "mix" / "out.log").read_text())
    assert set(means) == terms
    for term, per_epoch in means.items():
        assert per_epoch[2] < per_epoch[0], f"{model}: {term} did not fall: {per_epoch}"


@pytest.mark.parametrize("base", ["mixtest-native", "mixtest-hf"])
def test_wrapped_model_loads_plain_weights_and_embeds_like_the_base(bases, base):
    plain = open_clip.create_model(base, pretrained=str(bases[base])).eval()
    wrapped = open_clip.create_model(f"{base}+conlip", pretrained=str(bases[base])).eval()
    assert type(wrapped).__name__ == "ConLIP"
    tok = open_clip.get_tokenizer(f"{base}+conlip")
    images, texts = torch.randn(3, 3, 64, 64), tok(["a red square", "two blue bars", ""])
    with torch.no_grad():
        assert torch.allclose(wrapped.encode_image(images), plain.encode_image(images), atol=1e-6)
        assert torch.allclose(wrapped.encode_text(texts), plain.encode_text(texts), atol=1e-6)
    online, momentum = wrapped.state_dict(), wrapped.momentum_visual.state_dict()
    assert all(torch.equal(v, online[f"visual.{k}"]) for k, v in momentum.items())
    assert wrapped.logit_scale.item() == pytest.approx(torch.log(torch.tensor(20.0)).item())


def test_missing_piece_requirements_are_named_at_start():
    with pytest.raises(ValueError, match="ConMLM needs a patch-token ViT.*ModifiedResNet"):
        open_clip.create_model("RN50+conlip-mlm")
    with pytest.raises(ValueError, match="already a ConLIP config"):
        open_clip.create_model("conlip-tiny+conlip")
    assert type(open_clip.create_model("RN50+conlip-cl")).__name__ == "ConLIP"
