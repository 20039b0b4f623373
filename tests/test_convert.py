"""The converter reads the original's checkpoints in every form they come in
(docs/method.md#checkpoints-of-the-original) and refuses anything else clearly."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from torchvision.models import ResNet50_Weights
from transformers import AutoImageProcessor, pipeline

from locatvit_hf import (
    LocAtViTBackbone,
    LocAtViTConfig,
    LocAtViTForImageClassification,
    LocAtViTForSemanticSegmentation,
    LocAtViTImageProcessor,
)
from locatvit_hf.convert import convert, load_converted, main

from .conftest import SMALL_PARITY_DIR


def timm_state_dict(hidden=32, depth=2, heads=2, grid=4, patch=8, classes=5, gaug=True) -> dict:
    """Random weights under the original's (timm) key names and shapes."""
    head_dim = hidden // heads
    sd = {
        "cls_token": torch.randn(1, 1, hidden),
        "pos_embed": torch.randn(1, 1 + grid * grid, hidden),
        "patch_embed.proj.weight": torch.randn(hidden, 3, patch, patch),
        "patch_embed.proj.bias": torch.randn(hidden),
        "norm.weight": torch.randn(hidden),
        "norm.bias": torch.randn(hidden),
        "head.weight": torch.randn(classes, hidden),
        "head.bias": torch.randn(classes),
    }
    for i in range(depth):
        p = f"blocks.{i}."
        sd.update(
            {
                p + "norm1.weight": torch.randn(hidden),
                p + "norm1.bias": torch.randn(hidden),
                p + "attn.qkv.weight": torch.randn(3 * hidden, hidden),
                p + "attn.qkv.bias": torch.randn(3 * hidden),
                p + "attn.proj.weight": torch.randn(hidden, hidden),
                p + "attn.proj.bias": torch.randn(hidden),
                p + "norm2.weight": torch.randn(hidden),
                p + "norm2.bias": torch.randn(hidden),
                p + "mlp.fc1.weight": torch.randn(4 * hidden, hidden),
                p + "mlp.fc1.bias": torch.randn(4 * hidden),
                p + "mlp.fc2.weight": torch.randn(hidden, 4 * hidden),
                p + "mlp.fc2.bias": torch.randn(hidden),
            }
        )
        if gaug:
            sd.update(
                {
                    p + "attn.gaug.log_var.weight": torch.randn(2, head_dim),
                    p + "attn.gaug.log_var.bias": torch.randn(2),
                    p + "attn.gaug.log_alpha.weight": torch.randn(1, head_dim),
                    p + "attn.gaug.log_alpha.bias": torch.randn(1),
                }
            )
    return sd


def assert_weights_placed(model, sd):
    """Every original tensor sits where it belongs (qkv split in thirds)."""
    ours = model.state_dict()
    prefix = "locatvit." if not isinstance(model, LocAtViTBackbone) else ""
    hidden = sd["cls_token"].shape[-1]
    assert torch.equal(ours[prefix + "embeddings.position_embeddings"], sd["pos_embed"])
    assert torch.equal(ours[prefix + "embeddings.patch_embeddings.projection.weight"], sd["patch_embed.proj.weight"])
    qkv = sd["blocks.1.attn.qkv.weight"]
    for index, name in enumerate(("q_proj", "k_proj", "v_proj")):
        weight = ours[f"{prefix}encoder.layers.1.attention.{name}.weight"]
        assert torch.equal(weight, qkv[index * hidden : (index + 1) * hidden])
    if "blocks.0.attn.gaug.log_var.weight" in sd:
        variance = ours[prefix + "encoder.layers.0.attention.gaussian_bias.variance_proj.weight"]
        assert torch.equal(variance, sd["blocks.0.attn.gaug.log_var.weight"])
    assert torch.equal(ours[prefix + "encoder.layers.1.mlp.fc2.bias"], sd["blocks.1.mlp.fc2.bias"])


