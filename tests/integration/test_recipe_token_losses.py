"""A recipe's own instance loss (open_clip's ClipLoss / SigLipLoss) plus ConLIP's token losses:
``BASE+conmlm``, ``+conmim``, ``+conmlm-conmim`` and ``+mlm-mim``."""
import json
import math
import sys
from pathlib import Path

import open_clip
import pytest
import torch
import torch.nn.functional as F
from open_clip.loss import ClipLoss, SigLipLoss

import conlip_plugin
from conlip_plugin import ConLIPCfg
from conlip_plugin.method.loss import RecipeWithTokenLosses
from conlip_plugin.method.masking import IGNORE_INDEX
import gloo_recipe_worker
from gloo_recipe_worker import loss_args
from train_logs import epoch_means
from model_state import assert_bitwise_equal
from tiny_configs import hf_base, native_base

PY = sys.executable
HELPERS = Path(__file__).resolve().parents[1] / "helpers"
BASES = {"recipetest-native": native_base(32), "recipetest-hf": hf_base(48)}
# A full JSON config: the switch behind the BASE+conmlm-conmim name, with token-loss weights.
WEIGHTED = {**hf_base(48), "conlip_cfg": {"variant": "conlip", "instance_loss": "recipe", "mlm_weight": 0.5,
                                          "mim_weight": 2.0}}
# As open_clip's SigLIP configs: the bias a --siglip checkpoint holds needs the config to build one.
SIGLIP = {**hf_base(48), "init_logit_bias": -10.0}
MOMENTUM_NAMES = ("momentum_", "image_queue", "text_queue")


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    """The two base configs registered here and (CONLIP_MODEL_CONFIGS) in subprocesses, each with a
    plain open_clip checkpoint of random weights."""
    conlip_plugin.activate()
    root = tmp_path_factory.mktemp("recipe")
    (root / "configs").mkdir()
    for name, cfg in {**BASES, "recipetest-weighted": WEIGHTED, "recipetest-siglip": SIGLIP}.items():
        (root / "configs" / f"{name}.json").write_text(json.dumps(cfg))
    open_clip.add_model_config(root / "configs")
    out = {"root": root, "env": {"CONLIP_MODEL_CONFIGS": str(root / "configs")}}
    for name in BASES:
        torch.manual_seed(1)
        plain = open_clip.create_model(name, pretrained_text=False)
        with torch.no_grad():
            plain.logit_scale.fill_(math.log(33.0))
        torch.save({"state_dict": plain.state_dict()}, root / f"{name}.pt")
        out[name] = root / f"{name}.pt"
    return out


def _clip_loss64(image, text, scale):
    """open_clip's CLIP loss, written out: mean of the two cross-entropies over the batch."""
    n = image.shape[0]
    total = 0.0
    for i in range(n):
        row = [scale * (image[i] @ text[j]) for j in range(n)]
        col = [scale * (text[i] @ image[j]) for j in range(n)]
        total = total + (torch.logsumexp(torch.stack(row), 0) - row[i]) + (torch.logsumexp(torch.stack(col), 0) - col[i])
    return total / (2 * n)


def _siglip_loss64(image, text, scale, bias):
    """SigLIP's sigmoid loss, written out: every pair, +1 on the diagonal, -1 elsewhere, summed / n."""
    n = image.shape[0]
    total = 0.0
    for i in range(n):
        for j in range(n):
            label = 1.0 if i == j else -1.0
            total = total - F.logsigmoid(label * (scale * (image[i] @ text[j]) + bias))
    return total / n


def _token_losses64(out, weights):
    """Weighted masked-token cross-entropy and masked-pixel L1, with explicit loops, in float64."""
    logits, labels = out["mlm_logits"].double(), out["mlm_labels"]
    picked = [i for i in range(labels.shape[0]) if labels[i] != IGNORE_INDEX]
    mlm = sum(torch.logsumexp(logits[i], 0) - logits[i, labels[i]] for i in picked) / len(picked)
    pred, target = out["mim_predictions"].double(), out["mim_targets"].double()
    mim = sum((pred[r] - target[r]).abs().sum() for r in range(pred.shape[0])) / pred.numel()
    return weights[0] * mlm, weights[1] * mim


