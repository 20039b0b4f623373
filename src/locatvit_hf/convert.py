"""Convert the authors' timm-format LocAtViT (or plain-ViT baseline) checkpoints to Transformers.

    python -m locatvit_hf.convert --checkpoint PATH_OR_REPO --output DIR \
        [--task image-classification|semantic-segmentation|backbone] [--push-to-hub REPO]

`--checkpoint` is a `.safetensors`/`.pth`/`.pth.tar` file, a folder laid out like the authors' Hub repos
(`model.safetensors` + timm `config.json`), or a Hub repo id. The architecture is read off the weights
(docs/method.md#checkpoints-of-the-original);
every tensor must be used, or the conversion stops with a one-line error (exit code 2). The weights carry no class
names: a 1000-class classifier (an ImageNet-1k head) gets the ImageNet-1k names, any other head `LABEL_<i>`.
"""

import argparse
import json
import math
import re
import sys
import warnings
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from .configuration_locatvit import LocAtViTConfig
from .image_processing_locatvit import LocAtViTImageProcessor
from .modelcard_locatvit import converted_class_names
from .modeling_locatvit import LocAtViTBackbone, LocAtViTForImageClassification, LocAtViTForSemanticSegmentation

TASKS = {
    "image-classification": LocAtViTForImageClassification,
    "semantic-segmentation": LocAtViTForSemanticSegmentation,
    "backbone": LocAtViTBackbone,
}
NESTED_STATE_DICT_KEYS = ("state_dict", "model", "state_dict_ema")
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin", "model.pth", "checkpoint.pth.tar", "checkpoint.pth")

# timm block key (after `blocks.{i}.`) -> our layer key (after `encoder.layers.{i}.`); qkv is split separately.
BLOCK_KEYS = {
    "norm1": "layernorm_before",
    "attn.proj": "attention.o_proj",
    "attn.gaug.log_var": "attention.gaussian_bias.variance_proj",
    "attn.gaug.log_alpha": "attention.gaussian_bias.strength_proj",
    "norm2": "layernorm_after",
    "mlp.fc1": "mlp.fc1",
    "mlp.fc2": "mlp.fc2",
}
EMBEDDING_KEYS = {
    "cls_token": "embeddings.cls_token",
    "pos_embed": "embeddings.position_embeddings",
    "patch_embed.proj.weight": "embeddings.patch_embeddings.projection.weight",
    "patch_embed.proj.bias": "embeddings.patch_embeddings.projection.bias",
}
REQUIRED_KEYS = ("cls_token", "pos_embed", "patch_embed.proj.weight", "blocks.0.attn.qkv.weight")


class ConversionError(Exception):
    """A checkpoint that cannot be converted; the message is the one line the CLI prints."""


