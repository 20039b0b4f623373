"""`pipeline(...)` on saved LocAtViT folders: image classification, semantic segmentation and feature extraction, on the
real photos of `../shared/samples/` (or drawn images when that folder is absent), checked against the model run by
hand, and without the "model is not supported" message of the pipelines."""

import csv
import logging
import warnings
from contextlib import contextmanager

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw
from transformers import pipeline

from locatvit_hf import (
    LocAtViTForImageClassification,
    LocAtViTForSemanticSegmentation,
    LocAtViTImageProcessor,
    LocAtViTModel,
)

from .conftest import SAMPLES_DIR, tiny_config
from .test_hub import tiny_processor

NUM_LABELS = 5
UNSUPPORTED = "is not supported"


def class_names() -> list[str]:
    """The first ADE20K class names (from the samples' objectInfo150.csv when present)."""
    info = SAMPLES_DIR / "ade20k" / "objectInfo150.csv"
    if info.is_file():
        with info.open(newline="") as file:
            return [row["Name"].split(";")[0] for row in csv.DictReader(file)][:NUM_LABELS]
    return ["wall", "building", "sky", "floor", "tree"]


def drawn_image(width: int, height: int, seed: int) -> Image.Image:
    generator = np.random.default_rng(seed)
    image = Image.new("RGB", (width, height), tuple(int(v) for v in generator.integers(0, 256, 3)))
    draw = ImageDraw.Draw(image)
    for _ in range(6):
        x0, y0 = int(generator.integers(0, width - 8)), int(generator.integers(0, height - 8))
        x1, y1 = x0 + int(generator.integers(4, width)), y0 + int(generator.integers(4, height))
        fill = tuple(int(v) for v in generator.integers(0, 256, 3))
        (draw.rectangle if generator.random() < 0.5 else draw.ellipse)((x0, y0, x1, y1), fill=fill)
    return image


def load_images() -> dict[str, Image.Image]:
    paths = sorted(SAMPLES_DIR.glob("*/images/*.jpg")) if SAMPLES_DIR.is_dir() else []
    if paths:
        return {path.stem: Image.open(path).convert("RGB") for path in paths}
    return {"drawn-97x61": drawn_image(97, 61, 0), "drawn-40x88": drawn_image(40, 88, 1)}


IMAGES = load_images()


@contextmanager
def captured_logs():
    """Collects the warnings and errors Transformers logs (its logger does not propagate to the root) and the Python
    warnings raised meanwhile."""
    records: list[logging.LogRecord] = []

    class Collect(logging.Handler):
        def emit(self, record):
            records.append(record)

    handler = Collect(level=logging.WARNING)
    logger = logging.getLogger("transformers")
    logger.addHandler(handler)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            yield records, caught
    finally:
        logger.removeHandler(handler)


def messages(records, caught) -> list[str]:
    return [record.getMessage() for record in records] + [str(warning.message) for warning in caught]


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """Saved folders as the converter writes them: a classifier, and a segmenter with the protocol's fit-within
    preprocessing (images keep their aspect ratio) and `interpolate_pos_encoding` on in its config."""
    torch.manual_seed(0)
    id2label = dict(enumerate(class_names()))
    root = tmp_path_factory.mktemp("pipelines")
    classifier = LocAtViTForImageClassification(tiny_config(id2label=id2label)).eval()
    classifier.save_pretrained(root / "classifier")
    tiny_processor("image-classification").save_pretrained(root / "classifier")
    segmenter = LocAtViTForSemanticSegmentation(tiny_config(id2label=id2label, interpolate_pos_encoding=True)).eval()
    segmenter.save_pretrained(root / "segmenter")
    tiny_processor("semantic-segmentation").save_pretrained(root / "segmenter")
    return {"root": root, "classifier": classifier, "segmenter": segmenter}


@pytest.fixture(scope="module")
def pipelines(saved):
    """The three pipelines, built from the folders as a user would, with the logs of building them."""
    root = saved["root"]
    built, logs = {}, {}
    for task, folder in [
        ("image-classification", "classifier"),
        ("image-segmentation", "segmenter"),
        ("image-feature-extraction", "classifier"),
    ]:
        with captured_logs() as (records, caught):
            built[task] = pipeline(task, model=str(root / folder), trust_remote_code=True)
            built[task](next(iter(IMAGES.values())))
        logs[task] = messages(records, caught)
    return built, logs


@pytest.mark.parametrize("name", list(IMAGES))
def test_image_classification_pipeline(pipelines, saved, name):
    classifier = pipelines[0]["image-classification"]
    image = IMAGES[name]
    assert type(classifier.model) is LocAtViTForImageClassification
    assert type(classifier.image_processor) is LocAtViTImageProcessor

    predictions = classifier(image)
    assert [set(p) for p in predictions] == [{"label", "score"}] * NUM_LABELS
    assert sorted(p["label"] for p in predictions) == sorted(class_names())
    scores = [p["score"] for p in predictions]
    assert scores == sorted(scores, reverse=True)
    assert sum(scores) == pytest.approx(1.0, abs=1e-5)

    inputs = classifier.image_processor(image, return_tensors="pt")
    assert inputs["pixel_values"].shape == (1, 3, 32, 32)
    with torch.no_grad():
        probabilities = saved["classifier"](**inputs).logits.softmax(-1)[0]
    expected = sorted(((p.item(), class_names()[i]) for i, p in enumerate(probabilities)), reverse=True)
    assert [p["label"] for p in predictions] == [label for _, label in expected]
    assert scores == pytest.approx([score for score, _ in expected], abs=1e-6)
    assert len(classifier(image, top_k=2)) == 2


