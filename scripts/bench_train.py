"""Training-step throughput of ConLIP against CLIP (the ``conlip-bench`` command; see its --help)."""
from conlip_plugin.benchmarks.training import main

if __name__ == "__main__":
    main()
