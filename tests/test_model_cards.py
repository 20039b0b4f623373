"""The model cards: `model_cards/*.md` are what the renderer produces, their metadata and claims are right, their Python
snippets run as written (against tiny models in an offline Hub cache), and the converter renders the card of what it
converted."""

import json
import re
import shutil
from pathlib import Path

import huggingface_hub
import pytest
from huggingface_hub import ModelCard
from safetensors.torch import save_file

from locatvit_hf import (
    LocAtViTBackbone,
    LocAtViTConfig,
    LocAtViTForImageClassification,
    LocAtViTForSemanticSegmentation,
    LocAtViTModel,
)
from locatvit_hf.convert import convert, main
from locatvit_hf.modelcard_locatvit import (
    RELEASES,
    REPORTED_RESULT,
    count_parameters,
    release_config,
    render_model_card,
    render_release_card,
)
from locatvit_hf.modelcard_locatvit import (
    main as cards_main,
)

from .conftest import SAMPLES_DIR, tiny_config
from .test_convert import timm_state_dict
from .test_hub import CARD, MODEL_FILES, PROCESSOR_FILES, HubRecorder, fill_hub_cache, run_offline, save_tiny_repo

CARDS_DIR = Path(__file__).resolve().parents[1] / "model_cards"
EXPECTED_METADATA = {
    "locatvit-tiny": ("image-classification", ["imagenet-1k"], ["accuracy"], "sinahmr/locatvit_tiny"),
    "locatvit-small": ("image-classification", ["imagenet-1k"], ["accuracy"], None),
    "locatvit-base": ("image-classification", ["imagenet-1k"], ["accuracy"], "sinahmr/locatvit_base"),
    "locatvit-tiny-ade20k": (
        "image-segmentation",
        ["imagenet-1k", "scene_parse_150"],
        ["mean_iou"],
        "sinahmr/locatvit_tiny",
    ),
}
TINY_TIMM_CONFIG = {
    "architecture": "locatvit_tiny_patch16_224",
    "num_classes": 1000,
    "pretrained_cfg": {
        "input_size": [3, 224, 224],
        "mean": [0.5, 0.5, 0.5],
        "std": [0.5, 0.5, 0.5],
        "crop_pct": 0.9,
        "interpolation": "bicubic",
    },
}


def python_blocks(markdown: str) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", markdown, flags=re.MULTILINE | re.DOTALL)


def section(markdown: str, title: str) -> str:
    """The text of the `## title` section (up to the next `## `), or '' if absent."""
    match = re.search(rf"^## {re.escape(title)}\n(.*?)(?=^## |\Z)", markdown, flags=re.MULTILINE | re.DOTALL)
    return match.group(1) if match else ""


def write_snippet_image(folder: Path) -> Path:
    """`image.jpg`, the local image the snippets read: a real photo when the samples are there."""
    path = folder / "image.jpg"
    sample = SAMPLES_DIR / "ade20k" / "images" / "ADE_val_00000003.jpg"
    if sample.is_file():
        shutil.copyfile(sample, path)
    else:
        from .test_pipelines import drawn_image

        drawn_image(97, 61, 0).save(path)
    return path


def make_release_hub(root: Path) -> tuple[Path, Path]:
    """An offline Hub cache holding a tiny model of the right task under every release's repo id, and a working
    folder with `image.jpg`. Returns (HF_HOME, working folder)."""
    hf_home, work = root / "hf_home", root / "work"
    work.mkdir(parents=True)
    write_snippet_image(work)
    for name, release in RELEASES.items():
        repo = save_tiny_repo(root / "repos" / name, release.task)
        fill_hub_cache(hf_home, f"locatvit-hf/{name}", repo)
    return hf_home, work


@pytest.fixture(scope="module")
def release_hub(tmp_path_factory):
    return make_release_hub(tmp_path_factory.mktemp("release_hub"))


def card_text(name: str) -> str:
    return (CARDS_DIR / f"{name}.md").read_text(encoding="utf-8")


# ---------------------------------------------------------------------------------------------------------------------
# The committed cards


@pytest.mark.parametrize("name", list(RELEASES))
def test_committed_card_is_what_the_renderer_produces(name):
    assert (CARDS_DIR / f"{name}.md").is_file(), "run: python -m locatvit_hf.modelcard_locatvit --write model_cards"
    assert card_text(name) == render_release_card(name), (
        "out of date: run python -m locatvit_hf.modelcard_locatvit --write model_cards"
    )


def test_one_card_per_release():
    assert sorted(path.stem for path in CARDS_DIR.glob("*.md")) == sorted(RELEASES)


