"""Loading ``pretrained=`` weights starts a new run: ConLIP may start pieces fresh that do not fit.

Why: open_clip 3.3 loads a model's ``pretrained`` file (``--pretrained``, clip_benchmark's
``--pretrained``, the export) and a resumed run's state (``--resume``) through the same strict
``load_state_dict``, so ConLIP's load hook cannot tell "start from these weights" (where a CL
checkpoint may seed a ConLIP model whose heads start fresh) from "continue this run" (where other
settings are a mistake to refuse). What: wraps ``open_clip.factory.load_checkpoint``, which
``create_model`` calls for ``pretrained`` files only, in
``conlip_plugin.integration.checkpoint_loading.initialising_from_checkpoint``; loads elsewhere stay strict.
Other models' loads are unchanged. For: open_clip_torch 3.3.x.
"""
import functools


def apply() -> None:
    import open_clip.factory as factory

    from conlip_plugin.integration.checkpoint_loading import initialising_from_checkpoint

    original = factory.load_checkpoint
    if getattr(original, "_conlip_initialising", False):
        return

    @functools.wraps(original)
    def load_checkpoint(*args, **kwargs):
        with initialising_from_checkpoint():
            return original(*args, **kwargs)

    load_checkpoint._conlip_initialising = True
    factory.load_checkpoint = load_checkpoint