@pytest.mark.parametrize("form", ["safetensors", "pth", "state_dict", "model", "state_dict_ema", "ddp"])
def test_reads_every_checkpoint_form(tmp_path, form):
    sd = timm_state_dict()
    if form == "safetensors":
        path = tmp_path / "model.safetensors"
        save_file(sd, str(path))
    elif form == "ddp":
        path = tmp_path / "checkpoint.pth"
        torch.save({f"module.{k}": v for k, v in sd.items()}, path)
    else:
        path = tmp_path / ("model.pth" if form == "pth" else "checkpoint.pth.tar")
        torch.save(sd if form == "pth" else {form: sd, "epoch": 3}, path)
    model = load_converted(str(path))
    assert isinstance(model, LocAtViTForImageClassification)
    config = model.config
    assert (config.hidden_size, config.num_hidden_layers, config.num_attention_heads) == (32, 2, 2)
    assert (config.image_size, config.patch_size, config.num_labels) == ([32, 32], [8, 8], 5)
    assert config.use_gaussian_attention and config.use_patch_refinement
    assert_weights_placed(model, sd)
    assert torch.equal(model.classifier.weight, sd["head.weight"])


def test_plain_vit_baseline_converts_without_gaug(tmp_path):
    sd = timm_state_dict(hidden=128, heads=2, gaug=False)
    save_file(sd, str(tmp_path / "model.safetensors"))
    model = load_converted(str(tmp_path / "model.safetensors"))
    assert not model.config.use_gaussian_attention and not model.config.use_patch_refinement
    assert model.config.num_attention_heads == 2  # head_dim 64, as for every released size
    assert_weights_placed(model, sd)


def test_hub_style_folder_with_timm_config(tmp_path):
    sd = timm_state_dict(grid=4)
    save_file(sd, str(tmp_path / "model.safetensors"))
    timm_config = {"architecture": "locatvit_tiny", "num_classes": 5, "pretrained_cfg": {"input_size": [3, 32, 32]}}
    (tmp_path / "config.json").write_text(json.dumps(timm_config))
    model = load_converted(str(tmp_path))
    assert model.config.image_size == [32, 32]


@pytest.mark.parametrize("model_class", [LocAtViTForImageClassification, LocAtViTForSemanticSegmentation])
def test_from_pretrained_of_an_original_checkpoint_says_to_convert(model_class):
    """`from_pretrained` on a folder of the authors' format (timm config and weights) refuses, naming the converter,
    instead of building a default-sized random model with every weight reported missing."""
    with pytest.raises(ValueError, match=r"timm configuration \(architecture 'locatvit.*locatvit_hf\.convert"):
        model_class.from_pretrained(SMALL_PARITY_DIR)
    with pytest.raises(ValueError, match="load_converted"):
        LocAtViTConfig.from_pretrained(SMALL_PARITY_DIR)


@pytest.mark.parametrize(
    "task, model_class", [("semantic-segmentation", LocAtViTForSemanticSegmentation), ("backbone", LocAtViTBackbone)]
)
def test_other_tasks(tmp_path, task, model_class):
    sd = timm_state_dict()
    save_file(sd, str(tmp_path / "model.safetensors"))
    model = load_converted(str(tmp_path / "model.safetensors"), task)
    assert type(model) is model_class
    assert_weights_placed(model, sd)


def test_cli_converts_parity_checkpoint(tmp_path):
    """The small parity checkpoint (the original's Hub layout: model.safetensors + timm config.json) through the CLI,
    saved and reloaded: the original's logits and its preprocessing."""
    output = tmp_path / "converted"
    result = subprocess.run(
        [sys.executable, "-m", "locatvit_hf.convert", "--checkpoint", str(SMALL_PARITY_DIR), "--output", str(output)],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    assert (output / "model.safetensors").is_file() and (output / "config.json").is_file()
    processor = AutoImageProcessor.from_pretrained(output)
    assert type(processor) is LocAtViTImageProcessor
    assert (processor.size.shortest_edge, processor.crop_size.height) == (248, 224)  # crop ratio 0.9 of config.json
    assert list(processor.image_mean) == [0.5, 0.5, 0.5] and processor.resample == 3  # bicubic
    model = LocAtViTForImageClassification.from_pretrained(output).eval()
    expected = load_file(str(SMALL_PARITY_DIR / "expected.safetensors"))
    with torch.no_grad():
        logits = model(expected["cls224.pixel_values"].float()).logits
    assert (logits - expected["cls224.logits"]).abs().max() <= 1e-4


def run_cli(checkpoint, tmp_path):
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "locatvit_hf.convert",
            "--checkpoint",
            str(checkpoint),
            "--output",
            str(tmp_path / "o"),
        ],
        capture_output=True,
        text=True,
    )


