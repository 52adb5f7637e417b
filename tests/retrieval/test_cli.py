"""The conlip-retrieval command on each kind of model: a ConLIP checkpoint, its exported folder, a
``BASE+conlip`` checkpoint and a plain open_clip model; a query model other than the index's is refused;
kill -9 mid-run resumes."""
import contextlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

import retrieval_models
import shapes_data
from conlip_plugin.retrieval import cli


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    data = shapes_data.write(root / "data")
    return {"root": root, "data": data, "kinds": retrieval_models.all_kinds(root / "models")}


def conlip_retrieval(capsys, *argv: str) -> str:
    cli.main([str(a) for a in argv])
    return capsys.readouterr().out


def model_args(model: str, pretrained: str) -> list:
    return ["--model", model] + (["--pretrained", pretrained] if pretrained else [])


KINDS = ["conlip checkpoint", "exported folder", "BASE+conlip checkpoint", "BASE+conmlm-conmim checkpoint",
         "plain open_clip"]


@pytest.fixture(scope="module")
def indexed(setup) -> dict:
    """kind -> (index folder, what ``index`` printed): the shapes shard indexed once per kind of model."""
    built = {}
    for kind in KINDS:
        model, pretrained = setup["kinds"][kind]
        out = setup["root"] / kind.replace(" ", "-")
        with contextlib.redirect_stdout(io.StringIO()) as printed:
            cli.main([str(a) for a in ("index", *model_args(model, pretrained), "--images", setup["data"]["shard"],
                                       "--out", out, "--workers", "0", "--no-progress")])
        built[kind] = (out, printed.getvalue())
    return built


@pytest.mark.parametrize("kind", KINDS)
def test_index_and_search_each_kind_of_model(setup, indexed, capsys, kind):
    out, printed = indexed[kind]
    assert "indexed 30 images (30 with captions)" in printed
    results = json.loads(conlip_retrieval(capsys, "search", "--index", out, "--text", "a red circle", "--k", "4",
                                          "--json"))
    assert [r["rank"] for r in results] == [1, 2, 3, 4]
    assert all(r["key"].startswith("shard-000000.tar/") and r["caption"].startswith("a ") for r in results)
    assert [r["score"] for r in results] == sorted((r["score"] for r in results), reverse=True)
    image = setup["data"]["root"] / "images" / "0007.png"
    by_image = json.loads(conlip_retrieval(capsys, "search", "--index", out, "--image", image, "--k", "3", "--json"))
    assert by_image[0]["key"] == "shard-000000.tar/000007" and by_image[0]["score"] == pytest.approx(1.0, abs=2e-3)
    caption = "a red circle on a white background"
    captions = json.loads(conlip_retrieval(capsys, "search", "--index", out, "--text", caption, "--against",
                                           "captions", "--k", "30", "--json"))
    own = next(r for r in captions if r["caption"] == caption)  # random towers: captions embed almost alike
    assert own["score"] == pytest.approx(1.0, abs=2e-3) and own["score"] >= captions[0]["score"] - 2e-3
    text = conlip_retrieval(capsys, "search", "--index", out, "--text", "a red circle", "--k", "2")
    assert text.splitlines()[0].split()[:2] == ["1", f"{results[0]['score']:.4f}"]


@pytest.mark.parametrize("kind", KINDS)
def test_serve_answers_for_each_kind_of_model(setup, indexed, kind):
    """The app ``serve`` runs, over each kind's index, with the encoder the CLI picks."""
    from fastapi.testclient import TestClient

    from conlip_plugin.retrieval.server import create_app
    from conlip_plugin.retrieval.store import Index

    index = Index(indexed[kind][0])
    client = TestClient(create_app(index, cli.query_encoder(index, None, None, "cpu"), 1 << 20))
    answer = client.get("/api/search", params={"text": "a blue bar", "k": 3})
    assert answer.status_code == 200, answer.text
    assert [r["rank"] for r in answer.json()["results"]] == [1, 2, 3]
    image = (setup["data"]["root"] / "images" / "0012.png").read_bytes()
    found = client.post("/api/search/image", files={"file": ("q.png", image, "image/png")}, data={"k": "1"})
    assert found.json()["results"][0]["key"] == "shard-000000.tar/000012"
    assert client.get(f"/api/items/{found.json()['results'][0]['row']}/image").content == image


def test_the_export_embeds_as_the_checkpoint_it_came_from(indexed):
    stored = {kind: np.load(indexed[kind][0] / "images.npy") for kind in ("conlip checkpoint", "exported folder")}
    np.testing.assert_allclose(stored["conlip checkpoint"].astype(np.float32),
                               stored["exported folder"].astype(np.float32), atol=2e-3)


