"""``conlip-train`` (``python -m conlip_plugin.train ARGS``): ``open_clip_train.main`` with the plugin activated.

For environments that run with ``CONLIP_PLUGIN_DISABLE=1`` or without the start-up hook; the
arguments are those of ``python -m open_clip_train.main``.
"""
import sys
from typing import List, Optional

from conlip_plugin.integration.activation import activate


def main(argv: Optional[List[str]] = None) -> None:
    activate()
    from open_clip_train.main import main as train_main

    train_main(sys.argv[1:] if argv is None else argv)


if __name__ == "__main__":
    main()