def test_card_command_writes_and_checks(tmp_path):
    assert cards_main(["--check", str(CARDS_DIR)]) == 0
    assert cards_main(["--write", str(tmp_path)]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(f"{name}.md" for name in RELEASES)
    assert cards_main(["--check", str(tmp_path)]) == 0
    (tmp_path / "locatvit-base.md").write_text(card_text("locatvit-base").replace("Base", "Huge"))
    assert cards_main(["--check", str(tmp_path)]) == 1
    (tmp_path / "locatvit-base.md").unlink()
    assert cards_main(["--check", str(tmp_path)]) == 1


@pytest.mark.parametrize("name", list(RELEASES))
def test_card_metadata(name):
    pipeline_tag, datasets, metrics, base_model = EXPECTED_METADATA[name]
    data = ModelCard(card_text(name)).data
    assert data.library_name == "transformers"
    assert data.pipeline_tag == pipeline_tag
    assert {"locatvit", "vision", "custom_code", pipeline_tag} <= set(data.tags)
    assert data.datasets == datasets
    assert data.metrics == metrics
    assert data.base_model == base_model
    if base_model:  # the authors' weights: their terms, linked
        assert (data.license, data.license_link) == ("other", f"https://huggingface.co/{base_model}")
        assert data.license_name
    else:  # nothing but this project's code and a random initialization
        assert data.license == "apache-2.0"


@pytest.mark.parametrize("name", list(RELEASES))
def test_card_quotes_only_the_papers_reported_results(name):
    results = section(card_text(name), "Results reported in the paper")
    assert results, "the card has no results section"
    # Only the numbers the paper reports (docs/method.md#reported-results: about 6 and 4 mIoU; ImageNet-1k top-1):
    # none made up.
    numbers = re.findall(r"\d+(?:\.\d+)?", re.sub(r"ADE20K|ImageNet-1k|top-1|LocAtViT-\w+", "", results))
    assert set(numbers) <= {"6", "4"}
    if RELEASES[name].preset in ("tiny", "base"):
        assert REPORTED_RESULT in results and "the paper's results, not measured in this repository" in results
    else:
        assert "No results" in results


@pytest.mark.parametrize("name", list(RELEASES))
def test_card_says_what_the_weights_are(name):
    text = card_text(name)
    weights = section(text, "Weights")
    release = RELEASES[name]
    assert "sinahmr/locatvit_small" not in text
    if release.source_checkpoint is None:
        assert "No trained weights" in weights and "randomly initialized" in weights
    else:
        assert f"the authors' released checkpoint [`{release.source_checkpoint}`]" in weights
    if release.task == "semantic-segmentation":
        assert "The segmentation head is newly initialized and untrained" in weights
    assert f"locatvit-hf/{name}" in section(text, "How to use")


@pytest.mark.parametrize("name", list(RELEASES))
def test_card_cites_the_paper(name):
    citation = section(card_text(name), "Citation")
    assert "@inproceedings{" in citation and "Locality-Attending Vision Transformer" in citation
    assert "2603.04892" in citation and "2026" in citation


@pytest.mark.parametrize(
    "name, index",
    [(name, index) for name in RELEASES for index in range(len(python_blocks(card_text(name))))],
)
def test_card_snippet_runs(release_hub, name, index):
    hf_home, work = release_hub
    block = python_blocks(card_text(name))[index]
    assert f'"locatvit-hf/{name}"' in block
    result = run_offline(block, hf_home, work)
    assert result.returncode == 0, f"{name} block {index}:\n{block}\n{result.stdout[-2000:]}{result.stderr[-4000:]}"
    assert result.stdout.strip(), "the snippet printed nothing"


def test_every_card_has_snippets():
    counts = {name: len(python_blocks(card_text(name))) for name in RELEASES}
    assert counts == {"locatvit-tiny": 3, "locatvit-small": 1, "locatvit-base": 3, "locatvit-tiny-ade20k": 2}


# ---------------------------------------------------------------------------------------------------------------------
# The renderer


@pytest.mark.parametrize(
    "model_class, task",
    [
        (LocAtViTForImageClassification, "image-classification"),
        (LocAtViTForSemanticSegmentation, "semantic-segmentation"),
        (LocAtViTModel, "feature-extraction"),
        (LocAtViTBackbone, "backbone"),
    ],
)
@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {"use_gaussian_attention": False, "use_patch_refinement": False},
        {"qkv_bias": False, "image_size": [32, 48]},
        {"out_indices": [1]},
    ],
)
def test_count_parameters_matches_the_model(model_class, task, overrides):
    config = tiny_config(**overrides)
    assert count_parameters(config, task) == model_class(config).num_parameters()


def test_count_parameters_of_tiny_is_specs():
    config = release_config("locatvit-tiny")
    assert count_parameters(config, "image-classification") == 5_719_756  # docs/method.md#backbone
    assert "| parameters | 5,719,756 |" in card_text("locatvit-tiny")


