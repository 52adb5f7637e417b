"""Cut the training captions of ConLIP models to each batch's longest (``conlip_cfg.trim_text_multiple``).

Why: open_clip's tokenizers pad every caption to the context length, and open_clip_train 3.3
has no variable-length text; every text pass of a ConLIP step (complete and masked captions,
the momentum tower, both heads) then pays for padding (``conlip_plugin.method.text_padding``).
What: wraps ``open_clip_train.data.get_data`` (which ``open_clip_train.main`` imports by name
after this patch is applied; a ``main`` already imported gets it too) so that, for a model whose
config has ``conlip_cfg``, the training DataLoader's collate function also cuts the texts of
each batch, in the loader workers, to the batch's longest caption rounded up to
``trim_text_multiple`` tokens. Validation data and other models are untouched; a config whose
text tower cannot take shorter captions without changing its results keeps them whole, and the
log says why. For: open_clip_torch 3.3.x.
"""
import functools
import logging
from typing import Callable, Optional

from conlip_plugin.integration.patching import for_each_main, wrap

PATCH = __name__.rpartition(".")[2]


def _pad_id(tokenizer) -> int:
    """The id the run's tokenizer pads with: a Hugging Face tokenizer's own, else 0 (CLIP's BPE)."""
    pad = getattr(getattr(tokenizer, "tokenizer", None), "pad_token_id", None)
    return 0 if pad is None else int(pad)


def trimming_multiple(model_name: str) -> Optional[int]:
    """The multiple this model's training captions are cut to, or None (not ConLIP, off, or inexact)."""
    import open_clip.factory as factory

    from conlip_plugin.method.config import ConLIPCfg
    from conlip_plugin.method.text_padding import inexact_reason

    model_cfg = factory.get_model_config(model_name)
    if not (isinstance(model_cfg, dict) and "conlip_cfg" in model_cfg):
        return None
    multiple = ConLIPCfg.from_dict(model_cfg["conlip_cfg"]).trim_text_multiple
    reason = inexact_reason(model_cfg) if multiple else None
    if reason:
        logging.info("ConLIP: training captions keep their full context length: %s", reason)
    return multiple if multiple and not reason else None


def _trimming(original: Callable) -> Callable:
    from conlip_plugin.integration.loaders import torch_data_loader
    from conlip_plugin.method.text_padding import TrimCaptions

    @functools.wraps(original)
    def get_data(args, preprocess_fns, epoch=0, tokenizer=None):
        out = original(args, preprocess_fns, epoch=epoch, tokenizer=tokenizer)
        multiple = trimming_multiple(args.model) if "train" in out else None
        if multiple:
            loader = torch_data_loader(out["train"].dataloader)
            loader.collate_fn = TrimCaptions(loader.collate_fn, _pad_id(tokenizer), multiple)
        return out

    return get_data


def _rebind(main) -> None:
    import open_clip_train.data as data

    wrap(data, "get_data", _trimming, patch=PATCH, also=(main,))


def apply() -> None:
    import open_clip_train.data as data

    wrap(data, "get_data", _trimming, patch=PATCH)
    for_each_main(PATCH, _rebind)
