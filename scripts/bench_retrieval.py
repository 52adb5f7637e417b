"""Embedding throughput and search cost of conlip-retrieval (the ``conlip-retrieval-bench`` command; see its --help)."""
from conlip_plugin.benchmarks.retrieval import main

if __name__ == "__main__":
    main()
