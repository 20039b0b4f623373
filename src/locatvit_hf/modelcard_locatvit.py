"""Model cards (the Hub's `README.md`) for LocAtViT models.

One renderer serves the committed cards in `model_cards/`, the converter (`python -m locatvit_hf.convert`, which
renders the card of what it converted) and the example scripts (the card of what they trained).
After changing this file, regenerate the committed cards, or check that they are up to date:

    python -m locatvit_hf.modelcard_locatvit --write model_cards
    python -m locatvit_hf.modelcard_locatvit --check model_cards   # exit code 1 when a card is out of date
"""

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

from huggingface_hub import ModelCard, ModelCardData

from .configuration_locatvit import PRESETS, LocAtViTConfig

HUB_ORGANIZATION = "locatvit-hf"
ARXIV_ID = "2603.04892"
ARXIV_URL = f"https://arxiv.org/abs/{ARXIV_ID}"
# Classes of an ImageNet-1k head: a converted classifier with this many gets the ImageNet-1k class names.
IMAGENET_NUM_CLASSES = 1000
# The authors' released checkpoints (timm format) that `locatvit_hf.convert` reads, and their size.
AUTHOR_CHECKPOINTS = {"sinahmr/locatvit_tiny": "tiny", "sinahmr/locatvit_base": "base"}
# docs/method.md#reported-results: the only result of the paper that this project quotes.
REPORTED_RESULT = (
    "LocAtViT-Tiny gains about 6 mIoU and LocAtViT-Base about 4 mIoU on ADE20K over the same ViT trained the same "
    "way (frozen backbone, linear head), with equal or better ImageNet-1k top-1 accuracy"
)
CITATION = """@inproceedings{hajimiri2026locatvit,
  title         = {Locality-Attending Vision Transformer},
  author        = {Hajimiri and others},
  booktitle     = {International Conference on Learning Representations (ICLR)},
  year          = {2026},
  eprint        = {2603.04892},
  archivePrefix = {arXiv},
}"""

# task -> Hub pipeline tag, Auto class and what the model returns.
TASKS = {
    "image-classification": ("image-classification", "AutoModelForImageClassification"),
    "semantic-segmentation": ("image-segmentation", "AutoModelForSemanticSegmentation"),
    "feature-extraction": ("image-feature-extraction", "AutoModel"),
    "backbone": ("image-feature-extraction", "AutoBackbone"),
}
# Model class name -> task; names, not classes, so that the remote-code copies of the classes map too.
MODEL_CLASS_TASKS = {
    "LocAtViTForImageClassification": "image-classification",
    "LocAtViTForSemanticSegmentation": "semantic-segmentation",
    "LocAtViTModel": "feature-extraction",
    "LocAtViTBackbone": "backbone",
}


@dataclass(frozen=True)
class Release:
    """A configuration published under `locatvit-hf/<name>`, with the checkpoint its weights come from (None: the
    configuration with randomly initialized weights)."""

    preset: str
    task: str
    source_checkpoint: str | None
    num_labels: int = 1000


RELEASES = {
    "locatvit-tiny": Release("tiny", "image-classification", "sinahmr/locatvit_tiny"),
    "locatvit-small": Release("small", "image-classification", None),
    "locatvit-base": Release("base", "image-classification", "sinahmr/locatvit_base"),
    "locatvit-tiny-ade20k": Release("tiny", "semantic-segmentation", "sinahmr/locatvit_tiny", num_labels=150),
}


def task_for_model(model) -> str:
    """The card task of a LocAtViT model instance (by class name, so remote-code classes work too)."""
    for cls in type(model).__mro__:
        if cls.__name__ in MODEL_CLASS_TASKS:
            return MODEL_CLASS_TASKS[cls.__name__]
    return "feature-extraction"


def imagenet_id2label() -> dict[int, str]:
    """
    The ImageNet-1k class names by class index, in the order that timm's and torchvision's ImageNet heads (and so the
    authors' checkpoints) share. They come from the metadata that torchvision ships with its weights enums: local, no
    download, and no copy of the list to keep in sync here.
    """
    from torchvision.models import ResNet50_Weights  # on use: only 1000-class classifiers need it

    return dict(enumerate(ResNet50_Weights.IMAGENET1K_V1.meta["categories"]))


