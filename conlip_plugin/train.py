"""``python -m conlip_plugin.train``, the former path of ``conlip_plugin.integration.train`` (same arguments)."""
from conlip_plugin.integration.train import main

if __name__ == "__main__":
    main()
