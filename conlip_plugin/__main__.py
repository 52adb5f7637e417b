"""``python -m conlip_plugin patches``: activate the plugin and list what it changes in open_clip."""
import argparse
from typing import List, Optional


def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m conlip_plugin", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("patches", help="activate the plugin and print each applied patch and what it wraps")
    parser.parse_args(argv)

    from conlip_plugin.integration.activation import activate
    from conlip_plugin.integration.patching import describe

    activate()
    for line in describe():
        print(line)


if __name__ == "__main__":
    main()