def test_a_query_model_other_than_the_index_model_is_refused_with_both_names(setup, capsys):
    out = setup["root"] / "refusal"
    model, ckpt = setup["kinds"]["conlip checkpoint"]
    conlip_retrieval(capsys, "index", "--model", model, "--pretrained", ckpt, "--images", setup["data"]["csv"],
                     "--csv-separator", ",", "--out", out, "--workers", "0", "--no-progress")
    other = retrieval_models.conlip_checkpoint(setup["root"] / "other.pt", seed=1)
    for argv in (["--model", model, "--pretrained", other], ["--model", setup["kinds"]["plain open_clip"][0]],
                 ["--model", "conlip-tiny-vanilla", "--pretrained", ckpt],  # same file, another architecture
                 ["--pretrained", other]):  # weights alone: the index's architecture with them
        with pytest.raises(SystemExit) as stop:
            conlip_retrieval(capsys, "search", "--index", out, "--text", "x", *argv)
        message = str(stop.value)
        assert f"conlip-tiny ({ckpt}" in message and str(argv[1]).split(":")[-1] in message
    moved = setup["root"] / "moved.pt"
    shutil.copy(ckpt, moved)
    found = json.loads(conlip_retrieval(capsys, "search", "--index", out, "--text", "x", "--pretrained", moved,
                                        "--k", "1", "--json"))
    assert len(found) == 1
    with pytest.raises(SystemExit, match="--image .* cannot be read .*pass an image file"):
        conlip_retrieval(capsys, "search", "--index", out, "--image", setup["root"])


@pytest.mark.parametrize("flag, value, says", [("--target-recall", "1.5", "at most 1"), ("--chunk-size", "0", "at least 1"),
                                               ("--workers", "-1", "0 or more")])
def test_bad_flag_values_stop_at_parsing_naming_the_flag(capsys, flag, value, says):
    with pytest.raises(SystemExit):
        cli.main(["index", "--model", "m", "--images", "x", "--out", "y", flag, value])
    error = capsys.readouterr().err
    assert f"argument {flag}: must be" in error and says in error


@pytest.mark.parametrize("argv", [["index", "--model", "m", "--images", "x", "--out", "y"], ["search", "--index", "x"],
                                  ["serve", "--index", "x"]])
def test_a_device_that_is_not_there_stops_at_parsing(capsys, monkeypatch, argv):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for device, says in (("gpu", "'gpu' is not a torch device"), ("cuda:1", "cuda:1, but torch sees no CUDA device")):
        with pytest.raises(SystemExit):
            cli.main([*argv, "--device", device])
        assert f"argument --device: {says}" in capsys.readouterr().err


@pytest.mark.parametrize("port", ["70000", "-1"])
def test_serve_port_outside_the_tcp_range_stops_at_parsing(capsys, port):
    with pytest.raises(SystemExit):
        cli.main(["serve", "--index", "x", "--port", port])
    assert "argument --port: must be from 0 to 65535" in capsys.readouterr().err


def test_an_index_of_nothing_readable_names_every_failure(setup, capsys, tmp_path):
    (tmp_path / "bad.png").write_bytes(b"no")
    with pytest.raises(SystemExit, match="no image of .* could be read .*bad.png"):
        conlip_retrieval(capsys, "index", *model_args(*setup["kinds"]["plain open_clip"]), "--images", tmp_path,
                         "--out", tmp_path / "idx", "--workers", "0", "--no-progress")


@pytest.mark.slow
def test_kill_9_mid_run_resumes_to_the_uninterrupted_index(setup, run, tmp_path):
    """A real process killed after its first saved chunk; the rerun finishes with identical files."""
    model, ckpt = setup["kinds"]["conlip checkpoint"]
    folder = tmp_path / "gallery"
    folder.mkdir()
    for n in range(8):  # 240 images: 30 chunks of 8
        for i, (img, _) in enumerate(shapes_data.samples()):
            img.rotate(n * 40).save(folder / f"{n}-{i:02d}.png")
    cmd = [sys.executable, "-m", "conlip_plugin.retrieval.cli", "index", "--model", model, "--pretrained", ckpt,
           "--images", str(folder), "--workers", "0", "--chunk-size", "8", "--batch-size", "4", "--no-progress"]
    run(cmd + ["--out", str(tmp_path / "whole")], tmp_path)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen(cmd + ["--out", str(tmp_path / "cut")], cwd=tmp_path, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    parts = tmp_path / "cut" / "parts"
    deadline = time.time() + 120
    while time.time() < deadline and not (parts.is_dir() and len(list(parts.glob("*.npz"))) >= 3):
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    finished = len(list(parts.glob("*.npz")))
    assert 3 <= finished < 30, f"killed after {finished} of 30 chunks"
    resumed = run(cmd + ["--out", str(tmp_path / "cut")], tmp_path)
    assert f"resuming {tmp_path / 'cut'}: {finished} chunk(s) of 8 items were finished" in resumed.stderr
    for name in ("images.npy", "captions.npy", "items.arrow", "skipped.jsonl", "manifest.json"):
        whole, cut = (tmp_path / "whole" / name).read_bytes(), (tmp_path / "cut" / name).read_bytes()
        assert whole == cut, name


def test_the_demo_rebuilds_its_index_for_each_run(setup, monkeypatch, tmp_path, capsys):
    """A second demo run in the same --out has a new model: its index replaces the old one (resuming
    the old index with another model would be refused and stop the run)."""
    from conlip_plugin.evaluation import demo
    from conlip_plugin.retrieval.store import Index

    monkeypatch.setattr(demo, "read_pairs", lambda root: [(f"{n:04d}.png", f"shape {n}") for n in range(5)])
    for seed in (0, 1):
        ckpt = retrieval_models.conlip_checkpoint(tmp_path / f"run-{seed}.pt", seed=seed)
        index = demo.retrieval_index("conlip-tiny", ckpt, setup["data"]["root"] / "images", tmp_path)
        assert Index(index).identity.pretrained == str(ckpt.resolve())
        assert Index(index).manifest["counts"]["items"] == 5
