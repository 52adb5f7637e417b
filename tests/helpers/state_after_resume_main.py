"""Run open_clip_train.main unchanged, recording the training state right after its resume load.

``main()`` loads ``--resume`` into the model, the optimizer and the AMP scaler just before it
builds the data (``get_data``), so that is where the state is recorded: the model's, optimizer's
and scaler's ``state_dict`` and the file resumed from go to ``$STATE_AFTER_RESUME`` (default
``state_after_resume.pt``), then training goes on as usual.
"""
import os
import sys

import open_clip
import torch

captured = {}
_create = open_clip.create_model_and_transforms


def create_and_capture(*args, **kwargs):
    out = _create(*args, **kwargs)
    captured["model"] = out[0]
    return out


class RecordedAdamW(torch.optim.AdamW):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        captured["optimizer"] = self


class RecordedGradScaler(torch.amp.GradScaler):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        captured["scaler"] = self


open_clip.create_model_and_transforms = create_and_capture
torch.optim.AdamW = RecordedAdamW
torch.amp.GradScaler = RecordedGradScaler

import open_clip_train.main as train_main  # noqa: E402  (binds the wrappers above)

_get_data = train_main.get_data


def record_then_get_data(args, *rest, **kwargs):
    scaler = captured.get("scaler")
    torch.save({"resume": os.path.abspath(args.resume) if args.resume else None, "model": captured["model"].state_dict(),
                "optimizer": captured["optimizer"].state_dict(),
                "scaler": scaler.state_dict() if scaler is not None else None},
               os.environ.get("STATE_AFTER_RESUME", "state_after_resume.pt"))
    return _get_data(args, *rest, **kwargs)


train_main.get_data = record_then_get_data
sys.exit(train_main.main(sys.argv[1:]))