def converted_class_names(task: str, num_labels: int | None) -> dict:
    """
    The `id2label`/`label2id` config fields for a converted checkpoint, whose weights carry no class names. A
    1000-class classifier has an ImageNet-1k head (the authors released no other), so it gets ImageNet-1k's names and
    predictions read "tabby" rather than "LABEL_281". Any other head's classes are unknown: an empty dict keeps
    Transformers' `LABEL_<i>` names.
    """
    if task != "image-classification" or num_labels != IMAGENET_NUM_CLASSES:
        return {}
    id2label = imagenet_id2label()
    return {"id2label": id2label, "label2id": {label: index for index, label in id2label.items()}}


def release_config(name: str) -> LocAtViTConfig:
    """The configuration of a release, as `locatvit_hf.convert` builds it from the authors' checkpoint."""
    release = RELEASES[name]
    overrides = {"interpolate_pos_encoding": True} if release.task == "semantic-segmentation" else {}
    overrides.update(converted_class_names(release.task, release.num_labels))
    return LocAtViTConfig.from_preset(release.preset, num_labels=release.num_labels, **overrides)


def render_release_card(name: str) -> str:
    """The card of `locatvit-hf/<name>`: what `model_cards/<name>.md` holds."""
    release = RELEASES[name]
    return render_model_card(
        release_config(name),
        release.task,
        repo_id=f"{HUB_ORGANIZATION}/{name}",
        source_checkpoint=release.source_checkpoint,
        untrained=release.source_checkpoint is None,
    )


def preset_of(config) -> str | None:
    """The released size (`"tiny"`, `"small"`, `"base"`) whose architecture `config` has, at 224 px with patch 16 and
    both LocAtViT parts on; None for any other configuration."""
    if list(config.image_size) != [224, 224] or list(config.patch_size) != [16, 16]:
        return None
    if not (config.use_gaussian_attention and config.use_patch_refinement):
        return None
    for name, fields in PRESETS.items():
        if all(getattr(config, key) == value for key, value in fields.items()):
            return name
    return None


