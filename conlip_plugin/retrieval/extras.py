"""The retrieval extra's packages (faiss, pyarrow, FastAPI, uvicorn, python-multipart) are optional:
training and evaluation do not need them. Each is imported where it is needed, and a missing one stops with
the install command instead of a traceback."""
import importlib
from types import ModuleType

from conlip_plugin.command_errors import fail

INSTALL = "pip install 'conlip-plugin[retrieval]'"
DISTRIBUTIONS = {"faiss": "faiss-cpu (or faiss-gpu)", "pyarrow": "pyarrow", "fastapi": "fastapi",
                 "uvicorn": "uvicorn", "python_multipart": "python-multipart"}


def require(module: str, needed_for: str, then: str = "") -> ModuleType:
    """``module`` imported, or a stop that names what needed it, the package and the install command;
    ``then`` adds what to do after installing."""
    try:
        return importlib.import_module(module)
    except ImportError:
        fail(f"{needed_for} needs {DISTRIBUTIONS[module]}, which is not installed: {INSTALL}{then}")
