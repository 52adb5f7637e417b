"""``python -m conlip_plugin.precision_check``, the former path of ``conlip_plugin.benchmarks.precision`` (same arguments)."""
from conlip_plugin.benchmarks.precision import main

if __name__ == "__main__":
    main()
