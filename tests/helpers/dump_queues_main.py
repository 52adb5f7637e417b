"""Run open_clip_train.main unchanged, then save this rank's queues and momentum encoders (for the
torchrun tests)."""
import os
import sys

import open_clip
import torch

captured = []
_create = open_clip.create_model_and_transforms


def create_and_capture(*args, **kwargs):
    out = _create(*args, **kwargs)
    captured.append(out[0])
    return out


open_clip.create_model_and_transforms = create_and_capture

from open_clip_train.main import main  # noqa: E402  (binds the wrapper above)

main(sys.argv[1:])
model = captured[0]
rank = int(os.environ.get("RANK", "0"))
momentum = {f"momentum_{name}": {k: v for k, v in getattr(model, f"momentum_{name}").state_dict().items()}
            for name in ("visual", "text")}
torch.save({"image": model.image_queue.features, "text": model.text_queue.features,
            "ptr": model.image_queue.ptr, **momentum}, f"queues_rank{rank}.pt")