@pytest.mark.parametrize("siglip", [False, True])
def test_instance_term_is_open_clips_own_loss_and_the_token_terms_are_weighted(bases, siglip):
    """Value and gradients of every term against float64 loops; the loss object is open_clip's own."""
    name = "recipetest-weighted"
    loss = open_clip.create_loss(loss_args(name, siglip=siglip))
    assert isinstance(loss, RecipeWithTokenLosses)
    assert type(loss.recipe) is (SigLipLoss if siglip else ClipLoss)
    torch.manual_seed(0)
    kwargs = {"init_logit_scale": math.log(10), "init_logit_bias": -10.0} if siglip else {}
    model = open_clip.create_model(name, pretrained_text=False, **kwargs).train()
    tok = open_clip.get_tokenizer(name)
    out = model(torch.randn(4, 3, 64, 64), tok(["a red square", "two blue bars", "a green circle on top", "x"]))
    assert ("logit_bias" in out) == siglip and not any(k.startswith(("image_m", "text_m", "image_q")) for k in out)
    for value in out.values():
        if value.requires_grad:
            value.retain_grad()
    losses = loss(**out, output_dict=True)
    assert set(losses) == {"contrastive_loss", "conmlm_loss", "conmim_loss"}
    sum(losses.values()).backward()

    leaves = {k: out[k].detach().double().requires_grad_() for k in out if out[k].requires_grad}
    if siglip:
        want = _siglip_loss64(leaves["image_features"], leaves["text_features"], leaves["logit_scale"],
                              leaves["logit_bias"])
    else:
        want = _clip_loss64(leaves["image_features"], leaves["text_features"], leaves["logit_scale"])
    mlm, mim = _token_losses64({**out, **leaves, "mim_targets": out["mim_targets"]}, (0.5, 2.0))
    assert losses["contrastive_loss"].item() == pytest.approx(want.item(), rel=1e-5)
    assert losses["conmlm_loss"].item() == pytest.approx(mlm.item(), rel=1e-5)
    assert losses["conmim_loss"].item() == pytest.approx(mim.item(), rel=1e-5)
    (want + mlm + mim).backward()
    for key, leaf in leaves.items():
        assert torch.allclose(out[key].grad.double(), leaf.grad, rtol=1e-4, atol=1e-7), key


def test_recipe_models_learn_the_scale_and_have_no_momentum_pieces(bases):
    """logit_scale (and SigLIP's bias) are trained; no momentum tower, queue or step hook exists."""
    for suffix in ("conmlm", "conmim", "conmlm-conmim", "mlm-mim"):
        model = open_clip.create_model(f"recipetest-native+{suffix}", pretrained_text=False, init_logit_bias=-10.0)
        names = [n for n, _ in list(model.named_parameters()) + list(model.named_buffers())]
        assert not [n for n in names if n.startswith(MOMENTUM_NAMES)], suffix
        assert model.logit_scale.requires_grad and model.logit_bias.requires_grad
        assert model.logit_scale.item() == pytest.approx(math.log(1 / 0.07))
        assert model._ddp_params_and_buffers_to_ignore == []
    cfg = open_clip.get_model_config("recipetest-native+mlm-mim")["conlip_cfg"]
    assert cfg == {"variant": "vanilla", "instance_loss": "recipe"}
    with pytest.raises(ValueError, match="adds nothing to the base model"):
        ConLIPCfg(variant="cl", instance_loss="recipe").validate()
    with pytest.raises(ValueError, match="mlm_weight must be a finite number >= 0"):
        ConLIPCfg(mlm_weight=-1.0).validate()
    with pytest.raises(ValueError, match="instance_loss 'recipe'"):
        open_clip.create_model("conlip-tiny", pretrained_text=False, init_logit_bias=-10.0)


@pytest.mark.parametrize("base", list(BASES))
def test_plain_checkpoint_loads_with_its_scale_and_embeds_as_the_base(bases, base):
    """Towers and the learned logit_scale load; heads start fresh; eval embeddings are the base's."""
    plain = open_clip.create_model(base, pretrained=str(bases[base])).eval()
    mixed = open_clip.create_model(f"{base}+conmlm-conmim", pretrained=str(bases[base])).eval()
    assert mixed.logit_scale.item() == pytest.approx(math.log(33.0))
    tok = open_clip.get_tokenizer(base)
    images, texts = torch.randn(3, 3, 64, 64), tok(["a red square", "two blue bars", ""])
    with torch.no_grad():
        assert torch.equal(mixed.encode_image(images), plain.encode_image(images))
        assert torch.equal(mixed.encode_text(texts), plain.encode_text(texts))
        out, ref = mixed(images, texts), plain(images, texts)
    assert len(out) == len(ref) and all(torch.equal(a, b) for a, b in zip(out, ref))


