"""``python -m conlip_plugin.export``, the former path of ``conlip_plugin.integration.export`` (same arguments)."""
from conlip_plugin.integration.export import export_inference_model, main  # noqa: F401

if __name__ == "__main__":
    main()