def assert_one_line_error(result, *fragments):
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def test_cli_errors_are_one_line(tmp_path):
    not_a_checkpoint = tmp_path / "notes.safetensors"
    not_a_checkpoint.write_text("hello")
    assert_one_line_error(run_cli(not_a_checkpoint, tmp_path), "notes.safetensors", "not a readable safetensors")

    missing = timm_state_dict()
    del missing["blocks.1.mlp.fc1.weight"]
    save_file(missing, str(tmp_path / "missing.safetensors"))
    assert_one_line_error(run_cli(tmp_path / "missing.safetensors", tmp_path), "missing", "blocks.1.mlp.fc1.weight")

    extra = timm_state_dict()
    extra["blocks.0.attn.rel_pos.weight"] = torch.zeros(3)
    save_file(extra, str(tmp_path / "extra.safetensors"))
    assert_one_line_error(run_cli(tmp_path / "extra.safetensors", tmp_path), "unexpected", "rel_pos")

    foreign = {"conv1.weight": torch.zeros(3), "fc.weight": torch.zeros(3)}
    save_file(foreign, str(tmp_path / "resnet.safetensors"))
    assert_one_line_error(run_cli(tmp_path / "resnet.safetensors", tmp_path), "not a timm ViT/LocAtViT", "cls_token")

    assert_one_line_error(run_cli(tmp_path / "nowhere.pth", tmp_path), "does not exist")


def test_main_returns_exit_code(tmp_path, capsys):
    assert main(["--checkpoint", str(tmp_path / "absent.pth"), "--output", str(tmp_path / "o")]) == 2
    assert capsys.readouterr().err.startswith("error: ")


def imagenet_class_names() -> list[str]:
    """torchvision's ImageNet-1k class list (shipped with the package: nothing is downloaded)."""
    return ResNet50_Weights.IMAGENET1K_V1.meta["categories"]


def save_original_folder(folder, classes: int):
    """A folder like the authors' Hub repos: timm weights with a `classes`-way head, and a 32 px timm config."""
    folder.mkdir()
    save_file(timm_state_dict(classes=classes), str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps({"pretrained_cfg": {"input_size": [3, 32, 32]}}))
    return folder


def test_imagenet_classifier_answers_with_class_names(tmp_path):
    output = tmp_path / "converted"
    convert(str(save_original_folder(tmp_path / "original", classes=1000)), str(output))

    config = LocAtViTConfig.from_pretrained(output)
    assert "tabby" in config.id2label[281]
    assert config.id2label == dict(enumerate(imagenet_class_names()))
    assert config.label2id == {name: index for index, name in config.id2label.items()}
    assert len(config.label2id) == 1000

    classifier = pipeline("image-classification", model=str(output))
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 50, 3), dtype=np.uint8))
    predictions = classifier(image, top_k=5)
    assert len(predictions) == 5 and {p["label"] for p in predictions} <= set(imagenet_class_names())


@pytest.mark.parametrize(
    "classes, task, num_labels",
    [(10, "image-classification", 10), (1000, "semantic-segmentation", 150), (1000, "backbone", 1000)],
)
def test_other_heads_keep_generic_class_names(tmp_path, classes, task, num_labels):
    # Only a kept 1000-class head is ImageNet-1k's; a segmentation head is new, a backbone has none.
    model = load_converted(str(save_original_folder(tmp_path / "original", classes)), task)
    assert model.config.id2label == {index: f"LABEL_{index}" for index in range(num_labels)}


def test_given_class_names_win(tmp_path):
    id2label = {index: f"class {index}" for index in range(1000)}
    model = load_converted(str(save_original_folder(tmp_path / "original", classes=1000)), id2label=id2label)
    assert model.config.id2label == id2label
