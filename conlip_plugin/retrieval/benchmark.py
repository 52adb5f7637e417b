"""``python -m conlip_plugin.retrieval.benchmark``, the former path of ``conlip_plugin.benchmarks.retrieval``."""
from conlip_plugin.benchmarks.retrieval import main

if __name__ == "__main__":
    main()
