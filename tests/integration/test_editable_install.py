"""``pip install -e .`` gives a working plugin: the start-up hook, the checkout's code and patches/."""
import json
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.slow


def test_editable_install_activates_the_plugin_from_the_checkout(tmp_path, run):
    """A fresh environment with only the editable install; the dependencies are borrowed from this
    environment through a path file read after the install's own (they sort first)."""
    env = tmp_path / "env"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(env)], check=True)
    python = env / "bin" / "python"
    site = Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                               check=True, capture_output=True, text=True).stdout.strip())
    (site / "zz-borrowed-dependencies.pth").write_text(sysconfig.get_path("purelib") + "\n")
    run([str(python), "-m", "pip", "install", "--no-deps", "--quiet", "--editable", str(ROOT)], tmp_path)
    probe = (
        "import json, sys\n"
        "assert 'torch' not in sys.modules\n"
        "import open_clip, conlip_plugin\n"
        "import conlip_plugin.patches.preprocess_cfg as patch\n"
        "model = open_clip.create_model('conlip-tiny', pretrained_text=False)\n"
        "print(json.dumps({'package': conlip_plugin.__file__, 'patch': patch.__file__,\n"
        "                  'class': type(model).__name__, 'listed': 'conlip-tiny' in open_clip.list_models()}))\n"
    )
    proc = run([str(python), "-c", probe], tmp_path)
    seen = json.loads(proc.stdout.strip().splitlines()[-1])
    assert seen == {"package": str(ROOT / "conlip_plugin" / "__init__.py"),
                    "patch": str(ROOT / "patches" / "preprocess_cfg.py"), "class": "ConLIP", "listed": True}
