"""Every patch changes open_clip once, through ``conlip_plugin.integration.patching``, and can be undone."""
import re
import subprocess
import sys
import types
from importlib import import_module
from pathlib import Path

import pytest
import torch

import conlip_plugin
from conlip_plugin.integration import activation, patching

ROOT = Path(__file__).resolve().parents[2]
PATCH_FILES = sorted(p.name for p in (ROOT / "patches").glob("*.py"))
ALL_PATCHES = activation.OPEN_CLIP_PATCHES + activation.TRAIN_PATCHES


@pytest.fixture
def main_module():
    conlip_plugin.activate()
    import open_clip_train.main as main

    patching.patch_mains()
    return main


@pytest.fixture
def restored():
    """Leave the process activated as it was, whatever the test undid."""
    yield
    activation.deactivate()
    conlip_plugin.activate()
    patching.patch_mains()


def _bound(records):
    return {(id(r.owner), r.attribute, r.patch): getattr(r.owner, r.attribute) for r in records}


def test_every_patch_file_is_applied_by_activation():
    assert sorted(f"{name}.py" for name in ALL_PATCHES) == PATCH_FILES


def test_applying_every_patch_twice_changes_nothing(main_module):
    before = patching.applied()
    bound = _bound(before)
    for name in ALL_PATCHES:
        import_module(f"conlip_plugin.patches.{name}").apply()
    after = patching.applied()
    assert after == before
    keys = [(id(r.owner), r.attribute, r.patch) for r in after]
    assert len(keys) == len(set(keys))
    assert all(bound[k] is v for k, v in _bound(after).items())


def test_unapply_restores_every_original_and_reapply_works(main_module, restored):
    records = patching.applied()
    assert records
    activation.deactivate()
    for record in reversed(records):
        if any(r.owner is record.owner and r.attribute == record.attribute and r is not record
               and records.index(r) < records.index(record) for r in records):
            continue  # the later link of a chain: its original is the earlier link
        assert getattr(record.owner, record.attribute) is record.original, record.target
    assert patching.applied() == []
    conlip_plugin.activate()
    patching.patch_mains()
    assert sorted((r.patch, r.target) for r in patching.applied()) == sorted((r.patch, r.target) for r in records)


@pytest.mark.parametrize("target", sorted(activation.CHAINS))
def test_chains_are_in_the_declared_order(main_module, target):
    module_name, _, attribute = target.rpartition(".")
    owner = main_module if module_name == "main" else sys.modules[module_name]
    assert tuple(patching.chain(owner, attribute)) == activation.CHAINS[target]


def test_the_ddp_fix_is_only_in_open_clip_train_main(main_module):
    from conlip_plugin.patches.ddp_on_cpu import CpuTolerantDDP
    from torch.nn.parallel import DistributedDataParallel

    assert torch.nn.parallel.DistributedDataParallel is DistributedDataParallel
    assert main_module.torch.nn.parallel.DistributedDataParallel is CpuTolerantDDP
    assert main_module.torch.nn.parallel.DistributedDataParallel is not torch.nn.parallel.DistributedDataParallel


def test_an_overlay_delegates_everything_it_does_not_replace():
    module = types.ModuleType("real")
    module.sub = types.ModuleType("real.sub")
    module.sub.kept, module.sub.swapped, module.value = 1, 2, 3
    view = patching.overlay(module, {"sub.swapped": "new"})
    assert view.sub.swapped == "new" and module.sub.swapped == 2
    assert view.sub.kept == 1 and view.value == 3
    module.value = 4
    assert view.value == 4  # looked up at each use


def test_wrap_is_keyed_on_owner_attribute_and_patch():
    owner, alias = types.SimpleNamespace(f=len), types.SimpleNamespace(f=len)
    try:
        first = patching.wrap(owner, "f", lambda f: lambda x: f(x) + 1, patch="t1", also=(alias,))
        again = patching.wrap(owner, "f", lambda f: lambda x: 0, patch="t1", also=(alias,))
        assert first is again is owner.f is alias.f and owner.f("ab") == 3
        patching.wrap(owner, "f", lambda f: lambda x: f(x) * 10, patch="t2", also=(alias,))
        assert owner.f("ab") == alias.f("ab") == 30 and patching.chain(owner, "f") == ["t1", "t2"]
    finally:
        patching.unapply(["t1", "t2"])
    assert owner.f is len and alias.f is len


def test_a_webdataset_without_the_decode_stage_is_refused(monkeypatch):
    import webdataset
    import webdataset.filters as filters

    monkeypatch.delattr(filters, "_decode")
    with pytest.raises(activation.UnsupportedWebdataset) as err:
        activation.check_webdataset()
    message = str(err.value)
    assert getattr(webdataset, "__version__", "unknown") in message
    assert activation.TESTED_WEBDATASET in message and "pip install" in message


def test_docs_table_lists_exactly_the_patch_files():
    text = (ROOT / "docs" / "patches.md").read_text()
    rows = re.findall(r"^\| `([^`]+\.py)` \| .+ \|$", text, flags=re.M)
    assert sorted(rows) == PATCH_FILES and len(rows) == len(set(rows))


@pytest.mark.slow
def test_python_m_conlip_plugin_patches_lists_every_patch():
    out = subprocess.run([sys.executable, "-m", "conlip_plugin", "patches"], capture_output=True, text=True,
                         check=True, cwd=ROOT).stdout
    listed = {line.split(":", 1)[0] for line in out.splitlines()}
    assert {name[:-3] for name in PATCH_FILES} <= listed


@pytest.mark.slow
def test_a_plain_import_of_open_clip_train_main_gets_the_patched_names():
    """The start-up hook patches ``open_clip_train.main`` when it is imported, not only under ``python -m``."""
    code = ("import torch, open_clip_train.main as main\n"
            "print(main.torch.nn.parallel.DistributedDataParallel.__name__,"
            " torch.nn.parallel.DistributedDataParallel.__name__)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT).stdout
    assert out.split() == ["CpuTolerantDDP", "DistributedDataParallel"]


def test_a_chain_out_of_its_declared_order_is_refused_naming_the_fix(main_module, monkeypatch):
    target = "open_clip.factory.get_model_config"
    monkeypatch.setitem(activation.CHAINS, target, tuple(reversed(activation.CHAINS[target])))
    with pytest.raises(RuntimeError, match=r"get_model_config is wrapped by .* Make the lists and CHAINS agree"):
        activation.check_chains()
