"""The heads' attention masks, and what open_clip's own ViT / causal text tower give the heads."""
import json
import math
from contextlib import contextmanager
from typing import Dict, Iterator, Optional, Tuple

import pytest
import torch
from torch import nn

from conlip_plugin.method.heads import ConditionedHead, init_head_weights
from model_state import deterministic
from tiny_configs import native_base

pytestmark = pytest.mark.usefixtures("one_thread")

# --------------------------------------------------------------------------------------------
# ConditionedHead: query padding mask and memory mask, against a float64 loop reference
# --------------------------------------------------------------------------------------------

DIM, MEM_DIM, HEADS, Q, S = 16, 12, 2, 6, 7


def _ref_attention(att: nn.Module, x: torch.Tensor, mem: torch.Tensor, keep: Optional[torch.Tensor]) -> torch.Tensor:
    """Multi-head attention by loops over rows, heads and queries; ``keep`` (B, S) True = may attend."""
    w = {n: (getattr(att, n).weight.detach().double(), getattr(att, n).bias.detach().double())
         for n in ("q", "k", "v", "out")}
    lin = lambda t, n: t @ w[n][0].t() + w[n][1]
    dh = x.shape[-1] // att.heads
    out = torch.zeros(x.shape[0], x.shape[1], x.shape[-1], dtype=torch.float64)
    for b in range(x.shape[0]):
        q, k, v = lin(x[b], "q"), lin(mem[b], "k"), lin(mem[b], "v")
        allowed = [j for j in range(mem.shape[1]) if keep is None or bool(keep[b, j])]
        for h in range(att.heads):
            sl = slice(h * dh, (h + 1) * dh)
            for i in range(x.shape[1]):
                scores = [float(q[i, sl] @ k[j, sl]) / math.sqrt(dh) for j in allowed]
                top = max(scores)
                weights = [math.exp(s - top) for s in scores]
                total = sum(weights)
                out[b, i, sl] = sum(wt / total * v[j, sl] for wt, j in zip(weights, allowed))
        out[b] = lin(out[b], "out")
    return out


def _ref_norm(x: torch.Tensor, ln: nn.LayerNorm) -> torch.Tensor:
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + ln.eps) * ln.weight.double() + ln.bias.double()


@torch.no_grad()
def _ref_head(head: ConditionedHead, x: torch.Tensor, qmask: torch.Tensor, mem: torch.Tensor,
              mmask: torch.Tensor) -> torch.Tensor:
    """The post-norm conditioned layers (self-attn over queries, cross-attn, GELU MLP) in float64."""
    x, mem = x.double(), mem.double()
    for i in range(head.depth):
        layer = head.layers[i % len(head.layers)]
        x = _ref_norm(x + _ref_attention(layer.self_attn, x, x, qmask), layer.norm1)
        x = _ref_norm(x + _ref_attention(layer.cross_attn, x, mem, mmask), layer.norm2)
        fc1, fc2 = layer.mlp[0], layer.mlp[2]
        hidden = x @ fc1.weight.double().t() + fc1.bias.double()
        hidden = 0.5 * hidden * (1 + torch.erf(hidden / math.sqrt(2)))
        x = _ref_norm(x + hidden @ fc2.weight.double().t() + fc2.bias.double(), layer.norm3)
    return x


@pytest.fixture(scope="module")
def head_case() -> Tuple[ConditionedHead, Dict[str, torch.Tensor]]:
    torch.manual_seed(0)
    head = ConditionedHead(DIM, MEM_DIM, HEADS, layers=2, mlp_ratio=2.0, dropout=0.1)
    head.apply(init_head_weights)
    with torch.no_grad():  # non-trivial weights everywhere (init leaves biases 0, norms 1)
        for p in head.parameters():
            p.add_(0.3 * torch.randn_like(p))
    head.eval()
    qmask = torch.tensor([[True] * 4 + [False] * 2, [True] * 6])
    mmask = torch.tensor([[True, False, True, True, False, True, False], [True] * 5 + [False] * 2])
    return head, {"x": torch.randn(2, Q, DIM), "query_mask": qmask, "memory": torch.randn(2, S, MEM_DIM),
                  "memory_mask": mmask}


@pytest.mark.parametrize("explicit", [False, True], ids=["fused", "record_weights"])
def test_head_matches_float64_attention_reference(head_case, explicit: bool):
    """ConditionedHead with query and memory masks equals the float64 loop computation at valid queries."""
    head, case = head_case
    head.record_cross_attention(explicit)
    try:
        with torch.no_grad():
            got = head(case["x"], case["query_mask"], case["memory"], case["memory_mask"])
    finally:
        head.record_cross_attention(False)
    want = _ref_head(head, case["x"], case["query_mask"], case["memory"], case["memory_mask"])
    valid = case["query_mask"]
    torch.testing.assert_close(got.double()[valid], want[valid], rtol=1e-4, atol=1e-5)


