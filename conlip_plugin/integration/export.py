"""Export a ConLIP training checkpoint as a plain open_clip ``local-dir:`` folder.

So that a trained model can be used without the plugin: the folder holds the config without
``conlip_cfg`` (with its preprocessing), the towers' weights (heads, momentum encoders and queues
dropped) and the text tower's config and tokenizer, and
``open_clip.create_model_and_transforms('local-dir:FOLDER')`` loads it. Usage: docs/evaluation.md.
"""
import argparse
import copy
import json
from pathlib import Path

from conlip_plugin.integration.activation import activate


def export_inference_model(model_name: str, checkpoint: str, output_dir: str) -> Path:
    activate()
    import open_clip
    from open_clip.factory import get_model_config
    from safetensors.torch import save_file
    from transformers import AutoTokenizer

    from conlip_plugin.integration.names import is_conlip_config

    model_cfg = get_model_config(model_name)
    if not is_conlip_config(model_cfg):
        raise ValueError(f"{model_name!r} is not a ConLIP model config (it has no conlip_cfg section).")
    if not Path(checkpoint).is_file():
        raise FileNotFoundError(f"checkpoint {checkpoint} not found: pass a file written by open_clip_train.")
    try:
        model = open_clip.create_model(model_name, pretrained=checkpoint)
    except RuntimeError as err:
        raise RuntimeError(
            f"{checkpoint} does not fit model {model_name!r}; was it trained with another config "
            f"(check params.txt in its run folder)? {err}"
        ) from err
    out = Path(output_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)

    plain = copy.deepcopy(model_cfg)
    del plain["conlip_cfg"]
    plain["text_cfg"]["hf_model_name"] = str(out)
    plain["text_cfg"]["hf_tokenizer_name"] = str(out)
    model.text.config.save_pretrained(out)
    AutoTokenizer.from_pretrained(model_cfg["text_cfg"]["hf_tokenizer_name"]).save_pretrained(out)
    weights = {k: v.detach().contiguous().cpu() for k, v in model.inference_state_dict().items()}
    if "logit_bias" in weights:  # SigLIP's bias: plain open_clip builds the parameter from this key
        plain["init_logit_bias"] = float(weights["logit_bias"])
    save_file(weights, str(out / "open_clip_model.safetensors"))
    config = {"model_cfg": plain, "preprocess_cfg": dict(model.visual.preprocess_cfg)}
    (out / "open_clip_config.json").write_text(json.dumps(config, indent=2) + "\n")
    return out


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="the ConLIP model config the run was trained with")
    parser.add_argument("--checkpoint", required=True, help="an open_clip_train checkpoint (epoch_N.pt)")
    parser.add_argument("--output", required=True, help="folder to write (created if missing)")
    args = parser.parse_args(argv)
    out = export_inference_model(args.model, args.checkpoint, args.output)
    print(f"exported {args.model} from {args.checkpoint} to local-dir:{out}")


if __name__ == "__main__":
    main()
