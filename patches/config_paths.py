"""ConLIP configs as open_clip reads them: ``BASE+conlip`` names, and local paths.

Why: open_clip 3.3 reads ``text_cfg.hf_model_name`` as it stands (a hub id makes offline runs
fail) and cannot compose a config from another. What: wraps ``open_clip.factory.get_model_config``
(and its ``open_clip`` alias) so ``BASE+SUFFIX`` names (``conlip_plugin.integration.names``)
resolve to BASE's config plus ``conlip_cfg``, with ``${ENV}`` / ``pkg://`` placeholders resolved.
For: open_clip_torch 3.3.x.
"""
import functools

from conlip_plugin.integration.names import resolve_config_paths, wrapped_config
from conlip_plugin.integration.patching import wrap


def _resolving(original):
    @functools.wraps(original)
    def get_model_config(model_name):
        cfg = original(model_name)
        if cfg is None:
            cfg = wrapped_config(model_name, original)
        if isinstance(cfg, dict):
            cfg = resolve_config_paths(cfg, model_name)
        return cfg

    return get_model_config


def apply() -> None:
    import open_clip
    import open_clip.factory as factory

    wrap(factory, "get_model_config", _resolving, patch=__name__.rpartition(".")[2], also=(open_clip,))