def count_parameters(config, task: str) -> int:
    """Parameters of the model class of `task` for `config`, counted from the architecture: the backbone, GAug's
    two maps and the task's head (docs/method.md#backbone, #variances-and-strength-from-the-query,
    #features-and-head)."""
    hidden, layers = config.hidden_size, config.num_hidden_layers
    rows, cols = config.grid_size
    patch_h, patch_w = config.patch_size
    embeddings = hidden + (1 + rows * cols) * hidden + hidden * config.num_channels * patch_h * patch_w + hidden
    qkv = 3 * (hidden * hidden + (hidden if config.qkv_bias else 0))
    gaussian = 3 * (hidden // config.num_attention_heads) + 3 if config.use_gaussian_attention else 0
    mlp = 2 * hidden * config.intermediate_size + config.intermediate_size + hidden
    layer = 4 * hidden + qkv + hidden * hidden + hidden + gaussian + mlp
    if task == "backbone":  # the blocks up to the last returned stage
        return embeddings + max(index % (layers + 1) for index in config.out_indices) * layer
    total = embeddings + layers * layer
    if task != "semantic-segmentation":
        total += 2 * hidden  # final LayerNorm, which the segmentation head does not read
    if task == "image-classification" and config.num_labels > 0:
        total += hidden * config.num_labels + config.num_labels
    elif task == "semantic-segmentation":
        decoder = config.decoder_hidden_size
        total += hidden * decoder + 2 * decoder + decoder * config.num_labels + config.num_labels
    return total


def render_model_card(
    config,
    task: str,
    repo_id: str | None = None,
    *,
    source_checkpoint: str | None = None,
    untrained: bool = False,
    model_path: str | None = None,
) -> str:
    """
    The Markdown model card (YAML metadata + text) of a LocAtViT model.

    Args:
        config: the model's `LocAtViTConfig`.
        task: `"image-classification"`, `"semantic-segmentation"`, `"feature-extraction"` (the base model) or
            `"backbone"`; it sets the Hub `pipeline_tag` and the usage snippets.
        repo_id: the Hub repo the model lives in; the snippets load it. Without one they load `model_path`.
        source_checkpoint: the original checkpoint the weights were converted from (a Hub repo id or a file).
        untrained: the weights are a random initialization (a configuration to train).
        model_path: where the snippets load the model from when there is no `repo_id` (default `path/to/model`).
    """
    if task not in TASKS:
        raise ValueError(f"Unknown task {task!r}: choose one of {sorted(TASKS)}.")
    pipeline_tag, auto_class = TASKS[task]
    model_id = repo_id or model_path or "path/to/model"
    preset = preset_of(config)
    author_source = source_checkpoint if source_checkpoint in AUTHOR_CHECKPOINTS else None
    size = f"LocAtViT-{preset.capitalize()}" if preset else "LocAtViT"
    if not (config.use_gaussian_attention or config.use_patch_refinement):
        size = "ViT (LocAtViT's plain-ViT baseline)"
    ade20k = task == "semantic-segmentation" and config.num_labels == 150

    datasets, metrics = None, None
    if preset or author_source:
        datasets = ["imagenet-1k", "scene_parse_150"] if ade20k else ["imagenet-1k"]
    if task == "image-classification":
        metrics = ["accuracy"]
    elif task == "semantic-segmentation":
        metrics = ["mean_iou"]
    license_fields = {}
    if author_source:
        license_fields = {
            "license": "other",
            "license_name": "locatvit-authors-weights",
            "license_link": f"https://huggingface.co/{author_source}",
        }
    elif untrained:
        license_fields = {"license": "apache-2.0"}
    tags = ["vision", "locatvit", "vision-transformer", pipeline_tag, "custom_code"]
    if task == "semantic-segmentation":
        tags.insert(4, "semantic-segmentation")
    data = ModelCardData(
        base_model=author_source,
        datasets=datasets,
        library_name="transformers",
        metrics=metrics,
        pipeline_tag=pipeline_tag,
        tags=tags,
        **license_fields,
    )

    titles = {
        "image-classification": f"{size} for image classification",
        "semantic-segmentation": f"{size} for semantic segmentation" + (" (ADE20K, 150 classes)" if ade20k else ""),
        "feature-extraction": f"{size} (base model, features)",
        "backbone": f"{size} backbone",
    }
    sections = [
        f"# {titles[task]}",
        "LocAtViT is the Locality-Attending Vision Transformer of Hajimiri et al. (ICLR 2026, "
        f"[arXiv:{ARXIV_ID}]({ARXIV_URL})): a plain ViT whose attention logits get a learnable, query-dependent "
        "Gaussian bias towards neighbouring patches (GAug) in every layer, and whose final tokens pass through a "
        "parameter-free self-attention (PRR) that makes the patch outputs meaningful for dense prediction. This "
        "repository holds it in the Hugging Face Transformers format of the `locatvit-hf` package; the model code "
        "travels with the weights (`trust_remote_code=True`).",
        "## Weights",
        _weights_section(config, task, source_checkpoint, author_source, untrained),
        "## Model",
        _model_table(config, task, size),
    ]
    preprocessing = _preprocessing_section(task, preset, author_source)
    if preprocessing:
        sections += ["## Preprocessing", preprocessing]
    sections += ["## How to use", _usage_section(config, task, auto_class, model_id, untrained)]
    if preset or author_source:
        sections += ["## Training", _training_section(task)]
    if preset in ("tiny", "base") or author_source:
        sections += [
            "## Results reported in the paper",
            f"These are the paper's results, not measured in this repository: {REPORTED_RESULT}. See the paper for "
            "the exact numbers.",
        ]
    elif preset == "small":
        sections += ["## Results reported in the paper", "No results for LocAtViT-Small are quoted here."]
    sections += ["## License", _license_section(author_source, untrained)]
    sections += ["## Citation", f"```bibtex\n{CITATION}\n```"]
    card = f"---\n{data.to_yaml()}\n---\n\n" + "\n\n".join(sections) + "\n"
    ModelCard(card)  # parses the YAML block: a malformed card fails here, not on the Hub
    return card


def _weights_section(config, task, source_checkpoint, author_source, untrained) -> str:
    if untrained:
        return (
            "**No trained weights.** The authors' released checkpoints that this project converts are "
            f"{' and '.join(f'`{repo}`' for repo in AUTHOR_CHECKPOINTS)} (Tiny and Base). This repository holds the "
            "configuration with randomly initialized weights (timm's ViT initialization), as a starting point for "
            "training: its predictions mean nothing until it is trained."
        )
    if source_checkpoint is None:
        return (
            "Saved with `save_pretrained` from a `locatvit-hf` LocAtViT model. This card was generated automatically "
            "and does not know how the weights were trained: edit it to say so."
        )
    if author_source:
        origin = (
            f"Converted from the authors' released checkpoint [`{author_source}`](https://huggingface.co/"
            f"{author_source}) (timm format; see its model card for how it was trained)"
        )
    else:
        origin = f"Converted from the original-format checkpoint `{Path(source_checkpoint).name}`"
    text = (
        f"{origin} with `python -m locatvit_hf.convert`. The conversion only renames tensors and splits the fused "
        "qkv projection into q, k and v; the converted model reproduces the original implementation's outputs to "
        "float32 round-off."
    )
    if task == "semantic-segmentation":
        text += (
            " The backbone is the converted one. **The segmentation head is newly initialized and untrained**: no "
            "trained head comes with this repository. Train it with the paper's protocol (below) before use; until "
            "then the masks mean nothing."
        )
        if _generic_labels(config):
            text += (
                f" `id2label` holds generic names (`LABEL_0` ... `LABEL_{config.num_labels - 1}`); training with "
                "class names (e.g. `--label_names_file objectInfo150.csv` for ADE20K) sets the real ones."
            )
    if task == "image-classification":
        text += _class_names_note(config)
    return text


def _class_names_note(config) -> str:
    """Where the class names of a converted classifier come from: the original checkpoints carry none."""
    if _generic_labels(config):
        return (
            f" The original checkpoint carries no class names, so `id2label` holds `LABEL_0` ... "
            f"`LABEL_{config.num_labels - 1}`."
        )
    if config.num_labels == IMAGENET_NUM_CLASSES and config.id2label == imagenet_id2label():
        return (
            " The original checkpoint carries no class names; its 1000 classes are ImageNet-1k's, so `id2label` holds "
            "the ImageNet-1k class names (torchvision's list, in the class order that timm and torchvision share): "
            "predictions read e.g. `tabby`, not `LABEL_281`."
        )
    return ""


def _generic_labels(config) -> bool:
    return all(str(label) == f"LABEL_{index}" for index, label in config.id2label.items())


def _model_table(config, task, size) -> str:
    rows = [
        ("architecture", size),
        (
            "hidden size / layers / heads / MLP",
            f"{config.hidden_size} / {config.num_hidden_layers} / "
            f"{config.num_attention_heads} / {config.intermediate_size}",
        ),
        ("patch size / image size", f"{config.patch_size[0]} / {config.image_size[0]}x{config.image_size[1]}"),
        ("Gaussian attention bias (GAug)", "yes" if config.use_gaussian_attention else "no"),
        ("patch representation refinement (PRR)", "yes" if config.use_patch_refinement else "no"),
    ]
    if task in ("image-classification", "semantic-segmentation"):
        rows.append(("classes", str(config.num_labels)))
    rows.append(("parameters", f"{count_parameters(config, task):,}"))
    outputs = {
        "image-classification": "logits of a linear classifier on the PRR-refined CLS token",
        "semantic-segmentation": "logits at 1/16 of the input resolution, from the paper's linear head (1x1 conv, "
        "GroupNorm, GELU, 1x1 conv) on the last block's patch tokens",
        "feature-extraction": "`last_hidden_state` = PRR(LayerNorm(last block)), CLS token first; `pooler_output` = "
        "its CLS token",
        "backbone": "(batch, hidden, H/16, W/16) feature maps of the chosen blocks",
    }
    rows.append(("output", outputs[task]))
    return "| | |\n|---|---|\n" + "\n".join(f"| {key} | {value} |" for key, value in rows)


def _preprocessing_section(task, preset, author_source) -> str | None:
    if not (preset or author_source):
        return "As in `preprocessor_config.json` (`AutoImageProcessor`), where the repository has one."
    if task == "semantic-segmentation":
        return (
            "The paper's test-time protocol (`preprocessor_config.json`): resize to fit within 2048x512 keeping the "
            "aspect ratio (bilinear), ImageNet mean and std, and whole-image inference: the position embeddings are "
            "resampled to the image's patch grid (`interpolate_pos_encoding`, on in the config) and the logits are resized "
            "bilinearly to the image before the argmax (`post_process_semantic_segmentation`)."
        )
    return (
        "That of the released models (`preprocessor_config.json`): resize the shorter side to 248 (bicubic), "
        "center-crop 224, scale to [0, 1], normalize with mean = std = (0.5, 0.5, 0.5)."
    )


def _usage_section(config, task, auto_class, model_id, untrained) -> str:
    load = f'"{model_id}", trust_remote_code=True'
    intro = (
        "The snippets read a local image, `image.jpg`. `trust_remote_code=True` runs the model code stored in this "
        "repository; with the `locatvit-hf` package imported, its own classes are used instead."
    )
    grid = config.grid_size[0] * config.grid_size[1]
    if untrained and task == "image-classification":
        blocks = [
            "import torch\n"
            "from transformers import AutoModelForImageClassification\n\n"
            f"model = AutoModelForImageClassification.from_pretrained({load})\n"
            "pixel_values = torch.randn(2, 3, *model.config.image_size)\n"
            "loss = model(pixel_values, labels=torch.tensor([0, 1])).loss  # a training step starts here\n"
            "loss.backward()\n"
            "print(loss.item())"
        ]
        intro = (
            "The weights are untrained: load the model to train it (e.g. with `examples/run_image_classification.py`"
            " of `locatvit-hf`). `trust_remote_code=True` runs the model code stored in this repository."
        )
    elif task == "image-classification":
        blocks = [
            "from transformers import pipeline\n\n"
            f'classifier = pipeline("image-classification", model={load})\n'
            'print(classifier("image.jpg"))  # [{"label": ..., "score": ...}, ...], best first',
            "import torch\n"
            "from PIL import Image\n"
            "from transformers import AutoImageProcessor, AutoModelForImageClassification\n\n"
            f"processor = AutoImageProcessor.from_pretrained({load})\n"
            f"model = AutoModelForImageClassification.from_pretrained({load})\n"
            'inputs = processor(Image.open("image.jpg").convert("RGB"), return_tensors="pt")\n'
            "with torch.no_grad():\n"
            "    logits = model(**inputs).logits\n"
            "print(model.config.id2label[logits.argmax(-1).item()])",
            "from transformers import pipeline\n\n"
            f'extractor = pipeline("image-feature-extraction", model={load})\n'
            'features = extractor("image.jpg")  # nested lists: [1 image][CLS + '
            f"{grid} patches][{config.hidden_size}]\n"
            "print(len(features[0]), len(features[0][0]))",
        ]
    elif task == "semantic-segmentation":
        blocks = [
            "from transformers import pipeline\n\n"
            f'segmenter = pipeline("image-segmentation", model={load})\n'
            'for segment in segmenter("image.jpg"):  # one mask per class present, at the image\'s size\n'
            '    print(segment["label"], segment["mask"].size)',
            "import torch\n"
            "from PIL import Image\n"
            "from transformers import AutoImageProcessor, AutoModelForSemanticSegmentation\n\n"
            f"processor = AutoImageProcessor.from_pretrained({load})\n"
            f"model = AutoModelForSemanticSegmentation.from_pretrained({load})\n"
            'image = Image.open("image.jpg").convert("RGB")\n'
            'inputs = processor(image, return_tensors="pt")\n'
            "with torch.no_grad():  # any image size: the position embeddings are resampled to its grid\n"
            "    outputs = model(**inputs, interpolate_pos_encoding=True)\n"
            "segmentation = processor.post_process_semantic_segmentation(outputs, target_sizes=[image.size[::-1]])[0]\n"
            "print(segmentation.shape, [model.config.id2label[i] for i in segmentation.unique().tolist()])",
        ]
    elif task == "feature-extraction":
        blocks = [
            "from transformers import pipeline\n\n"
            f'extractor = pipeline("image-feature-extraction", model={load})\n'
            'features = extractor("image.jpg")  # nested lists: [1 image][CLS + '
            f"{grid} patches][{config.hidden_size}]\n"
            "print(len(features[0]), len(features[0][0]))"
        ]
    else:
        blocks = [
            "import torch\n"
            "from PIL import Image\n"
            "from transformers import AutoBackbone, AutoImageProcessor\n\n"
            f"processor = AutoImageProcessor.from_pretrained({load})\n"
            f"backbone = AutoBackbone.from_pretrained({load})\n"
            'inputs = processor(Image.open("image.jpg").convert("RGB"), return_tensors="pt")\n'
            "with torch.no_grad():\n"
            "    feature_maps = backbone(**inputs).feature_maps  # one (1, hidden, H/16, W/16) map per stage\n"
            "print([tuple(f.shape) for f in feature_maps])"
        ]
    return intro + "\n\n" + "\n\n".join(f"```python\n{block}\n```" for block in blocks)


def _training_section(task) -> str:
    if task == "semantic-segmentation":
        return (
            "The paper's protocol: frozen backbone in eval mode, only the linear head "
            "trains; AdamW (lr 1e-3, weight decay 0.01), one-cycle schedule over 20,000 iterations with 25 % warm-up, "
            "batch 32, random 512x512 crops, cross-entropy with ignore index 255 (ADE20K's label 0 is ignored, the "
            "others shift down by one). `examples/run_semantic_segmentation.py` of `locatvit-hf` runs it; these "
            "are its defaults."
        )
    return (
        "The paper's ImageNet-1k recipe from scratch: AdamW (weight decay 0.05), gradient clipping 5, one-cycle "
        "schedule over 300 epochs with 20 warm-up (lr 1e-3 at batch 1024 for Base), RandAugment, Mixup 0.8, CutMix 1.0, label smoothing 0.1, random "
        "erasing 0.25, mixed precision. `examples/run_image_classification.py` of `locatvit-hf` trains with the paper's "
        "augmentation and optimizer settings by default."
    )


def _license_section(author_source, untrained) -> str:
    code = "The code files (`*.py`) are Apache-2.0, from `locatvit-hf`."
    if author_source:
        return (
            f"{code} The weights are converted from the authors' release [`{author_source}`](https://huggingface.co/"
            f"{author_source}) and come under that release's terms: see its model card."
        )
    if untrained:
        return f"{code} The randomly initialized weights are Apache-2.0 too."
    return f"{code} Add the license of the weights here."


def write_release_cards(folder: str | Path) -> list[Path]:
    """Write `<name>.md` for every release into `folder`; returns the paths."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for name in RELEASES:
        path = folder / f"{name}.md"
        path.write_text(render_release_card(name), encoding="utf-8")
        paths.append(path)
    return paths


def stale_release_cards(folder: str | Path) -> list[str]:
    """Names of the release cards in `folder` that are missing or differ from what this module renders."""
    folder = Path(folder)
    stale = []
    for name in RELEASES:
        path = folder / f"{name}.md"
        if not path.is_file() or path.read_text(encoding="utf-8") != render_release_card(name):
            stale.append(name)
    return stale


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m locatvit_hf.modelcard_locatvit", description="Render the model cards of the releases."
    )
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument("--write", metavar="FOLDER", help="write <release>.md for every release into FOLDER")
    group.add_argument("--check", metavar="FOLDER", help="exit with code 1 if a card in FOLDER is out of date")
    args = parser.parse_args(argv)
    if args.write:
        for path in write_release_cards(args.write):
            print(f"wrote {path}")
        return 0
    stale = stale_release_cards(args.check)
    for name in stale:
        print(
            f"{Path(args.check) / name}.md is out of date: run python -m locatvit_hf.modelcard_locatvit --write "
            f"{args.check}",
            file=sys.stderr,
        )
    return 1 if stale else 0


if __name__ == "__main__":
    sys.exit(main())