def test_image_classification_pipeline_batch(pipelines):
    classifier = pipelines[0]["image-classification"]
    images = list(IMAGES.values())[:2]
    outputs = classifier(images, top_k=3)
    assert len(outputs) == 2 and all(len(output) == 3 for output in outputs)
    assert outputs == [classifier(image, top_k=3) for image in images]


def check_segments(segments, image: Image.Image, id2label: dict, class_map: torch.Tensor) -> None:
    """One binary mask per class present, at the image's size, covering the image without overlap, labelled from
    `id2label`, equal to `class_map == class`."""
    present = class_map.unique().tolist()
    assert [segment["label"] for segment in segments] == [id2label[c] for c in present]
    coverage = np.zeros((image.height, image.width), dtype=np.int64)
    for segment, class_id in zip(segments, present):
        assert set(segment) == {"score", "label", "mask"} and segment["score"] is None
        mask = segment["mask"]
        assert isinstance(mask, Image.Image) and mask.mode == "L" and mask.size == image.size
        values = np.array(mask)
        assert set(np.unique(values).tolist()) <= {0, 255}
        np.testing.assert_array_equal(values == 255, class_map.numpy() == class_id)
        coverage += values == 255
    assert (coverage == 1).all()


def expected_class_map(model, processor, image: Image.Image, **forward_kwargs) -> torch.Tensor:
    inputs = processor(image, return_tensors="pt")
    with torch.no_grad():
        outputs = model(**inputs, **forward_kwargs)
    return processor.post_process_semantic_segmentation(outputs, target_sizes=[(image.height, image.width)])[0]


@pytest.mark.parametrize("name", list(IMAGES))
def test_image_segmentation_pipeline(pipelines, saved, name):
    segmenter = pipelines[0]["image-segmentation"]
    image = IMAGES[name]
    assert type(segmenter.model) is LocAtViTForSemanticSegmentation
    assert type(segmenter.image_processor) is LocAtViTImageProcessor

    inputs = segmenter.image_processor(image, return_tensors="pt")
    assert min(inputs["pixel_values"].shape[-2:]) == 32  # the whole image, shorter side 32, aspect ratio kept
    assert inputs["pixel_values"].shape[-2:] != (32, 32) or image.width == image.height

    segments = segmenter(image, subtask="semantic")
    class_map = expected_class_map(saved["segmenter"], segmenter.image_processor, image)
    assert class_map.shape == (image.height, image.width)
    check_segments(segments, image, saved["segmenter"].config.id2label, class_map)
    # Without a subtask the pipeline falls back to the semantic one: the model has no panoptic or instance output.
    default = segmenter(image)
    assert [s["label"] for s in default] == [s["label"] for s in segments]
    assert all(np.array_equal(np.array(a["mask"]), np.array(b["mask"])) for a, b in zip(default, segments))


@pytest.mark.parametrize("name", list(IMAGES))
def test_image_feature_extraction_pipeline(pipelines, saved, name):
    extractor = pipelines[0]["image-feature-extraction"]
    image = IMAGES[name]
    assert type(extractor.model) is LocAtViTModel

    features = extractor(image)
    grid = 32 // 8
    assert len(features) == 1 and len(features[0]) == 1 + grid * grid
    assert {len(token) for token in features[0]} == {32}
    inputs = extractor.image_processor(image, return_tensors="pt")
    with torch.no_grad():
        expected = saved["classifier"].locatvit(**inputs)
    torch.testing.assert_close(torch.tensor(features), expected.last_hidden_state, rtol=0, atol=1e-6)
    pooled = extractor(image, pool=True)
    torch.testing.assert_close(torch.tensor(pooled), expected.pooler_output, rtol=0, atol=1e-6)
    tensors = extractor(image, return_tensors=True)
    assert isinstance(tensors, torch.Tensor) and tensors.shape == (1, 1 + grid * grid, 32)


@pytest.mark.parametrize(
    "task",
    [
        "image-classification",
        "image-segmentation",
        "image-feature-extraction",
    ],
)
def test_pipeline_logs_no_unsupported_model_message(pipelines, task):
    logged = pipelines[1][task]
    assert not [message for message in logged if UNSUPPORTED in message], logged


@pytest.mark.parametrize(
    ("task", "folder"),
    [
        ("image-classification", "classifier"),
        ("image-segmentation", "segmenter"),
        ("image-feature-extraction", "classifier"),
    ],
)
def test_pipeline_with_the_package_imported_asks_nothing(saved, monkeypatch, task, folder):
    """With `locatvit_hf` imported and `trust_remote_code` left unset, a pipeline on a saved folder runs the package's
    own classes and never stops to ask whether to run the folder's code (Transformers asks with `input()`)."""
    questions = []
    monkeypatch.setattr("builtins.input", lambda prompt="": questions.append(prompt) or "n")
    built = pipeline(task, model=str(saved["root"] / folder))
    assert not questions, questions
    for component in (built.model, built.image_processor):
        assert type(component).__module__.startswith("locatvit_hf."), type(component)
    assert built(next(iter(IMAGES.values())))


def test_log_capture_sees_an_unsupported_model_message(saved):
    """The capture above is live: a LocAtViT classifier given to the segmentation pipeline is reported."""
    with captured_logs() as (records, caught):
        pipeline("image-segmentation", model=saved["classifier"], image_processor=tiny_processor("x"))
    assert any(UNSUPPORTED in message for message in messages(records, caught))
