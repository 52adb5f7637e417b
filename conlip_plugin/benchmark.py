"""``python -m conlip_plugin.benchmark``, the former path of ``conlip_plugin.benchmarks.training`` (same arguments)."""
from conlip_plugin.benchmarks.training import main

if __name__ == "__main__":
    main()
