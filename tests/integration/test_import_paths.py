"""Paths users may have used before the package was arranged by role keep working."""
import importlib
import runpy

import pytest


@pytest.mark.parametrize("old,new,name", [
    ("conlip_plugin.loss", "conlip_plugin.method.loss", "ConLIPLoss"),
    ("conlip_plugin.model", "conlip_plugin.method.model", "ConLIP"),
    ("conlip_plugin.config", "conlip_plugin.method.config", "ConLIPCfg"),
    ("conlip_plugin.export", "conlip_plugin.integration.export", "export_inference_model"),
])
def test_old_import_paths_give_the_same_objects(old, new, name):
    assert getattr(importlib.import_module(old), name) is getattr(importlib.import_module(new), name)


def test_the_package_root_re_exports_the_public_pieces():
    import conlip_plugin
    from conlip_plugin.method.loss import ConLIPLoss

    assert conlip_plugin.ConLIPLoss is ConLIPLoss
    assert callable(conlip_plugin.activate) and callable(conlip_plugin.export_inference_model)


@pytest.mark.filterwarnings("ignore:.*found in sys.modules:RuntimeWarning")  # imported by the test above
@pytest.mark.parametrize("module,words", [
    ("conlip_plugin.train", "--model"),
    ("conlip_plugin.export", "--checkpoint"),
    ("conlip_plugin.benchmark", "--rounds"),
    ("conlip_plugin.precision_check", "--steps"),
    ("conlip_plugin.retrieval.benchmark", "--sizes"),
])
def test_old_python_m_entry_points_run_their_command(module, words, capsys, monkeypatch):
    monkeypatch.setattr("sys.argv", [module, "--help"])
    with pytest.raises(SystemExit) as stop:
        runpy.run_module(module, run_name="__main__", alter_sys=True)
    assert stop.value.code == 0
    assert words in capsys.readouterr().out