def test_export_of_a_siglip_mix_loads_in_plain_open_clip_with_the_same_embeddings(bases, tmp_path):
    """The exported folder keeps logit_scale and logit_bias; the heads are dropped."""
    from conlip_plugin.export import export_inference_model

    name = "recipetest-siglip+conmlm-conmim"
    torch.manual_seed(2)
    model = open_clip.create_model(name, pretrained_text=False)
    with torch.no_grad():
        model.logit_bias.fill_(-7.5)
    ckpt = tmp_path / "mix.pt"
    torch.save({"epoch": 1, "state_dict": model.state_dict()}, ckpt)
    folder = export_inference_model(name, str(ckpt), str(tmp_path / "exported"))
    plain = open_clip.create_model(f"local-dir:{folder}").eval()
    assert type(plain).__name__ == "CustomTextCLIP" and plain.logit_bias.item() == -7.5
    model.eval()
    tok = open_clip.get_tokenizer(name)
    images, texts = torch.randn(2, 3, 64, 64), tok(["a red square", "two blue bars"])
    with torch.no_grad():
        assert torch.equal(plain.encode_image(images), model.encode_image(images))
        assert torch.equal(plain.encode_text(texts), model.encode_text(texts))


def test_accumulation_reruns_take_the_first_runs_masks(bases):
    """--accum-freq: the gradient re-run of a micro-batch reuses the masks its no-grad run drew."""
    model = open_clip.create_model("recipetest-hf+conmlm-conmim", pretrained_text=False).train()
    tok = open_clip.get_tokenizer("recipetest-hf")
    batches = [(torch.randn(4, 3, 64, 64), tok([f"caption number {i} of {j}" for i in range(4)])) for j in range(2)]
    with torch.no_grad():
        first = [model(*b) for b in batches]
    second = [model(*b) for b in batches]
    for a, b in zip(first, second):
        assert torch.equal(a["mlm_labels"], b["mlm_labels"]) and torch.equal(a["mim_targets"], b["mim_targets"])
    assert not model._drawn_masks
    third = model(*batches[0])  # an ordinary step draws anew
    assert not torch.equal(third["mim_targets"], second[0]["mim_targets"])


@pytest.mark.slow
def test_two_gloo_processes_with_local_loss_match_one_process_on_the_global_batch(bases):
    """--local-loss --gather-with-grad on 2 ranks: the mean loss and the (rank-averaged) gradients of
    each rank's features equal 1 process's CLIP loss on the global batch."""
    import socket

    import torch.multiprocessing as mp

    torch.manual_seed(3)
    image, text = F.normalize(torch.randn(8, 16), dim=-1), F.normalize(torch.randn(8, 16), dim=-1)
    scale = torch.tensor(7.0)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=gloo_recipe_worker.run, args=(r, 2, port, bases["env"]["CONLIP_MODEL_CONFIGS"],
                                                              (image, text, scale), queue)) for r in range(2)]
    for p in procs:
        p.start()
    got = sorted((queue.get(timeout=120) for _ in procs), key=lambda r: r[0])
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    leaves = [t.double().requires_grad_() for t in (image, text, scale)]
    want = _clip_loss64(*leaves)
    want.backward()
    assert sum(v for _, v, _, _ in got) / 2 == pytest.approx(want.item(), rel=1e-5)
    for rank, _, image_grad, text_grad in got:
        rows = slice(rank * 4, rank * 4 + 4)
        assert torch.allclose(torch.tensor(image_grad).double() / 2, leaves[0].grad[rows], atol=1e-6)
        assert torch.allclose(torch.tensor(text_grad).double() / 2, leaves[1].grad[rows], atol=1e-6)


def _train_argv(bases, caption_data, model, base, epochs, *extra):
    return ["--model", model, "--pretrained", str(bases[base]),
            "--train-data", str(caption_data["csv"]), "--dataset-type", "csv", "--csv-separator", ",",
            "--csv-img-key", "filepath", "--csv-caption-key", "title", "--batch-size", "10",
            "--epochs", str(epochs), "--lr", "1e-3", "--warmup", "1", "--precision", "fp32",
            "--device", "cpu", "--workers", "1", "--seed", "0", "--log-every-n-steps", "1",
            "--name", "recipe", *extra]


def _train(run, bases, caption_data, workdir, model, base, epochs, *extra, main="open_clip_train.main", env=None):
    cmd = [PY, "-m", main] if main == "open_clip_train.main" else [PY, main]
    return run(cmd + _train_argv(bases, caption_data, model, base, epochs, *extra), workdir,
               env={**bases["env"], **(env or {})})


MIXES = [("conmlm", (), {"Contrastive_loss", "Conmlm_loss"}),
         ("conmim", (), {"Contrastive_loss", "Conmim_loss"}),
         ("conmlm-conmim", (), {"Contrastive_loss", "Conmlm_loss", "Conmim_loss"}),
         ("conmlm-conmim", ("--siglip",), {"Contrastive_loss", "Conmlm_loss", "Conmim_loss"})]


