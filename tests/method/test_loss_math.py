"""The loss mathematics against independent float64 references written with explicit loops."""
import math

import pytest
import torch
import torch.nn.functional as F

from conlip_plugin.method.config import ConLIPCfg
from conlip_plugin.method.loss import (
    ConLIPLoss,
    instance_contrastive_loss,
    masked_pixel_loss,
    masked_token_loss,
)
from conlip_plugin.method.masking import IGNORE_INDEX, patchify
from float64_loops import loop_dot, loop_logsumexp


# --------------------------------------------------------------------------------------------
# independent references (float64, explicit Python loops)
# --------------------------------------------------------------------------------------------

def reference_instance_loss(queries, keys, queue, scale, offset, decoupled, in_batch_negatives):
    """Spec step 4, written out: one direction, mean over the local queries.

    Works on float64 tensors with autograd through the explicit scalar loops.
    """
    q = queries.to(torch.float64)
    k = keys.to(torch.float64)
    qu = queue.to(torch.float64)
    scale = float(scale)
    b, g = q.shape[0], k.shape[0]
    total = 0.0
    for i in range(b):
        pos = offset + i
        s_pos = scale * loop_dot(q[i], k[pos])
        negatives = [scale * loop_dot(q[i], qu[r]) for r in range(qu.shape[0])]
        if in_batch_negatives:
            negatives += [scale * loop_dot(q[i], k[j]) for j in range(g) if j != pos]
        terms = negatives if decoupled else [s_pos] + negatives
        total = total + (-s_pos + loop_logsumexp(terms))
    return total / b


def _unit(*shape, dtype=torch.float32):
    return F.normalize(torch.randn(*shape, dtype=dtype), dim=-1)


# --------------------------------------------------------------------------------------------
# instance_contrastive_loss
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("decoupled", [True, False], ids=["dcl", "infonce"])
@pytest.mark.parametrize("in_batch", [True, False], ids=["inbatch", "queueonly"])
@pytest.mark.parametrize("rank,world", [(0, 1), (1, 2), (0, 2), (2, 3)])
@pytest.mark.parametrize("scale", [20.0, 1.0])
def test_instance_loss_matches_reference(decoupled, in_batch, rank, world, scale):
    torch.manual_seed(100 + 10 * rank + world + int(decoupled) * 7 + int(in_batch) * 3 + int(scale))
    b, d, k = 4, 8, 6
    queries = _unit(b, d)
    keys = _unit(world * b, d)
    queue = _unit(k, d)
    offset = rank * b
    got = instance_contrastive_loss(queries, keys, queue, torch.tensor(scale), offset=offset,
                                    decoupled=decoupled, in_batch_negatives=in_batch)
    want = reference_instance_loss(queries, keys, queue, scale, offset, decoupled, in_batch)
    assert got.dtype == torch.float32
    assert got.item() == pytest.approx(float(want), rel=1e-5, abs=1e-5)


def test_instance_loss_variants_are_distinct():
    """Each switch changes the value (so the parametrised comparison above is not vacuous)."""
    torch.manual_seed(0)
    q, keys, queue = _unit(4, 8), _unit(8, 8), _unit(6, 8)
    s = torch.tensor(20.0)
    values = {}
    for dec in (True, False):
        for ib in (True, False):
            for off in (0, 4):
                values[(dec, ib, off)] = instance_contrastive_loss(
                    q, keys, queue, s, offset=off, decoupled=dec, in_batch_negatives=ib).item()
    distinct = {round(v, 6) for v in values.values()}
    assert len(distinct) == len(values)