def test_padded_queries_do_not_reach_valid_outputs(head_case):
    """Self-attention respects the query padding mask: padded query content changes no valid output."""
    head, case = head_case
    valid = case["query_mask"]
    with torch.no_grad():
        base = head(case["x"], valid, case["memory"], case["memory_mask"])
        noisy = case["x"].clone()
        noisy[~valid] = 5.0 * torch.randn(int((~valid).sum()), DIM)
        moved = head(noisy, valid, case["memory"], case["memory_mask"])
        torch.testing.assert_close(moved[valid], base[valid], rtol=0, atol=1e-6)
        real = case["x"].clone()
        real[0, 0] += 5.0  # a valid query does reach the other valid outputs (the check is not vacuous)
        assert not torch.allclose(head(real, valid, case["memory"], case["memory_mask"])[0, 1:4], base[0, 1:4],
                                  atol=1e-3)


def test_masked_memory_slots_do_not_reach_any_output(head_case):
    """Cross-attention respects the memory mask: masked memory slots change no output."""
    head, case = head_case
    keep = case["memory_mask"]
    with torch.no_grad():
        base = head(case["x"], case["query_mask"], case["memory"], keep)
        noisy = case["memory"].clone()
        noisy[~keep] = 5.0 * torch.randn(int((~keep).sum()), MEM_DIM)
        torch.testing.assert_close(head(case["x"], case["query_mask"], noisy, keep), base, rtol=0, atol=1e-6)
        real = case["memory"].clone()
        real[0, 0] += 5.0
        assert not torch.allclose(head(case["x"], case["query_mask"], real, keep)[0], base[0], atol=1e-3)


# --------------------------------------------------------------------------------------------
# open_clip's ViT (OpenClipViTTokens) and causal text tower (OpenClipTextTokens)
# --------------------------------------------------------------------------------------------

CAPTIONS = ["a photo of a cat sitting on a sofa near the window", "two small dogs play in the snow",
            "a red car parked on a quiet street at night", "people walking in the park"]
B = len(CAPTIONS)
EOT = 49407


@pytest.fixture(scope="module")
def native(tmp_path_factory) -> Tuple[nn.Module, torch.Tensor]:
    import open_clip

    folder = tmp_path_factory.mktemp("adapter_configs")
    (folder / "adaptertest-native.json").write_text(json.dumps(native_base(32)))
    open_clip.add_model_config(folder)
    torch.manual_seed(0)
    model = open_clip.create_model("adaptertest-native+conlip", output_dict=True)
    with torch.no_grad():  # non-zero mask embeddings and position embeddings that matter
        model.image_mask_token.normal_()
        model.text_mask_token.normal_()
        model.visual.positional_embedding.normal_()
        model.text.positional_embedding.normal_()
    return deterministic(model), open_clip.get_tokenizer("adaptertest-native+conlip")(CAPTIONS)


@contextmanager
def heads_inputs(model: nn.Module) -> Iterator[dict]:
    """Record both heads' arguments and the masks drawn in the next training forward."""
    seen: dict = {}

    def pre(name):
        def hook(module, args, kwargs):
            seen[name] = dict(zip(("x", "query_mask", "memory", "memory_mask"), args), **kwargs)
        return hook

    handles = [model.mlm_head.register_forward_pre_hook(pre("mlm"), with_kwargs=True),
               model.mim_head.register_forward_pre_hook(pre("mim"), with_kwargs=True),
               model.patch_masker.register_forward_hook(lambda m, a, out: seen.update(patch_mask=out)),
               model.text_masker.register_forward_hook(lambda m, a, out: seen.update(text_mask=out))]
    try:
        yield seen
    finally:
        for h in handles:
            h.remove()
        model.keys_to_enqueue = None


@contextmanager
def no_projection(module: nn.Module, name: str) -> Iterator[None]:
    """The tower's own forward, stopped before its output projection."""
    saved = getattr(module, name)
    setattr(module, name, None)
    try:
        yield
    finally:
        setattr(module, name, saved)


@torch.no_grad()
def vit_states(visual: nn.Module, image: torch.Tensor, patch_mask: Optional[torch.Tensor] = None,
               mask_token: Optional[torch.Tensor] = None) -> torch.Tensor:
    """open_clip's ViT by hand: patch j = (row, col) embedded by conv1's weights, the mask token in its
    place when masked, then CLS, position embeddings, ln_pre, transformer, ln_post."""
    w = visual.conv1.weight  # (D, 3, p, p); open_clip's conv1 has no bias
    p, (gh, gw) = w.shape[-1], visual.grid_size
    x = torch.zeros(image.shape[0], gh * gw, w.shape[0])
    for b in range(image.shape[0]):
        for j in range(gh * gw):
            r, c = divmod(j, gw)
            if patch_mask is not None and patch_mask[b, j]:
                x[b, j] = mask_token
            else:
                x[b, j] = w.flatten(1) @ image[b, :, r * p:(r + 1) * p, c * p:(c + 1) * p].flatten()
    x = torch.cat([visual.class_embedding.expand(image.shape[0], 1, -1), x], dim=1) + visual.positional_embedding
    return visual.ln_post(visual.transformer(visual.ln_pre(x)))


