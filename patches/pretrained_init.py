"""Loading ``pretrained=`` weights starts a new run: ConLIP may start pieces fresh that do not fit.

Why: open_clip 3.3 loads ``--pretrained`` files and ``--resume`` state through the same strict
``load_state_dict``, so ConLIP's load hook cannot tell "start from these weights" from "continue
this run". What: wraps ``open_clip.factory.load_checkpoint`` (which ``create_model`` calls for
``pretrained`` files only) in ``conlip_plugin.integration.checkpoint_loading.initialising_from_checkpoint``;
loads elsewhere stay strict. For: open_clip_torch 3.3.x.
"""
import functools

from conlip_plugin.integration.patching import wrap


def _initialising(original):
    from conlip_plugin.integration.checkpoint_loading import initialising_from_checkpoint

    @functools.wraps(original)
    def load_checkpoint(*args, **kwargs):
        with initialising_from_checkpoint():
            return original(*args, **kwargs)

    return load_checkpoint


def apply() -> None:
    import open_clip.factory as factory

    wrap(factory, "load_checkpoint", _initialising, patch=__name__.rpartition(".")[2])