def test_dcl_excludes_the_positive():
    """With one query and one key the DCL loss is -s+ + lse(queue logits): the key enters only via s+."""
    torch.manual_seed(1)
    d, kq = 8, 5
    q = _unit(1, d)
    queue = _unit(kq, d)
    scale = 20.0
    queue_lse = loop_logsumexp([scale * loop_dot(q[0].double(), queue[r].double()) for r in range(kq)])
    for _ in range(3):
        key = _unit(1, d)
        s_pos = scale * loop_dot(q[0].double(), key[0].double())
        dcl = instance_contrastive_loss(q, key, queue, torch.tensor(scale), decoupled=True)
        assert dcl.item() + float(s_pos) == pytest.approx(float(queue_lse), rel=1e-5, abs=1e-5)
        infonce = instance_contrastive_loss(q, key, queue, torch.tensor(scale), decoupled=False)
        # InfoNCE keeps the positive in the denominator: strictly larger, by log(1 + exp(s+ - lse)).
        gap = math.log1p(math.exp(float(s_pos) - float(queue_lse)))
        assert infonce.item() - dcl.item() == pytest.approx(gap, rel=1e-4, abs=1e-5)


def test_dcl_positive_is_not_a_negative_with_a_perfect_match():
    """A query equal to its key: InfoNCE >= 0 always, while DCL can go negative (positive excluded)."""
    torch.manual_seed(2)
    keys = _unit(3, 16)
    queries = keys.clone()
    queue = -keys.repeat(2, 1)  # far from every query
    s = torch.tensor(20.0)
    dcl = instance_contrastive_loss(queries, keys, queue, s, decoupled=True, in_batch_negatives=False)
    nce = instance_contrastive_loss(queries, keys, queue, s, decoupled=False, in_batch_negatives=False)
    assert nce.item() >= 0.0
    assert dcl.item() < 0.0
    ref = reference_instance_loss(queries, keys, queue, 20.0, 0, True, False)
    assert dcl.item() == pytest.approx(float(ref), rel=1e-5, abs=1e-5)


def test_temperature_enters_as_scale():
    """scale = 1/tau: the loss at tau=0.05 is the reference evaluated with scale 20, not 1."""
    torch.manual_seed(3)
    q, keys, queue = _unit(4, 8), _unit(4, 8), _unit(6, 8)
    tau = 0.05
    got = instance_contrastive_loss(q, keys, queue, torch.tensor(1.0 / tau)).item()
    assert got == pytest.approx(float(reference_instance_loss(q, keys, queue, 1 / tau, 0, True, True)), rel=1e-5)
    assert got != pytest.approx(float(reference_instance_loss(q, keys, queue, 1.0, 0, True, True)), rel=1e-3)


@pytest.mark.parametrize("decoupled", [True, False])
@pytest.mark.parametrize("in_batch", [True, False])
def test_instance_loss_gradient_matches_float64_reference(decoupled, in_batch):
    torch.manual_seed(4)
    b, d = 3, 6
    queries = _unit(b, d).requires_grad_(True)
    keys, queue = _unit(2 * b, d), _unit(5, d)
    loss = instance_contrastive_loss(queries, keys, queue, torch.tensor(20.0), offset=b,
                                     decoupled=decoupled, in_batch_negatives=in_batch)
    (grad,) = torch.autograd.grad(loss, queries)

    q64 = queries.detach().double().requires_grad_(True)
    ref = reference_instance_loss(q64, keys, queue, 20.0, b, decoupled, in_batch)
    (grad_ref,) = torch.autograd.grad(ref, q64)
    assert grad.abs().max() > 1e-3
    torch.testing.assert_close(grad.double(), grad_ref, rtol=1e-4, atol=1e-5)

    # and the float64 reference's own gradient agrees with central finite differences
    eps = 1e-6
    with torch.no_grad():
        for i in range(b):
            for j in range(d):
                plus, minus = q64.detach().clone(), q64.detach().clone()
                plus[i, j] += eps
                minus[i, j] -= eps
                fd = (reference_instance_loss(plus, keys, queue, 20.0, b, decoupled, in_batch)
                      - reference_instance_loss(minus, keys, queue, 20.0, b, decoupled, in_batch)) / (2 * eps)
                assert float(fd) == pytest.approx(float(grad_ref[i, j]), rel=1e-4, abs=1e-6)


