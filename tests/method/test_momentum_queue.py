"""EMA of the momentum encoders and the feature queues (spec steps 1 and 7)."""
import pytest
import torch
from torch import nn

from conlip_plugin.method.loss import ConLIPLoss
from conlip_plugin.method.momentum import FeatureQueue, ema_update_

CAPTIONS = ["a photo of a cat", "two dogs play in the snow", "a red car parked on a street",
            "people walking"]


# --------------------------------------------------------------------------------------------
# ema_update_
# --------------------------------------------------------------------------------------------

def _reference_ema(momentum, online, m):
    """m * a + (1 - m) * b, element by element in Python floats (float64)."""
    out = []
    for a, b in zip(momentum, online):
        flat_a, flat_b = a.flatten().tolist(), b.float().flatten().tolist()
        out.append([m * x + (1.0 - m) * y for x, y in zip(flat_a, flat_b)])
    return out


@pytest.mark.parametrize("m", [0.99, 0.9, 0.0])
@pytest.mark.parametrize("online_dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_ema_update_matches_explicit_arithmetic(m, online_dtype):
    torch.manual_seed(0)
    shapes = [(3, 4), (5,), (2, 2, 3)]
    momentum = [torch.randn(s) for s in shapes]
    online = [torch.randn(s).to(online_dtype) for s in shapes]
    want = _reference_ema(momentum, online, m)
    ema_update_(momentum, online, m)
    for got, ref in zip(momentum, want):
        assert got.dtype == torch.float32
        torch.testing.assert_close(got.flatten().double(), torch.tensor(ref, dtype=torch.float64),
                                   rtol=1e-6, atol=1e-6)


def test_ema_update_does_not_record_gradient():
    torch.manual_seed(1)
    momentum = [torch.randn(4)]
    online = [torch.randn(4, requires_grad=True)]
    ema_update_(momentum, online, 0.5)
    assert not momentum[0].requires_grad and momentum[0].grad_fn is None


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_ema_update_refuses_non_fp32_momentum(dtype):
    torch.manual_seed(2)
    momentum = [torch.randn(3), torch.randn(3).to(dtype)]
    before = [p.clone() for p in momentum]
    with pytest.raises(TypeError):
        ema_update_(momentum, [torch.randn(3), torch.randn(3)], 0.99)
    for p, b in zip(momentum, before):
        assert torch.equal(p, b)


# --------------------------------------------------------------------------------------------
# FeatureQueue against a pure-Python ring buffer
# --------------------------------------------------------------------------------------------

class Ring:
    def __init__(self, rows):
        self.rows = [list(r) for r in rows]
        self.ptr = 0

    def write(self, keys):
        for key in keys:
            self.rows[self.ptr] = list(key)
            self.ptr = (self.ptr + 1) % len(self.rows)


def test_queue_starts_unit_norm_fp32():
    torch.manual_seed(3)
    q = FeatureQueue(10, 6)
    assert q.features.shape == (10, 6) and q.features.dtype == torch.float32
    assert int(q.ptr) == 0
    for r in range(10):
        assert sum(x * x for x in q.features[r].tolist()) == pytest.approx(1.0, abs=1e-5)


def test_queue_wraps_around_like_a_ring_buffer():
    torch.manual_seed(4)
    q = FeatureQueue(10, 3)
    ring = Ring(q.features.tolist())
    expected_ptrs = []
    for step in range(1, 5):
        keys = torch.arange(12, dtype=torch.float32).view(4, 3) + 100 * step
        q.enqueue(keys)
        ring.write(keys.tolist())
        assert q.features.tolist() == ring.rows, step
        assert int(q.ptr) == ring.ptr, step
        expected_ptrs.append(ring.ptr)
    assert expected_ptrs == [4, 8, 2, 6]


@pytest.mark.parametrize("start,batch", [(6, 23), (0, 10), (3, 10), (9, 31), (0, 1)])
def test_queue_batches_larger_than_the_queue(start, batch):
    torch.manual_seed(5)
    q = FeatureQueue(10, 3)
    ring = Ring(q.features.tolist())
    if start:
        warm = torch.randn(start, 3)
        q.enqueue(warm)
        ring.write(warm.tolist())
    keys = torch.arange(batch * 3, dtype=torch.float32).view(batch, 3) + 1000
    q.enqueue(keys)
    ring.write(keys.tolist())
    assert q.features.tolist() == ring.rows
    assert int(q.ptr) == ring.ptr


def test_queue_stores_detached_fp32():
    torch.manual_seed(6)
    q = FeatureQueue(8, 4)
    keys = torch.randn(3, 4, requires_grad=True)
    q.enqueue(keys.half())
    assert q.features.dtype == torch.float32 and not q.features.requires_grad
    assert q.features[:3].tolist() == keys.detach().half().float().tolist()


# --------------------------------------------------------------------------------------------
# the real tiny model: when the EMA and the queue writes happen
# --------------------------------------------------------------------------------------------

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny():
    import open_clip

    torch.manual_seed(0)
    model = open_clip.create_model("conlip-tiny", output_dict=True)
    tokenizer = open_clip.get_tokenizer("conlip-tiny")
    text = tokenizer(CAPTIONS)
    yield model, text
    del model


def _reset(model):
    with torch.no_grad():
        for twin, online in ((model.momentum_visual, model.visual), (model.momentum_text, model.text)):
            for m, o in zip(twin.parameters(), online.parameters()):
                m.copy_(o)
        for q in (model.image_queue, model.text_queue):
            q.ptr.zero_()
    model.keys_to_enqueue = None
    model.zero_grad(set_to_none=True)
    model.train()


def _momentum_params(model):
    return list(model.momentum_visual.parameters()) + list(model.momentum_text.parameters())


def _online_params(model):
    return list(model.visual.parameters()) + list(model.text.parameters())


def _snapshot(model):
    return {
        "momentum": [p.detach().clone() for p in _momentum_params(model)],
        "online": [p.detach().clone() for p in model.parameters() if p.requires_grad],
        "image_queue": model.image_queue.features.clone(),
        "text_queue": model.text_queue.features.clone(),
        "image_ptr": int(model.image_queue.ptr),
        "text_ptr": int(model.text_queue.ptr),
    }


def _same(a, b):
    return all(torch.equal(x, y) for x, y in zip(a, b))


def _loss(model, out):
    return ConLIPLoss.from_cfg(model.conlip_cfg)(**out)


def _trainable(model):
    return [p for p in model.parameters() if p.requires_grad]


def test_fresh_model_momentum_copies_equal_online_towers():
    """Spec step 1: the momentum copies start as copies of the (weight-loaded) online towers."""
    import open_clip

    torch.manual_seed(21)
    model = open_clip.create_model("conlip-tiny-cl", output_dict=True)
    pairs = [(model.momentum_visual, model.visual), (model.momentum_text, model.text)]
    for twin, online in pairs:
        twin_state, online_state = twin.state_dict(), online.state_dict()
        assert set(twin_state) == set(online_state)
        for k in online_state:
            assert torch.equal(twin_state[k], online_state[k]), k
            assert twin_state[k].data_ptr() != online_state[k].data_ptr(), k  # a copy, not shared


def test_momentum_parameters_never_require_grad(tiny):
    model, text = tiny
    _reset(model)
    momentum = _momentum_params(model)
    assert len(momentum) == len(_online_params(model)) > 0
    assert not any(p.requires_grad for p in momentum)
    trainable_ids = {id(p) for p in _trainable(model)}
    assert not any(id(p) in trainable_ids for p in momentum)
    torch.manual_seed(10)
    out = model(torch.randn(4, 3, 64, 64), text)
    for key in ("image_momentum_features", "text_momentum_features", "image_queue", "text_queue"):
        assert not out[key].requires_grad, key
    _loss(model, out).backward()
    assert all(p.grad is None for p in momentum)
    assert any(p.grad is not None for p in _online_params(model))
    assert not any(p.requires_grad for p in momentum)
    _reset(model)


def test_ema_once_per_optimizer_step_and_queue_gets_last_keys(tiny):
    model, text = tiny
    _reset(model)
    m = model.conlip_cfg.momentum
    torch.manual_seed(11)
    with torch.no_grad():  # make the momentum copy differ from the online towers
        for p in _momentum_params(model):
            p.add_(0.05 * torch.randn_like(p))
    opt = torch.optim.SGD(_trainable(model), lr=0.5)
    b = text.shape[0]
    before = _snapshot(model)

    out1 = model(torch.randn(b, 3, 64, 64), text)
    _loss(model, out1).backward()
    out2 = model(torch.randn(b, 3, 64, 64), text)
    _loss(model, out2).backward()
    # forwards (and backwards) change neither the momentum encoders nor the queues
    after_fwd = _snapshot(model)
    assert _same(after_fwd["momentum"], before["momentum"])
    assert torch.equal(after_fwd["image_queue"], before["image_queue"])
    assert torch.equal(after_fwd["text_queue"], before["text_queue"])
    assert after_fwd["image_ptr"] == before["image_ptr"] == 0

    opt.step()
    online_after = [p.detach().double() for p in _online_params(model)]
    momentum_after = _momentum_params(model)
    changed = 0
    for mb, mo, on in zip(before["momentum"], momentum_after, online_after):
        want = m * mb.double() + (1.0 - m) * on  # one EMA with the post-step online weights
        torch.testing.assert_close(mo.double(), want, rtol=1e-6, atol=1e-6)
        changed += int(not torch.equal(mo, mb))
    assert changed > 0

    # the queues hold the momentum keys of the last forward only, written once at the pointer
    k = model.image_queue.features.shape[0]
    for name, key in (("image_queue", "image_momentum_features"), ("text_queue", "text_momentum_features")):
        ring = Ring(before[name].tolist())
        ring.write(out2[key].tolist())
        queue = getattr(model, name)
        assert queue.features.tolist() == ring.rows
        assert int(queue.ptr) == ring.ptr == b % k
        assert not torch.allclose(queue.features[:b], out1[key])

    # a second step without a new forward: another EMA, but nothing new is queued
    before2 = _snapshot(model)
    opt.step()
    assert int(model.image_queue.ptr) == before2["image_ptr"]
    assert torch.equal(model.image_queue.features, before2["image_queue"])
    assert torch.equal(model.text_queue.features, before2["text_queue"])
    for mb, mo, on in zip(before2["momentum"], _momentum_params(model), _online_params(model)):
        torch.testing.assert_close(mo.double(), m * mb.double() + (1 - m) * on.detach().double(),
                                   rtol=1e-6, atol=1e-6)
    _reset(model)


def test_gradscaler_skipped_step_changes_nothing(tiny):
    model, text = tiny
    _reset(model)
    torch.manual_seed(12)
    with torch.no_grad():
        for p in _momentum_params(model):
            p.add_(0.05 * torch.randn_like(p))
    opt = torch.optim.SGD(_trainable(model), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 8)

    out = model(torch.randn(4, 3, 64, 64), text)
    scaler.scale(_loss(model, out)).backward()
    victim = next(p for p in _online_params(model) if p.grad is not None)
    victim.grad.view(-1)[0] = float("inf")
    before = _snapshot(model)
    scale_before = scaler.get_scale()
    scaler.step(opt)
    scaler.update()
    assert scaler.get_scale() < scale_before  # the inf was seen and the step skipped
    after = _snapshot(model)
    assert _same(after["online"], before["online"])
    assert _same(after["momentum"], before["momentum"])
    assert torch.equal(after["image_queue"], before["image_queue"])
    assert torch.equal(after["text_queue"], before["text_queue"])
    assert after["image_ptr"] == before["image_ptr"] and after["text_ptr"] == before["text_ptr"]

    # control: a finite step through the same scaler does run the EMA and the queue write
    opt.zero_grad(set_to_none=True)
    out = model(torch.randn(4, 3, 64, 64), text)
    scaler.scale(_loss(model, out)).backward()
    scaler.step(opt)
    scaler.update()
    after2 = _snapshot(model)
    assert not _same(after2["momentum"], before["momentum"])
    assert after2["image_ptr"] == before["image_ptr"] + 4
    assert torch.equal(model.image_queue.features[:4], out["image_momentum_features"])
    _reset(model)


def test_foreign_optimizer_does_not_trigger_ema(tiny):
    model, text = tiny
    _reset(model)
    torch.manual_seed(13)
    with torch.no_grad():
        for p in _momentum_params(model):
            p.add_(0.05 * torch.randn_like(p))
    out = model(torch.randn(4, 3, 64, 64), text)
    _loss(model, out).backward()
    before = _snapshot(model)

    stranger = nn.Parameter(torch.randn(3))
    stranger.grad = torch.ones(3)
    foreign = torch.optim.SGD([stranger], lr=0.1)
    stranger_before = stranger.detach().clone()
    foreign.step()
    assert not torch.equal(stranger.detach(), stranger_before)  # that optimizer did step
    after = _snapshot(model)
    assert _same(after["momentum"], before["momentum"])
    assert torch.equal(after["image_queue"], before["image_queue"])
    assert after["image_ptr"] == before["image_ptr"] and after["text_ptr"] == before["text_ptr"]

    # control: the model's own optimizer then runs the EMA and writes the pending keys
    torch.optim.SGD(_trainable(model), lr=0.1).step()
    after2 = _snapshot(model)
    assert not _same(after2["momentum"], before["momentum"])
    assert after2["text_ptr"] == before["text_ptr"] + 4
    assert torch.equal(model.text_queue.features[:4], out["text_momentum_features"])
    _reset(model)


def test_eval_forward_queues_nothing(tiny):
    model, text = tiny
    _reset(model)
    model.eval()
    torch.manual_seed(14)
    with torch.no_grad():
        model(torch.randn(4, 3, 64, 64), text)
    assert model.keys_to_enqueue is None
    model.train()
    before = _snapshot(model)
    # a step right after an eval forward: EMA yes, queue write no
    for p in _trainable(model):
        p.grad = torch.zeros_like(p)
    torch.optim.SGD(_trainable(model), lr=0.1).step()
    assert int(model.image_queue.ptr) == before["image_ptr"]
    assert torch.equal(model.image_queue.features, before["image_queue"])
    _reset(model)
