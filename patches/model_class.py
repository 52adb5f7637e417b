"""Build ConLIP from any model config that has a ``conlip_cfg`` section.

Why: open_clip 3.3's ``create_model`` has no model-class registry; it picks ``CLIP``,
``CustomTextCLIP`` or ``CoCa`` by looking those names up in ``open_clip.factory``'s globals and
passes every top-level JSON key to the constructor. What: replaces the ``CustomTextCLIP`` and
``CLIP`` globals of ``open_clip.factory`` with builders that return a ConLIP model when the
config carries ``conlip_cfg`` and the original class otherwise (``open_clip.CustomTextCLIP``
itself, and ``isinstance`` checks against it, are unchanged; ConLIP subclasses it).
For: open_clip_torch 3.3.x.
"""
import functools

from conlip_plugin.integration.patching import wrap


def _builder(base):
    @functools.wraps(base, updated=())
    def build(*args, conlip_cfg=None, **kwargs):
        if conlip_cfg is None:
            return base(*args, **kwargs)
        if base.__name__ != "CustomTextCLIP":
            raise ValueError(
                "ConLIP needs a Hugging Face BERT-like text tower (text_cfg.hf_model_name with "
                "hf_pooler_type 'cls_last_hidden_state_pooler'); this config builds open_clip's "
                f"{base.__name__} with its own text transformer."
            )
        from conlip_plugin.method.model import ConLIP

        return ConLIP(*args, conlip_cfg=conlip_cfg, **kwargs)

    return build


def apply() -> None:
    import open_clip.factory as factory

    for name in ("CustomTextCLIP", "CLIP"):
        wrap(factory, name, _builder, patch=__name__.rpartition(".")[2])