def test_instance_loss_gives_no_gradient_to_detached_keys_and_queue():
    """In the model keys/queue carry no grad; the loss then differentiates w.r.t. the queries only."""
    torch.manual_seed(5)
    queries = _unit(4, 8).requires_grad_(True)
    keys, queue = _unit(4, 8), _unit(6, 8)
    loss = instance_contrastive_loss(queries, keys, queue, torch.tensor(20.0))
    loss.backward()
    assert keys.grad is None and queue.grad is None
    assert queries.grad is not None and queries.grad.abs().sum() > 0


def test_instance_loss_is_fp32_for_half_inputs():
    torch.manual_seed(6)
    q, keys, queue = _unit(4, 8), _unit(4, 8), _unit(6, 8)
    got = instance_contrastive_loss(q.half(), keys.half(), queue.half(), torch.tensor(20.0))
    assert got.dtype == torch.float32
    ref = reference_instance_loss(q.half(), keys.half(), queue.half(), 20.0, 0, True, True)
    assert got.item() == pytest.approx(float(ref), rel=1e-4, abs=1e-4)


# --------------------------------------------------------------------------------------------
# masked token / pixel losses and patchify
# --------------------------------------------------------------------------------------------

def reference_token_loss(logits, labels):
    lg = logits.double()
    total, count = 0.0, 0
    for r in range(lg.shape[0]):
        y = int(labels[r])
        if y == IGNORE_INDEX:
            continue
        row = [lg[r, c] for c in range(lg.shape[1])]
        total += float(loop_logsumexp(row)) - float(lg[r, y])
        count += 1
    return total / count


def test_masked_token_loss_matches_log_softmax_loop():
    torch.manual_seed(7)
    logits = torch.randn(9, 13) * 3
    labels = torch.randint(0, 13, (9,))
    got = masked_token_loss(logits, labels)
    assert got.item() == pytest.approx(reference_token_loss(logits, labels), rel=1e-5)


def test_masked_token_loss_ignores_ignore_index():
    torch.manual_seed(8)
    logits = torch.randn(8, 11) * 2
    labels = torch.randint(0, 11, (8,))
    labels[[1, 4, 5]] = IGNORE_INDEX
    got = masked_token_loss(logits, labels)
    assert got.item() == pytest.approx(reference_token_loss(logits, labels), rel=1e-5)


def test_masked_token_loss_empty_is_zero_and_differentiable():
    logits = torch.randn(0, 7, requires_grad=True)
    got = masked_token_loss(logits, torch.zeros(0, dtype=torch.long))
    assert got.item() == 0.0
    got.backward()
    assert logits.grad is not None and logits.grad.shape == (0, 7)


def test_masked_token_loss_all_ignored_is_zero_and_differentiable():
    logits = torch.randn(6, 7, requires_grad=True)
    got = masked_token_loss(logits, torch.full((6,), IGNORE_INDEX))
    assert got.item() == 0.0
    got.backward()
    assert torch.equal(logits.grad, torch.zeros(6, 7))