def test_card_of_a_custom_model_claims_nothing(tmp_path):
    model = LocAtViTForSemanticSegmentation(tiny_config())
    model.save_pretrained(tmp_path)
    card = ModelCard(render_model_card(model.config, "semantic-segmentation", model_path=str(tmp_path)))
    assert card.data.pipeline_tag == "image-segmentation"
    assert card.data.license is None and card.data.datasets is None and card.data.base_model is None
    assert "does not know how the weights were trained" in card.text
    assert "Results reported in the paper" not in card.text
    assert f'"{tmp_path}", trust_remote_code=True' in card.text


def test_render_model_card_rejects_an_unknown_task():
    with pytest.raises(ValueError, match="Unknown task"):
        render_model_card(LocAtViTConfig(), "depth-estimation")


# ---------------------------------------------------------------------------------------------------------------------
# The converter renders the card of what it converted


@pytest.fixture
def authors_tiny_on_the_hub(tmp_path, monkeypatch):
    """`sinahmr/locatvit_tiny` as the Hub cache holds it (timm weights of LocAtViT-Tiny, random values), offline."""
    original = tmp_path / "original"
    original.mkdir()
    state_dict = timm_state_dict(hidden=192, depth=12, heads=3, grid=14, patch=16, classes=1000)
    save_file(state_dict, str(original / "model.safetensors"))
    (original / "config.json").write_text(json.dumps(TINY_TIMM_CONFIG))
    hf_home = tmp_path / "hf_home"
    fill_hub_cache(hf_home, "sinahmr/locatvit_tiny", original)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(hf_home / "hub"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    return hf_home


@pytest.mark.parametrize(
    "name, task", [("locatvit-tiny", "image-classification"), ("locatvit-tiny-ade20k", "semantic-segmentation")]
)
def test_converter_pushes_the_release_with_its_committed_card(
    tmp_path, monkeypatch, authors_tiny_on_the_hub, name, task
):
    hub = HubRecorder(monkeypatch)
    output = tmp_path / "converted"
    model = convert("sinahmr/locatvit_tiny", str(output), task, push_to_hub=f"locatvit-hf/{name}")

    assert hub.repos == [f"locatvit-hf/{name}"]
    assert set(hub.files) == MODEL_FILES | PROCESSOR_FILES | {CARD}
    assert hub.files["README.md"].decode() == card_text(name)
    assert (output / "README.md").read_text() == card_text(name)
    assert model.interpolates(None) is (task == "semantic-segmentation")
    assert model.num_parameters() == count_parameters(model.config, task)


@pytest.mark.parametrize(
    "task, pipeline_tag",
    [
        ("image-classification", "image-classification"),
        ("semantic-segmentation", "image-segmentation"),
        ("backbone", "image-feature-extraction"),
    ],
)
def test_converter_cli_card_follows_the_task(tmp_path, monkeypatch, task, pipeline_tag):
    hub = HubRecorder(monkeypatch)
    checkpoint = tmp_path / "my_checkpoint.safetensors"
    save_file(timm_state_dict(), str(checkpoint))
    output = tmp_path / "out"
    output.mkdir()
    (output / "notes.txt").write_text("not part of the model")

    assert (
        main(["--checkpoint", str(checkpoint), "--output", str(output), "--task", task, "--push-to-hub", "me/x"]) == 0
    )

    assert "notes.txt" not in hub.files and "README.md" in hub.files
    assert PROCESSOR_FILES <= set(hub.files)
    card = ModelCard(hub.files["README.md"].decode())
    assert card.data.pipeline_tag == pipeline_tag
    assert card.data.license is None and card.data.base_model is None  # not the authors' release: no claims
    assert "original-format checkpoint `my_checkpoint.safetensors`" in card.text and str(tmp_path) not in card.text
    assert '"me/x", trust_remote_code=True' in card.text
    assert (output / "README.md").read_bytes() == hub.files["README.md"]


def test_converter_without_push_writes_the_card_next_to_the_weights(tmp_path, monkeypatch):
    HubRecorder(monkeypatch)  # no Hub call may happen
    checkpoint = tmp_path / "ckpt.safetensors"
    save_file(timm_state_dict(), str(checkpoint))
    output = tmp_path / "out"
    convert(str(checkpoint), str(output), "semantic-segmentation")
    assert {p.name for p in output.iterdir()} == MODEL_FILES | PROCESSOR_FILES | {CARD}
    card = ModelCard.load(output / "README.md")
    assert card.data.pipeline_tag == "image-segmentation"
    assert f'"{output}", trust_remote_code=True' in card.text