def _mix_flags(flags):
    lr = ("--lr", "5e-4") if "--siglip" in flags else ()  # at 1e-3 SigLIP's loss spikes on the BERT base
    return (*flags, *lr)


@pytest.fixture(scope="module")
def mix_runs(bases, caption_data, run, tmp_path_factory):
    """Every (base, mix) run of the test below, 3 epochs each, trained by open_clip_train.main from one
    interpreter start (tests/helpers/forked_trainings.py); per case, its folder and exit code."""
    root = tmp_path_factory.mktemp("mixes")
    cases = {(base, suffix, flags): root / f"{base}+{suffix}{''.join(flags)}" for base in BASES
             for suffix, flags, _ in MIXES}
    runs = []
    for (base, suffix, flags), cwd in cases.items():
        cwd.mkdir()
        runs.append({"cwd": str(cwd), "argv": _train_argv(bases, caption_data, f"{base}+{suffix}", base, 3,
                                                          *_mix_flags(flags))})
    (root / "runs.json").write_text(json.dumps(runs))
    run([PY, str(HELPERS / "forked_trainings.py"), str(root / "runs.json")],
        root, env=bases["env"])
    exits = json.loads((root / "runs.exits.json").read_text())
    return {case: (cwd, code) for (case, cwd), code in zip(cases.items(), exits)}


@pytest.mark.slow
@pytest.mark.parametrize("base", list(BASES))
@pytest.mark.parametrize("suffix,flags,terms", MIXES)
def test_each_mix_trains_through_the_cli_with_falling_terms(mix_runs, base, suffix, flags, terms):
    tmp_path, code = mix_runs[(base, suffix, flags)]
    assert code == 0, f"open_clip_train.main exited {code}:\n{(tmp_path / 'train.out').read_text()[-6000:]}"
    means = epoch_means((tmp_path / "logs" / "recipe" / "out.log").read_text())
    assert set(means) == terms
    for term, per_epoch in means.items():
        assert per_epoch[2] < per_epoch[0], f"{base}+{suffix} {flags}: {term} did not fall: {per_epoch}"
    state = torch.load(tmp_path / "logs" / "recipe" / "checkpoints" / "epoch_3.pt", weights_only=True)["state_dict"]
    assert not [k for k in state if k.startswith(MOMENTUM_NAMES)]
    assert ("logit_bias" in state) == bool(flags)
    assert state["logit_scale"].item() != pytest.approx(math.log(33.0), abs=1e-6)  # learned, from the checkpoint's


@pytest.mark.slow
def test_resume_restores_the_mixed_run_bit_for_bit_and_accumulation_trains(bases, caption_data, run, tmp_path):
    """--resume latest restores towers, heads, logit_scale and optimizer exactly; --accum-freq 2 runs."""
    model, base = "recipetest-hf+conmlm-conmim", "recipetest-hf"
    _train(run, bases, caption_data, tmp_path, model, base, 1)
    main = str(HELPERS / "state_after_resume_main.py")
    _train(run, bases, caption_data, tmp_path, model, base, 2, "--resume", "latest", main=main,
           env={"STATE_AFTER_RESUME": str(tmp_path / "after.pt")})
    saved = torch.load(tmp_path / "logs" / "recipe" / "checkpoints" / "epoch_1.pt", weights_only=True)
    after = torch.load(tmp_path / "after.pt", weights_only=True)
    assert after["resume"].endswith("epoch_1.pt")
    assert after["model"].keys() == saved["state_dict"].keys()
    assert_bitwise_equal(after["model"], saved["state_dict"], "model")
    assert saved["optimizer"]["state"]
    assert_bitwise_equal(after["optimizer"], saved["optimizer"], "optimizer")
    accum = tmp_path / "accum"
    accum.mkdir()
    _train(run, bases, caption_data, accum, model, base, 2, "--accum-freq", "2")
    means = epoch_means((accum / "logs" / "recipe" / "out.log").read_text())
    assert set(means) == {"Contrastive_loss", "Conmlm_loss", "Conmim_loss"}


@pytest.mark.slow
def test_distillation_composes_with_the_token_losses(bases, caption_data, run, tmp_path):
    """--distill: open_clip's DistillClipLoss gets the teacher's features; the token terms join it."""
    base = "recipetest-hf"
    _train(run, bases, caption_data, tmp_path, f"{base}+conmlm-conmim", base, 1, "--distill-model", base,
           "--distill-pretrained", str(bases[base]))
    means = epoch_means((tmp_path / "logs" / "recipe" / "out.log").read_text())
    assert set(means) == {"Contrastive_loss", "Distill_loss", "Conmlm_loss", "Conmim_loss"}
