"""The Table 2 analysis against cross-attention weights computed independently (float64 loops)."""
import math

import open_clip
import pytest
import torch

from conlip_plugin.evaluation.attention import instance_slot_attention


def slot0_weights_by_loops(attn, x, memory, memory_mask, query_mask):
    """Every valid query's softmax weight on memory slot 0, head by head, in float64."""
    wq, bq = attn.q.weight.double(), attn.q.bias.double()
    wk, bk = attn.k.weight.double(), attn.k.bias.double()
    x, memory = x.double(), memory.double()
    heads, dh = attn.heads, wq.shape[0] // attn.heads
    out = []
    for b in range(x.shape[0]):
        keys = memory[b] @ wk.t() + bk
        for h in range(heads):
            for i in range(x.shape[1]):
                if query_mask is not None and not query_mask[b, i]:
                    continue
                q = x[b, i] @ wq.t() + bq
                scores = []
                for s in range(memory.shape[1]):
                    if memory_mask is not None and not memory_mask[b, s]:
                        continue
                    scores.append(sum(q[h * dh + d] * keys[s, h * dh + d] for d in range(dh)).item() / math.sqrt(dh))
                top = max(scores)
                out.append(math.exp(scores[0] - top) / sum(math.exp(v - top) for v in scores))
    return torch.tensor(out, dtype=torch.float64)


@pytest.mark.parametrize("name", ["conlip-tiny", "conlip-tiny-vanilla"])
def test_reported_statistics_match_independent_weights(name):
    torch.manual_seed(0)
    model = open_clip.create_model(name)
    tok = open_clip.get_tokenizer(name)
    batches = [(torch.randn(3, 3, 64, 64), tok(["a red square", "a small blue circle on white", "a bar"]))
               for _ in range(2)]
    captured = {"mlm": [], "mim": []}

    def keep(kind):
        def hook(module, args):
            captured[kind].append(tuple(args) + (None,) * (4 - len(args)))
        return hook

    handles = [model.mlm_head.register_forward_pre_hook(keep("mlm")),
               model.mim_head.register_forward_pre_hook(keep("mim"))]
    queue_before = model.image_queue.features.clone()
    result = instance_slot_attention(model, batches)
    for h in handles:
        h.remove()

    for kind, head in (("mlm", model.mlm_head), ("mim", model.mim_head)):
        attn = head.layers[0].cross_attn
        expected = []
        for x, query_mask, memory, memory_mask in captured[kind]:
            # The layer's cross-attention sees the queries after self-attention and its norm.
            layer = head.layers[0]
            with torch.no_grad():
                y = layer.norm1(x + layer.self_attn(x, x, query_mask))
            expected.append(slot0_weights_by_loops(attn, y, memory, memory_mask, query_mask))
        values = torch.cat(expected)
        got = result[f"{kind}_layer0"]
        assert got["count"] == values.numel()
        assert got["mean"] == pytest.approx(values.mean().item(), abs=1e-6)
        assert got["std"] == pytest.approx(values.std(unbiased=False).item(), abs=1e-6)
    assert torch.equal(model.image_queue.features, queue_before), "the analysis must not change the queues"


def test_cl_model_has_nothing_to_analyse():
    model = open_clip.create_model("conlip-tiny-cl")
    with pytest.raises(ValueError, match="no token-level heads"):
        instance_slot_attention(model, [])


def test_vanilla_on_a_causal_text_tower_is_refused():
    model = open_clip.create_model("ViT-S-32-alt+conlip-vanilla")
    with pytest.raises(ValueError, match="start-of-text"):
        instance_slot_attention(model, [])
