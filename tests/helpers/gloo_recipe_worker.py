"""One rank of the 2-process gloo test of the recipe loss (tests/integration/test_recipe_token_losses.py), in a
module of its own so that spawned processes import it by name."""
import argparse

import open_clip


def loss_args(model: str, **kw) -> argparse.Namespace:
    """What open_clip_train passes to ``create_loss(args)`` for a recipe mix."""
    base = dict(model=model, distill=False, siglip=False, local_loss=False, gather_with_grad=False, rank=0,
                world_size=1, horovod=False, loss_dist_impl=None, accum_freq=1, precision="fp32", batch_size=4,
                warmup=10, coca_caption_loss_weight=2.0, coca_contrastive_loss_weight=1.0)
    base.update(kw)
    return argparse.Namespace(**base)


def run(rank: int, world: int, port: int, configs: str, features: tuple, queue) -> None:
    import torch.distributed as dist

    open_clip.add_model_config(configs)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    image, text, scale = (t.clone().requires_grad_() for t in features)
    b = image.shape[0] // world
    loss = open_clip.create_loss(loss_args("recipetest-hf+conmlm-conmim", rank=rank, world_size=world,
                                           local_loss=True, gather_with_grad=True))
    local_image, local_text = image[rank * b:(rank + 1) * b], text[rank * b:(rank + 1) * b]
    value = loss(local_image, local_text, scale, output_dict=True)["contrastive_loss"]
    value.backward()
    rows = slice(rank * b, (rank + 1) * b)  # plain lists: shared tensors would outlive this process
    queue.put((rank, value.item(), image.grad[rows].tolist(), text.grad[rows].tolist()))
    dist.destroy_process_group()