def test_patchify_pixel_order_by_index_loop():
    torch.manual_seed(9)
    b, c, h, w, p = 2, 3, 8, 12, 4
    images = torch.randn(b, c, h, w)
    out = patchify(images, p)
    gw = w // p
    assert out.shape == (b, (h // p) * gw, p * p * c)
    for bi in range(b):
        for n in range(out.shape[1]):
            pr, pc = divmod(n, gw)  # row-major patch order
            for row in range(p):
                for col in range(p):
                    for ch in range(c):  # pixels as (row, col, channel)
                        flat = (row * p + col) * c + ch
                        assert out[bi, n, flat].item() == images[bi, ch, pr * p + row, pc * p + col].item()


def reference_pixel_loss(pred_patches, images, mask, p):
    """Mean |pred - pixel| over masked patches only, read from the full images by explicit loops."""
    b, c, h, w = images.shape
    gw = w // p
    total, count = 0.0, 0
    for bi in range(b):
        for n in range(mask.shape[1]):
            if not bool(mask[bi, n]):
                continue
            pr, pc = divmod(n, gw)
            for row in range(p):
                for col in range(p):
                    for ch in range(c):
                        target = float(images[bi, ch, pr * p + row, pc * p + col])
                        pred = float(pred_patches[bi, n, (row * p + col) * c + ch])
                        total += abs(pred - target)
                        count += 1
    return total / count


def test_masked_pixel_loss_over_masked_patches_only():
    torch.manual_seed(10)
    b, c, h, w, p = 2, 3, 8, 8, 4
    n = (h // p) * (w // p)
    images = torch.randn(b, c, h, w)
    mask = torch.zeros(b, n, dtype=torch.bool)
    mask[0, [0, 3]] = True
    mask[1, [1]] = True
    pred = torch.randn(b, n, p * p * c)
    got = masked_pixel_loss(pred[mask], patchify(images, p)[mask])
    want = reference_pixel_loss(pred, images, mask, p)
    assert got.item() == pytest.approx(want, rel=1e-6)

    # unmasked pixels and unmasked predictions do not matter
    images2, pred2 = images.clone(), pred.clone()
    images2[0, :, 4:, :4] += 100.0  # patch 2 of image 0 is unmasked
    pred2[~mask] = 1e3
    got2 = masked_pixel_loss(pred2[mask], patchify(images2, p)[mask])
    assert got2.item() == pytest.approx(want, rel=1e-6)
    # ...while a masked pixel does
    images2[0, 1, 0, 0] += 10.0
    got3 = masked_pixel_loss(pred2[mask], patchify(images2, p)[mask])
    assert got3.item() == pytest.approx(reference_pixel_loss(pred2, images2, mask, p), rel=1e-6)
    assert got3.item() != pytest.approx(want, rel=1e-6)


def test_masked_pixel_loss_empty_is_zero():
    pred = torch.randn(0, 48, requires_grad=True)
    got = masked_pixel_loss(pred, torch.randn(0, 48))
    assert got.item() == 0.0
    got.backward()
    assert pred.grad is not None


# --------------------------------------------------------------------------------------------
# ConLIPLoss: both directions, names
# --------------------------------------------------------------------------------------------

def _outputs(b, d, world, kq, vocab, n_masked_tokens, n_masked_patches, pix, seed):
    torch.manual_seed(seed)
    return {
        "image_features": _unit(b, d),
        "text_features": _unit(b, d),
        "logit_scale": torch.tensor(20.0),
        "image_momentum_features": _unit(world * b, d),
        "text_momentum_features": _unit(world * b, d),
        "image_queue": _unit(kq, d),
        "text_queue": _unit(kq, d),
        "mlm_logits": torch.randn(n_masked_tokens, vocab),
        "mlm_labels": torch.randint(0, vocab, (n_masked_tokens,)),
        "mim_predictions": torch.randn(n_masked_patches, pix),
        "mim_targets": torch.randn(n_masked_patches, pix),
    }


def _reference_pixel_rows(pred, target):
    total, count = 0.0, 0
    for r in range(pred.shape[0]):
        for c in range(pred.shape[1]):
            total += abs(float(pred[r, c]) - float(target[r, c]))
            count += 1
    return total / count


@pytest.mark.parametrize("variant", ["conlip", "vanilla"])
@pytest.mark.parametrize("instance", ["dcl", "infonce"])
@pytest.mark.parametrize("in_batch", [True, False])
@pytest.mark.parametrize("rank,world", [(0, 1), (1, 2)])
def test_conlip_loss_sums_both_directions(variant, instance, in_batch, rank, world):
    cfg = ConLIPCfg(variant=variant, instance_loss=instance, in_batch_negatives=in_batch)
    names = cfg.loss_names()
    loss = ConLIPLoss(instance, in_batch, names, rank=rank)
    b = 3
    out = _outputs(b, 8, world, 5, 17, 6, 4, 12, seed=11 + rank)
    got = loss(**out, output_dict=True)
    assert set(got) == {names["instance"], names["mlm"], names["mim"]}

    dec, off = instance == "dcl", rank * b
    i2t = reference_instance_loss(out["image_features"], out["text_momentum_features"], out["text_queue"],
                                  20.0, off, dec, in_batch)
    t2i = reference_instance_loss(out["text_features"], out["image_momentum_features"], out["image_queue"],
                                  20.0, off, dec, in_batch)
    assert got[names["instance"]].item() == pytest.approx(float(i2t) + float(t2i), rel=1e-5)
    assert got[names["mlm"]].item() == pytest.approx(reference_token_loss(out["mlm_logits"], out["mlm_labels"]),
                                                     rel=1e-5)
    assert got[names["mim"]].item() == pytest.approx(
        _reference_pixel_rows(out["mim_predictions"], out["mim_targets"]), rel=1e-5)

    total = loss(**out, output_dict=False)
    assert total.item() == pytest.approx(sum(v.item() for v in got.values()), rel=1e-6)


def test_conlip_loss_pairs_each_direction_with_its_own_queue():
    """i2t uses the text keys/queue and t2i the image ones: swapping the queues changes the value."""
    out = _outputs(3, 8, 1, 5, 17, 6, 4, 12, seed=12)
    loss = ConLIPLoss("dcl", True, ConLIPCfg().loss_names())
    name = ConLIPCfg().loss_names()["instance"]
    base = loss(**out, output_dict=True)[name].item()
    swapped = dict(out, image_queue=out["text_queue"], text_queue=out["image_queue"])
    swapped_value = loss(**swapped, output_dict=True)[name].item()
    wrong = (reference_instance_loss(out["image_features"], out["text_momentum_features"], out["image_queue"],
                                     20.0, 0, True, True)
             + reference_instance_loss(out["text_features"], out["image_momentum_features"], out["text_queue"],
                                       20.0, 0, True, True))
    assert swapped_value == pytest.approx(float(wrong), rel=1e-5)
    assert base != pytest.approx(swapped_value, rel=1e-4)


def test_loss_names():
    assert ConLIPCfg().loss_names() == {"instance": "dcl_loss", "mlm": "conmlm_loss", "mim": "conmim_loss"}
    assert ConLIPCfg(instance_loss="infonce").loss_names()["instance"] == "infonce_loss"
    assert ConLIPCfg(variant="vanilla").loss_names() == {"instance": "dcl_loss", "mlm": "mlm_loss",
                                                         "mim": "mim_loss"}
    # ConLIPLoss without explicit names uses the conlip names
    out = _outputs(2, 8, 1, 4, 9, 3, 2, 6, seed=13)
    assert set(ConLIPLoss("infonce")(**out, output_dict=True)) == {"infonce_loss", "conmlm_loss", "conmim_loss"}


def test_conlip_loss_without_heads_has_only_the_instance_term():
    out = _outputs(2, 8, 1, 4, 9, 3, 2, 6, seed=14)
    for k in ("mlm_logits", "mlm_labels", "mim_predictions", "mim_targets"):
        out.pop(k)
    got = ConLIPLoss("dcl", True, ConLIPCfg(variant="cl").loss_names())(**out, output_dict=True)
    assert list(got) == ["dcl_loss"]


def test_conlip_loss_rejects_unknown_instance_loss():
    with pytest.raises(ValueError):
        ConLIPLoss("clip")


def test_conlip_loss_gradients_reach_only_the_online_features():
    out = _outputs(3, 8, 1, 5, 17, 6, 4, 12, seed=15)
    out["image_features"].requires_grad_(True)
    out["text_features"].requires_grad_(True)
    total = ConLIPLoss()(**out)
    total.backward()
    assert out["image_features"].grad.abs().sum() > 0
    assert out["text_features"].grad.abs().sum() > 0
    # float64 reference gradient of the summed instance loss w.r.t. the image queries
    q64 = out["image_features"].detach().double().requires_grad_(True)
    ref = reference_instance_loss(q64, out["text_momentum_features"], out["text_queue"], 20.0, 0, True, True)
    (g,) = torch.autograd.grad(ref, q64)
    torch.testing.assert_close(out["image_features"].grad.double(), g, rtol=1e-4, atol=1e-5)


# --------------------------------------------------------------------------------------------
# autocast: every term in fp32, as if autocast were off (scale 20 = 1/tau: bf16 would show)
# --------------------------------------------------------------------------------------------

def _terms_and_grads(compute, inputs, autocast):
    """The forward under CPU bf16 autocast (or not); the gradients outside it, as in open_clip."""
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        terms = compute(*inputs)
    grads = {name: torch.autograd.grad(term, inputs, retain_graph=True, allow_unused=True, materialize_grads=True)
             for name, term in terms.items()}
    return terms, grads


def _assert_autocast_proof(compute, *inputs):
    """Each term of ``compute(*inputs)`` (a dict) under autocast is fp32 and equals the fp32 run without it."""
    want, want_grads = _terms_and_grads(compute, inputs, autocast=False)
    got, got_grads = _terms_and_grads(compute, inputs, autocast=True)
    assert list(got) == list(want)
    for name in want:
        assert got[name].dtype == torch.float32, name
        torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=1e-5)
        for g, w in zip(got_grads[name], want_grads[name]):
            torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("decoupled", [True, False], ids=["dcl", "infonce"])
def test_instance_loss_is_fp32_under_autocast(decoupled):
    torch.manual_seed(16)
    queries, keys, queue = _unit(8, 64).requires_grad_(True), _unit(8, 64), _unit(32, 64)
    scale = torch.tensor(20.0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        rounded = scale * queries @ keys.t()
    assert (rounded.float() - scale * queries @ keys.t()).abs().max() > 1e-2
    _assert_autocast_proof(
        lambda q: {"loss": instance_contrastive_loss(q, keys, queue, scale, decoupled=decoupled)}, queries)


def test_masked_token_loss_is_fp32_under_autocast():
    torch.manual_seed(17)
    logits = (torch.randn(8, 32) * 20).requires_grad_(True)
    labels = torch.randint(0, 32, (8,))
    labels[[2, 5]] = IGNORE_INDEX
    _assert_autocast_proof(lambda x: {"loss": masked_token_loss(x, labels)}, logits)


@pytest.mark.parametrize("rows,dtype", [(6, torch.float32), (0, torch.bfloat16)], ids=["masked", "none_masked"])
def test_masked_pixel_loss_is_fp32_under_autocast(rows, dtype):
    """With no patch masked the zero is fp32 too, though the head's output under autocast is bf16."""
    torch.manual_seed(18)
    predictions = (torch.randn(rows, 48) * 20).to(dtype).requires_grad_(True)
    targets = torch.randn(rows, 48) * 20
    _assert_autocast_proof(lambda p: {"loss": masked_pixel_loss(p, targets)}, predictions)


@pytest.mark.parametrize("instance", ["dcl", "infonce"])
def test_conlip_loss_terms_are_fp32_under_autocast(instance):
    out = _outputs(8, 64, 1, 32, 32, 8, 6, 48, seed=19)
    out["mlm_logits"] = out["mlm_logits"] * 20
    inputs = ("image_features", "text_features", "mlm_logits", "mim_predictions")
    for name in inputs:
        out[name].requires_grad_(True)
    loss = ConLIPLoss(instance)
    _assert_autocast_proof(lambda *x: loss(**dict(out, **dict(zip(inputs, x))), output_dict=True),
                           *(out[name] for name in inputs))


@pytest.mark.parametrize("cfg", [ConLIPCfg(), ConLIPCfg(variant="vanilla", instance_loss="infonce"),
                                 ConLIPCfg(variant="cl", in_batch_negatives=False)], ids=["conlip", "vanilla", "cl"])
def test_loss_from_cfg_takes_the_configs_switches(cfg):
    loss = ConLIPLoss.from_cfg(cfg, rank=3)
    assert (loss.decoupled, loss.in_batch_negatives, loss.names, loss.rank) == (
        cfg.instance_loss == "dcl", cfg.in_batch_negatives, cfg.loss_names(), 3)
