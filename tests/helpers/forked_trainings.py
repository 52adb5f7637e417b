"""Several ``open_clip_train.main`` runs from one interpreter start:

    python forked_trainings.py RUNS.json

RUNS.json lists ``{"cwd": ..., "argv": [...]}``; each run gets a process forked from this one after
it has imported open_clip_train (with the plugin's start-up hook, as ``python -m`` would), so every run
starts from the same untouched state while the imports, which take longer than a tiny training, are
paid once. Each run's output goes to ``cwd/train.out``; the exit codes are written to RUNS.json's
``exits`` beside it (``RUNS.exits.json``), and this script exits 0 whatever they are, so that each
test judges its own run.
"""
import json
import logging
import os
import sys
import traceback
from pathlib import Path

import open_clip_train.main  # noqa: F401  (imported once, before the forks)


def child(cwd: str, argv: list) -> int:
    """The body of one forked run: ``python -m open_clip_train.main ARGV`` in ``cwd``; its exit code."""
    os.chdir(cwd)
    fd = os.open("train.out", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    try:
        open_clip_train.main.main(argv)
        return 0
    except SystemExit as stop:
        if stop.code is None or isinstance(stop.code, int):
            return stop.code or 0
        print(stop.code, file=sys.stderr)
        return 1
    except BaseException:
        traceback.print_exc()
        return 1
    finally:
        logging.shutdown()  # what the interpreter's exit would do; os._exit skips it
        sys.stdout.flush()
        sys.stderr.flush()


def main(spec: Path) -> None:
    exits = []
    for run in json.loads(spec.read_text()):
        pid = os.fork()
        if pid == 0:
            os._exit(child(run["cwd"], run["argv"]))
        exits.append(os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]))
    spec.with_suffix(".exits.json").write_text(json.dumps(exits))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
