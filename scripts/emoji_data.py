"""Real image-caption pairs from emoji (the ``conlip-emoji`` command; see its --help)."""
from conlip_plugin.data.emoji import main

if __name__ == "__main__":
    main()
