"""Paper Table 2 on your checkpoints (the ``conlip-attention`` command; see its --help)."""
from conlip_plugin.evaluation.attention import main

if __name__ == "__main__":
    main()