@torch.no_grad()
def causal_text_states(text: nn.Module, ids: torch.Tensor, embed_mask: Optional[torch.Tensor] = None,
                       mask_embedding: Optional[torch.Tensor] = None) -> torch.Tensor:
    """open_clip's causal text tower by hand: token embedding (the mask embedding where masked),
    position embedding at every position, causal attention, ln_final."""
    x = text.token_embedding.weight[ids].clone()
    if embed_mask is not None:
        for b, l in embed_mask.nonzero().tolist():
            x[b, l] = mask_embedding
    length = ids.shape[1]
    x = x + text.positional_embedding[:length]
    causal = torch.full((length, length), float("-inf")).triu(1)
    return text.ln_final(text.transformer(x, attn_mask=causal))


def _eot_positions(ids: torch.Tensor) -> list:
    return [[l for l in range(ids.shape[1]) if int(ids[b, l]) == EOT][0] for b in range(ids.shape[0])]


def test_open_clip_vit_conmlm_memory_and_mask_token(native):
    """ConMLM memory on open_clip's ViT: complete CLS, then masked patches (mask token before positions)."""
    model, text = native
    torch.manual_seed(1)
    image = torch.randn(B, 3, 64, 64)
    with heads_inputs(model) as seen:
        model(image, text)
    call, patch_mask = seen["mlm"], seen["patch_mask"]
    masked_ids, _, to_mask = seen["text_mask"]
    n = patch_mask.shape[1]
    assert n == 16 and patch_mask.sum(1).tolist() == [round(model.conlip_cfg.image_mask_ratio * n)] * B
    memory = call["memory"].detach()
    assert memory.shape == (B, 1 + n, model.visual.conv1.out_channels)
    complete = vit_states(model.visual, image)
    masked = vit_states(model.visual, image, patch_mask, model.image_mask_token)
    assert not torch.allclose(complete[:, 0], masked[:, 0], atol=1e-3)
    torch.testing.assert_close(memory[:, 0], complete[:, 0], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(memory[:, 1:], masked[:, 1:], rtol=1e-4, atol=1e-5)
    assert call.get("memory_mask") is None
    model.eval()
    try:
        with torch.no_grad(), no_projection(model.visual, "proj"):
            torch.testing.assert_close(memory[:, 0], model.visual(image), rtol=1e-4, atol=1e-5)
        with torch.no_grad():
            torch.testing.assert_close(memory[:, 0] @ model.visual.proj, model.encode_image(image),
                                       rtol=1e-4, atol=1e-5)
    finally:
        model.train()
    # queries: the masked caption's token states, with its padding mask
    torch.testing.assert_close(call["x"].detach(), causal_text_states(model.text, masked_ids, to_mask,
                                                                      model.text_mask_token), rtol=1e-4, atol=1e-5)
    assert torch.equal(call["query_mask"], masked_ids != 0) and torch.equal(masked_ids != 0, text != 0)


def test_causal_text_conmim_memory_and_mask_embedding(native):
    """ConMIM memory on the causal text tower: complete end-of-text state, then masked tokens (own EOT masked out)."""
    model, text = native
    torch.manual_seed(2)
    image = torch.randn(B, 3, 64, 64)
    with heads_inputs(model) as seen:
        model(image, text)
    call, patch_mask = seen["mim"], seen["patch_mask"]
    masked_ids, labels, to_mask = seen["text_mask"]
    assert to_mask.any() and (labels != -100).any(dim=1).all()
    memory = call["memory"].detach()
    length = text.shape[1]
    assert memory.shape == (B, 1 + length, model.text.width)
    complete = causal_text_states(model.text, text)
    masked = causal_text_states(model.text, masked_ids, to_mask, model.text_mask_token)
    eot, own = _eot_positions(text), _eot_positions(masked_ids)
    rows = torch.arange(B)
    assert not torch.allclose(complete[rows, eot], masked[rows, own], atol=1e-3)
    torch.testing.assert_close(memory[:, 0], complete[rows, eot], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(memory[:, 1:], masked, rtol=1e-4, atol=1e-5)
    want_mask = torch.zeros(B, 1 + length, dtype=torch.bool)
    for b in range(B):
        want_mask[b, 0] = True
        for l in range(length):
            want_mask[b, 1 + l] = int(masked_ids[b, l]) != 0 and l != own[b]
    assert torch.equal(call["memory_mask"], want_mask)
    model.eval()
    try:
        with torch.no_grad(), no_projection(model.text, "text_projection"):
            torch.testing.assert_close(memory[:, 0], model.text(text), rtol=1e-4, atol=1e-5)
        with torch.no_grad():
            torch.testing.assert_close(memory[:, 0] @ model.text.text_projection, model.encode_text(text),
                                       rtol=1e-4, atol=1e-5)
    finally:
        model.train()
    # queries: the masked image's patch states, no query mask
    want_x = vit_states(model.visual, image, patch_mask, model.image_mask_token)[:, 1:]
    torch.testing.assert_close(call["x"].detach(), want_x, rtol=1e-4, atol=1e-5)
    assert call["query_mask"] is None
