"""Retrieval layouts and training shards (the ``conlip-prepare`` command; see its --help)."""
from conlip_plugin.data.prepare import main

if __name__ == "__main__":
    main()