def _read_weights_file(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        try:
            return load_file(str(path))
        except (SafetensorError, OSError, ValueError) as error:
            raise ConversionError(f"{path} is not a readable safetensors file ({error}).") from None
    try:
        with warnings.catch_warnings():  # torch warns about pickle protocols before failing; the error says it all
            warnings.simplefilter("ignore")
            content = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises many kinds for corrupt or unsafe pickles
        message = " ".join(str(error).split())
        reason = message.split(". ")[0] if message else type(error).__name__
        raise ConversionError(
            f"{path} could not be loaded as a weights-only PyTorch checkpoint ({reason}). Pickles that run code are "
            "refused; re-save the state dict with torch.save(model.state_dict(), ...) or as safetensors."
        ) from None
    if isinstance(content, dict):
        for key in NESTED_STATE_DICT_KEYS:
            if isinstance(content.get(key), dict):
                content = content[key]
                break
    if not isinstance(content, dict) or not all(isinstance(v, torch.Tensor) for v in content.values()):
        raise ConversionError(
            f"{path} does not hold a state dict of tensors (plain, or under {NESTED_STATE_DICT_KEYS})."
        )
    return content


def load_original_checkpoint(checkpoint: str) -> tuple[dict[str, torch.Tensor], dict]:
    """The timm state dict and timm `config.json` (empty if none) of a file, a local repo folder or a Hub repo id."""
    path = Path(checkpoint)
    if not path.exists():
        if path.suffix or checkpoint.count("/") != 1:
            raise ConversionError(
                f"{checkpoint} does not exist (neither a file, a folder nor an 'org/name' Hub repo id)."
            )
        from huggingface_hub import snapshot_download

        try:
            path = Path(snapshot_download(checkpoint, allow_patterns=["*.json", *WEIGHT_FILES]))
        except Exception as error:
            raise ConversionError(
                f"could not download {checkpoint} from the Hub ({type(error).__name__}: {error})."
            ) from None
    timm_config = {}
    if path.is_dir():
        config_file = path / "config.json"
        if config_file.is_file():
            timm_config = json.loads(config_file.read_text())
        weights = next((path / name for name in WEIGHT_FILES if (path / name).is_file()), None)
        if weights is None:
            raise ConversionError(f"{path} holds none of the weight files {list(WEIGHT_FILES)}.")
        path = weights
    state_dict = _read_weights_file(path)
    if state_dict and all(key.startswith("module.") for key in state_dict):
        state_dict = {key.removeprefix("module."): value for key, value in state_dict.items()}
    missing = [key for key in REQUIRED_KEYS if key not in state_dict]
    if missing:
        sample = sorted(state_dict)[:5]
        raise ConversionError(
            f"{path} is not a timm ViT/LocAtViT checkpoint: missing keys {missing} (found e.g. {sample})."
        )
    return state_dict, timm_config


def config_from_original(
    state_dict: dict[str, torch.Tensor], timm_config: dict | None = None, **overrides
) -> LocAtViTConfig:
    """Read the architecture off the weights (docs/method.md#checkpoints-of-the-original); the timm config only
    fills what weights cannot tell."""
    timm_config = timm_config or {}
    pretrained_cfg = timm_config.get("pretrained_cfg", {})
    hidden_size, num_channels, *patch_size = state_dict["patch_embed.proj.weight"].shape
    depth = 1 + max(int(match.group(1)) for key in state_dict if (match := re.match(r"blocks\.(\d+)\.", key)))
    has_gaug = "blocks.0.attn.gaug.log_var.weight" in state_dict
    if has_gaug:
        num_heads = hidden_size // state_dict["blocks.0.attn.gaug.log_var.weight"].shape[1]
    else:  # plain ViT: heads are not in the weights; every size has head_dim 64 (docs/method.md#backbone)
        num_heads = timm_config.get("num_heads", max(1, hidden_size // 64))
    num_patches = state_dict["pos_embed"].shape[1] - 1
    input_size = pretrained_cfg.get("input_size")
    if input_size is not None:
        image_size = list(input_size[-2:])
        grid = (image_size[0] // patch_size[0]) * (image_size[1] // patch_size[1])
        if grid != num_patches:
            raise ConversionError(
                f"config.json input_size {input_size} gives {grid} patches but pos_embed holds {num_patches}."
            )
    else:
        side = math.isqrt(num_patches)
        if side * side != num_patches:
            raise ConversionError(
                f"pos_embed holds {num_patches} patches, not a square grid: give the image size in config.json."
            )
        image_size = [side * patch_size[0], side * patch_size[1]]
    kwargs = {
        "hidden_size": hidden_size,
        "num_hidden_layers": depth,
        "num_attention_heads": num_heads,
        "intermediate_size": state_dict["blocks.0.mlp.fc1.weight"].shape[0],
        "image_size": image_size,
        "patch_size": list(patch_size),
        "num_channels": num_channels,
        "qkv_bias": "blocks.0.attn.qkv.bias" in state_dict,
        "use_gaussian_attention": has_gaug,
        "use_patch_refinement": has_gaug,  # PRR has no weights; the released LocAtViTs use both parts
    }
    if "head.weight" in state_dict:
        kwargs["num_labels"] = state_dict["head.weight"].shape[0]
    kwargs.update(overrides)
    try:
        return LocAtViTConfig(**kwargs)
    except ValueError as error:
        raise ConversionError(f"the weights describe an invalid model: {error}") from None


def expected_original_keys(config: LocAtViTConfig) -> list[str]:
    """The timm keys a checkpoint of this architecture must hold (the classifier `head` is optional)."""
    keys = [*EMBEDDING_KEYS, "norm.weight", "norm.bias"]
    block_modules = [old for old in BLOCK_KEYS if config.use_gaussian_attention or ".gaug." not in old]
    for index in range(config.num_hidden_layers):
        keys.append(f"blocks.{index}.attn.qkv.weight")
        if config.qkv_bias:
            keys.append(f"blocks.{index}.attn.qkv.bias")
        keys += [f"blocks.{index}.{module}.{kind}" for module in block_modules for kind in ("weight", "bias")]
    return keys


def convert_state_dict(state_dict: dict[str, torch.Tensor], config: LocAtViTConfig, task: str) -> dict:
    """timm keys -> keys of the model class for `task`. Tensors the task has no place for (the classifier for a
    segmentation model; the final norm, which only the classifier reads, for the others) are dropped; any other
    unused tensor is an error."""
    missing = sorted(set(expected_original_keys(config)) - set(state_dict))
    if missing:
        raise ConversionError(f"missing keys in the checkpoint: {missing}.")
    source = dict(state_dict)
    converted = {}
    for old, new in EMBEDDING_KEYS.items():
        if old in source:
            converted[new] = source.pop(old)
    for index in range(config.num_hidden_layers):
        prefix, target = f"blocks.{index}.", f"encoder.layers.{index}."
        for kind in ("weight", "bias"):
            qkv = source.pop(f"{prefix}attn.qkv.{kind}", None)
            if qkv is not None:
                for name, part in zip(("q_proj", "k_proj", "v_proj"), qkv.chunk(3, dim=0)):
                    converted[f"{target}attention.{name}.{kind}"] = part.clone()
            for old, new in BLOCK_KEYS.items():
                if f"{prefix}{old}.{kind}" in source:
                    converted[f"{target}{new}.{kind}"] = source.pop(f"{prefix}{old}.{kind}")
    for kind in ("weight", "bias"):
        if f"norm.{kind}" in source:
            norm = source.pop(f"norm.{kind}")
            if task == "image-classification":
                converted[f"layernorm.{kind}"] = norm
        if f"head.{kind}" in source:
            head = source.pop(f"head.{kind}")
            if task == "image-classification":
                converted[f"classifier.{kind}"] = head
    if source:
        raise ConversionError(f"unexpected keys in the checkpoint: {sorted(source)}.")
    if task != "backbone":
        converted = {
            (key if key.startswith("classifier.") else f"locatvit.{key}"): value for key, value in converted.items()
        }
    return converted


def load_converted(checkpoint: str, task: str = "image-classification", **config_overrides):
    """Build the Transformers model for `task` from an original checkpoint, checking every tensor."""
    state_dict, timm_config = load_original_checkpoint(checkpoint)
    return build_converted(state_dict, timm_config, task, **config_overrides)


def build_converted(state_dict: dict, timm_config: dict, task: str, **config_overrides):
    if task not in TASKS:
        raise ConversionError(f"unknown task {task!r}: choose one of {sorted(TASKS)}.")
    if task == "semantic-segmentation" and "num_labels" not in config_overrides:
        config_overrides["num_labels"] = 150  # ADE20K, the paper's main benchmark; a new head is trained anyway
    config = config_from_original(state_dict, timm_config, **config_overrides)
    if "id2label" not in config_overrides:  # names the caller gives win over the ImageNet-1k ones
        config.update(converted_class_names(task, config.num_labels))
    model = TASKS[task](config)
    converted = convert_state_dict(state_dict, config, task)
    expected = model.state_dict()
    new_head = (
        {key for key in expected if key.startswith("decode_head.")} if task == "semantic-segmentation" else set()
    )
    missing = sorted(set(expected) - set(converted) - new_head)
    unexpected = sorted(set(converted) - set(expected))
    if missing or unexpected:
        raise ConversionError(
            f"checkpoint does not match the architecture: missing {missing}, unexpected {unexpected}."
        )
    for key, value in converted.items():
        if value.shape != expected[key].shape:
            raise ConversionError(
                f"shape mismatch for {key}: checkpoint {tuple(value.shape)}, model {tuple(expected[key].shape)}."
            )
    model.load_state_dict(converted, strict=False)
    return model.eval()


def image_processor_for(task: str, timm_config: dict | None = None) -> LocAtViTImageProcessor:
    """The preprocessing the converted model expects: the segmentation protocol's (docs/method.md#data) for
    segmentation, else the checkpoint's own `pretrained_cfg` (mean, std, interpolation, crop ratio), defaulting to
    the released models' (docs/method.md#classification-pre-training)."""
    if task == "semantic-segmentation":
        return LocAtViTImageProcessor.for_segmentation()
    pretrained_cfg = (timm_config or {}).get("pretrained_cfg", {})
    kwargs = {}
    if "mean" in pretrained_cfg and "std" in pretrained_cfg:
        kwargs.update(image_mean=list(pretrained_cfg["mean"]), image_std=list(pretrained_cfg["std"]))
    if "input_size" in pretrained_cfg:
        height, width = pretrained_cfg["input_size"][-2:]
        crop_pct = pretrained_cfg.get("crop_pct", 0.9)
        # timm's eval transform: resize the shorter side to floor(size / crop_pct), then center crop.
        kwargs.update(size={"shortest_edge": math.floor(min(height, width) / crop_pct)})
        kwargs.update(crop_size={"height": height, "width": width})
    interpolation = pretrained_cfg.get("interpolation")
    if interpolation in ("bilinear", "bicubic", "nearest"):
        from transformers.image_utils import PILImageResampling

        kwargs["resample"] = PILImageResampling[interpolation.upper()]
    return LocAtViTImageProcessor(**kwargs)


def convert(checkpoint: str, output: str, task: str = "image-classification", push_to_hub: str | None = None):
    """Convert, then write the model, its image processor and its model card (`README.md`, rendered for what was
    converted) to `output`; with `push_to_hub`, upload exactly those files to that Hub repo in one commit (the card's
    snippets then load from that repo)."""
    from .modelcard_locatvit import render_model_card

    state_dict, timm_config = load_original_checkpoint(checkpoint)
    # Segmentation sees whole images of any size (also in the image-segmentation pipeline, which cannot pass the flag).
    overrides = {"interpolate_pos_encoding": True} if task == "semantic-segmentation" else {}
    model = build_converted(state_dict, timm_config, task, **overrides)
    image_processor = image_processor_for(task, timm_config)
    output = Path(output)
    model.save_pretrained(output)
    image_processor.save_pretrained(output)
    card = render_model_card(
        model.config, task, repo_id=push_to_hub, source_checkpoint=checkpoint, model_path=str(output)
    )
    (output / "README.md").write_text(card, encoding="utf-8")
    if push_to_hub:
        from huggingface_hub import CommitOperationAdd, HfApi

        # The files just written (weights, configs, code, card), not whatever else the folder holds.
        names = sorted(
            path.name
            for path in output.iterdir()
            if path.is_file()
            and (
                path.name in ("config.json", "preprocessor_config.json", "README.md", "model.safetensors.index.json")
                or path.suffix == ".py"
                or (path.name.startswith("model") and path.suffix == ".safetensors")
            )
        )
        api = HfApi()
        repo_id = api.create_repo(push_to_hub, exist_ok=True).repo_id
        api.create_commit(
            repo_id=repo_id,
            operations=[CommitOperationAdd(path_in_repo=name, path_or_fileobj=str(output / name)) for name in names],
            commit_message=f"Upload LocAtViT ({task}) converted from {checkpoint}",
        )
    return model


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m locatvit_hf.convert", description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", required=True, help="checkpoint file, local repo folder or Hub repo id")
    parser.add_argument("--output", required=True, help="folder to write the Transformers model to")
    parser.add_argument("--task", default="image-classification", choices=sorted(TASKS))
    parser.add_argument(
        "--push-to-hub",
        metavar="REPO",
        help="also upload the converted model, its image processor and its model card to this Hub repo (one commit)",
    )
    args = parser.parse_args(argv)
    try:
        convert(args.checkpoint, args.output, args.task, args.push_to_hub)
    except ConversionError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"converted {args.checkpoint} -> {args.output} ({args.task})")
    if args.push_to_hub:
        print(f"pushed {args.output} to https://huggingface.co/{args.push_to_hub}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
