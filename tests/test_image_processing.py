"""The LocAtViT image processors reproduce the paper's classification and segmentation preprocessing
(docs/method.md#classification-pre-training, #data)."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms import v2
from transformers import AutoImageProcessor
from transformers.modeling_outputs import SemanticSegmenterOutput

from locatvit_hf.image_processing_locatvit import LocAtViTImageProcessor, LocAtViTImageProcessorPil

SAMPLES_DIR = Path(__file__).resolve().parents[2] / "shared" / "samples"
BACKENDS = [LocAtViTImageProcessor, LocAtViTImageProcessorPil]
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)

# Largest differences measured on the five sample photos, in normalized units: one uint8 step is 1/255/std.
# Each backend against its torchvision reference: 1.2e-7 (float rounding only).
REFERENCE_ATOL = 1e-5
# torchvision against PIL backend: bicubic/bilinear rounding to uint8 differs by at most 2 steps, on a handful of
# pixels (mean 3e-5 classification, 5e-6 segmentation).
CLASSIFICATION_BACKENDS_ATOL = 2 / 255 / 0.5 + 1e-5
SEGMENTATION_BACKENDS_ATOL = 1 / 255 / min(IMAGENET_STD) + 1e-5
BACKENDS_MEAN_ATOL = 1e-4
# Nearest neighbour: torchvision's NEAREST_EXACT and PIL's NEAREST pick the same source pixel except on isolated
# rows/columns where the source coordinate is a float tie (at most 0.12 % of the pixels, on a 224 crop).
LABELS_BACKENDS_MAX_MISMATCH = 0.002


def load_sample(relative_path: str) -> Image.Image:
    path = SAMPLES_DIR / relative_path
    if not path.is_file():
        pytest.skip(f"{path} is absent: the real sample images are needed")
    return Image.open(path)


def random_image(height: int, width: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(0).integers(0, 256, (height, width, 3), dtype=np.uint8))


def timm_reference(image: Image.Image, on_pil: bool) -> torch.Tensor:
    """The released models' eval transform, resizing the PIL image (as timm does) or its uint8 tensor."""
    resize_and_crop = [v2.Resize(248, interpolation=v2.InterpolationMode.BICUBIC, antialias=True), v2.CenterCrop(224)]
    steps = [*resize_and_crop, v2.ToImage()] if on_pil else [v2.ToImage(), *resize_and_crop]
    return v2.Compose([*steps, v2.ToDtype(torch.float32, scale=True), v2.Normalize([0.5] * 3, [0.5] * 3)])(image)


def test_classification_defaults_match_torchvision():
    image = load_sample("ade20k/images/ADE_train_00000001.jpg")
    assert image.size == (683, 512)

    pixel_values = LocAtViTImageProcessor()(image, return_tensors="pt").pixel_values

    assert pixel_values.shape == (1, 3, 224, 224)
    assert pixel_values.min() >= -1 and pixel_values.max() <= 1
    assert pixel_values.min() < -0.5 and pixel_values.max() > 0.5  # mean = std = 0.5, not ImageNet's
    torch.testing.assert_close(pixel_values[0], timm_reference(image, on_pil=False), atol=REFERENCE_ATOL, rtol=0)


def test_pil_backend_matches_timm_on_pil_images():
    image = load_sample("ade20k/images/ADE_train_00000001.jpg")
    pixel_values = LocAtViTImageProcessorPil()(image, return_tensors="pt").pixel_values
    torch.testing.assert_close(pixel_values[0], timm_reference(image, on_pil=True), atol=REFERENCE_ATOL, rtol=0)


@pytest.mark.parametrize("processor_class", BACKENDS)
def test_center_crop_offsets_round_like_torchvision(processor_class):
    # 248x331 needs a 107-pixel crop: torchvision starts at round(53.5) = 54, the backends' own crops at 53.
    image = random_image(248, 331)
    pixel_values = processor_class()(image, return_tensors="pt").pixel_values[0]
    reference = timm_reference(image, on_pil=processor_class is LocAtViTImageProcessorPil)
    torch.testing.assert_close(pixel_values, reference, atol=REFERENCE_ATOL, rtol=0)


@pytest.mark.parametrize("processor_class", BACKENDS)
@pytest.mark.parametrize(
    "name, expected_size",
    [
        ("ADE_train_00000001", (512, 683)),  # min(2048/683, 512/512) = 1: unchanged
        ("ADE_val_00000003", (512, 683)),  # 400x300, factor 512/300: 400 * 1.7067 = 682.67 rounds up to 683
    ],
)
def test_segmentation_preset_fits_within_2048x512(processor_class, name, expected_size):
    image = load_sample(f"ade20k/images/{name}.jpg")
    label = load_sample(f"ade20k/annotations/{name}.png")

    outputs = processor_class.for_segmentation()(image, segmentation_maps=label, return_tensors="pt")

    assert outputs.pixel_values.shape == (1, 3, *expected_size)
    assert outputs.labels.shape == (1, *expected_size)
    assert outputs.labels.dtype == torch.int64
    # Nearest neighbour only picks existing values: no blends of two class ids.
    assert set(outputs.labels.unique().tolist()) <= set(np.unique(np.array(label)).tolist())

    # Bilinear resize, then ImageNet normalization (mmseg's 0-255 mean/std, divided by 255).
    if processor_class is LocAtViTImageProcessorPil:
        image_tensor = v2.functional.pil_to_tensor(image.resize(expected_size[::-1], Image.Resampling.BILINEAR))
    else:
        image_tensor = v2.functional.resize(
            v2.functional.pil_to_tensor(image), list(expected_size), v2.InterpolationMode.BILINEAR
        )
    reference = v2.functional.normalize(image_tensor.float() / 255, IMAGENET_MEAN, IMAGENET_STD)
    torch.testing.assert_close(outputs.pixel_values[0], reference, atol=REFERENCE_ATOL, rtol=0)


@pytest.mark.parametrize("processor_class", BACKENDS)
def test_segmentation_preset_caps_the_long_side(processor_class):
    # 500 high, 4000 wide: the long side binds, factor 2048/4000 = 0.512.
    pixel_values = processor_class.for_segmentation()(random_image(500, 4000), return_tensors="pt").pixel_values
    assert pixel_values.shape == (1, 3, 256, 2048)


@pytest.mark.parametrize("processor_class", BACKENDS)
def test_reduce_labels_on_ade20k(processor_class):
    image = load_sample("ade20k/images/ADE_train_00000001.jpg")
    annotation = load_sample("ade20k/annotations/ADE_train_00000001.png")
    label = np.array(annotation).astype(np.int64)
    assert {0, 1, 150} <= set(np.unique(label).tolist())

    processor = processor_class.for_segmentation(do_reduce_labels=True, do_resize=False)
    labels = processor(image, segmentation_maps=annotation, return_tensors="pt").labels[0].numpy()

    np.testing.assert_array_equal(labels, np.where(label == 0, 255, label - 1))
    assert (labels[label == 0] == 255).all()
    assert (labels[label == 1] == 0).all()
    assert (labels[label == 150] == 149).all()


@pytest.mark.parametrize("processor_class", BACKENDS)
def test_reduce_labels_keeps_ignore_index(processor_class):
    image = load_sample("voc/images/2007_000063.jpg")
    label = np.array(load_sample("voc/annotations/2007_000063.png"))
    assert (label == 255).any()

    processor = processor_class.for_segmentation(do_reduce_labels=True, do_resize=False)
    labels = processor(image, segmentation_maps=label, return_tensors="pt").labels[0].numpy()

    assert (labels[label == 255] == 255).all()
    np.testing.assert_array_equal(labels[label == 12], 11)


def test_reduce_labels_leaves_images_alone():
    image = load_sample("ade20k/images/ADE_train_00000001.jpg")
    reduced = LocAtViTImageProcessor.for_segmentation(do_reduce_labels=True)(image, return_tensors="pt")
    plain = LocAtViTImageProcessor.for_segmentation()(image, return_tensors="pt")
    torch.testing.assert_close(reduced.pixel_values, plain.pixel_values, atol=0, rtol=0)


@pytest.mark.parametrize("processor_class", BACKENDS)
def test_post_process_semantic_segmentation(processor_class):
    # Along the width, class 0 minus class 1 is linear in the logit column u and changes sign at u = 4.3. Bilinear
    # resizing keeps it linear, so each output column x takes class 0 exactly where its centre, mapped back to logit
    # coordinates (x + 0.5) * 16 / width - 0.5 (align_corners=False), lies right of 4.3.
    boundary = 4.3
    ramp = (torch.arange(16.0) - boundary).expand(2, 12, 16)
    logits = torch.stack([ramp, -ramp, torch.full_like(ramp, -100)], dim=1)  # (batch 2, 3 classes, 12, 16)
    outputs = SemanticSegmenterOutput(logits=logits)
    processor = processor_class.for_segmentation()
    target_sizes = [(512, 683), (300, 400)]

    for maps in (
        processor.post_process_semantic_segmentation(outputs, target_sizes=target_sizes),
        processor.post_process_semantic_segmentation(outputs, target_sizes=torch.tensor(target_sizes)),
    ):
        assert [tuple(semantic_map.shape) for semantic_map in maps] == target_sizes
        for semantic_map, (height, width) in zip(maps, target_sizes):
            centres = (torch.arange(width) + 0.5) * 16 / width - 0.5
            expected = torch.where(centres > boundary, 0, 1).expand(height, width)
            torch.testing.assert_close(semantic_map, expected, atol=0, rtol=0)

    with pytest.raises(ValueError):
        processor.post_process_semantic_segmentation(outputs, target_sizes=target_sizes[:1])


def test_post_process_argmax_at_logit_size():
    logits = torch.randn(2, 5, 12, 16)
    maps = LocAtViTImageProcessor().post_process_semantic_segmentation(SemanticSegmenterOutput(logits=logits))
    assert len(maps) == 2
    for semantic_map, logit in zip(maps, logits):
        assert semantic_map.shape == (12, 16)
        best = logit.gather(0, semantic_map[None])[0]
        assert (best == logit.max(dim=0).values).all()


@pytest.mark.parametrize("processor_class", BACKENDS)
@pytest.mark.parametrize("preset", ["classification", "segmentation"])
def test_save_and_load_keep_every_setting(tmp_path, processor_class, preset):
    if preset == "classification":
        processor = processor_class()
    else:
        processor = processor_class.for_segmentation(do_reduce_labels=True)

    processor.save_pretrained(tmp_path)
    loaded = processor_class.from_pretrained(tmp_path)

    assert type(loaded) is processor_class
    assert loaded.to_dict() == processor.to_dict()
    if preset == "segmentation":
        assert dict(loaded.size) == {"shortest_edge": 512, "longest_edge": 2048}
        assert tuple(loaded.image_mean) == IMAGENET_MEAN and tuple(loaded.image_std) == IMAGENET_STD
        assert loaded.do_center_crop is False and loaded.do_reduce_labels is True
    image = random_image(300, 400)
    torch.testing.assert_close(
        loaded(image, return_tensors="pt").pixel_values, processor(image, return_tensors="pt").pixel_values
    )


@pytest.mark.parametrize("name", ["ADE_train_00000001", "ADE_val_00000001", "ADE_val_00000002", "ADE_val_00000003"])
def test_backends_agree(name):
    image = load_sample(f"ade20k/images/{name}.jpg")
    label = load_sample(f"ade20k/annotations/{name}.png")

    for torchvision_processor, pil_processor, atol in [
        (LocAtViTImageProcessor(), LocAtViTImageProcessorPil(), CLASSIFICATION_BACKENDS_ATOL),
        (
            LocAtViTImageProcessor.for_segmentation(do_reduce_labels=True),
            LocAtViTImageProcessorPil.for_segmentation(do_reduce_labels=True),
            SEGMENTATION_BACKENDS_ATOL,
        ),
    ]:
        fast = torchvision_processor(image, segmentation_maps=label, return_tensors="pt")
        slow = pil_processor(image, segmentation_maps=label, return_tensors="pt")
        torch.testing.assert_close(fast.pixel_values, slow.pixel_values, atol=atol, rtol=0)
        assert (fast.pixel_values - slow.pixel_values).abs().mean() <= BACKENDS_MEAN_ATOL
        assert fast.labels.shape == slow.labels.shape
        assert (fast.labels != slow.labels).float().mean() <= LABELS_BACKENDS_MAX_MISMATCH


def translucent(image: Image.Image) -> Image.Image:
    """`image` with an alpha channel running from transparent (left) to opaque (right)."""
    alpha = np.broadcast_to(np.linspace(0, 255, image.width).astype(np.uint8), (image.height, image.width))
    rgba = image.convert("RGBA")
    rgba.putalpha(Image.fromarray(np.ascontiguousarray(alpha)))
    return rgba


@pytest.mark.parametrize("processor_class", BACKENDS)
@pytest.mark.parametrize("mode", ["L", "LA", "RGBA", "P"])
def test_grayscale_palette_and_rgba_images_become_rgb(processor_class, mode):
    image = random_image(300, 400).convert(mode)  # LA/RGBA: opaque, so PIL's conversion to RGB is the reference
    processor = processor_class()
    pixel_values = processor(image, return_tensors="pt").pixel_values
    assert pixel_values.shape == (1, 3, 224, 224)
    expected = processor(image.convert("RGB"), return_tensors="pt").pixel_values
    torch.testing.assert_close(pixel_values, expected, atol=0, rtol=0)


@pytest.mark.parametrize("processor_class", BACKENDS)
def test_transparency_is_composited_onto_white(processor_class):
    # As in Transformers' `convert_to_rgb`: a transparent pixel is white, not the colour hidden under it.
    image = translucent(random_image(300, 400))
    white = Image.new("RGBA", image.size, (255, 255, 255, 255))
    processor = processor_class()
    pixel_values = processor(image, return_tensors="pt").pixel_values
    expected = processor(Image.alpha_composite(white, image).convert("RGB"), return_tensors="pt").pixel_values
    torch.testing.assert_close(pixel_values, expected, atol=0, rtol=0)
    assert not torch.equal(pixel_values, processor(image.convert("RGB"), return_tensors="pt").pixel_values)


@pytest.mark.parametrize("processor_class", BACKENDS)
@pytest.mark.parametrize("array_type", ["numpy", "torch"])
@pytest.mark.parametrize(
    "mode, layout", [("L", "HxW"), ("L", "1xHxW"), ("L", "HxWx1"), ("RGBA", "HxWx4"), ("RGBA", "4xHxW")]
)
def test_single_channel_and_rgba_arrays_become_rgb(processor_class, array_type, mode, layout):
    image = random_image(300, 400).convert(mode)  # RGBA: opaque
    array = np.array(image)  # HxW or HxWx4
    if layout == "1xHxW":
        array = array[None]
    elif layout == "HxWx1":
        array = array[..., None]
    elif layout == "4xHxW":
        array = np.ascontiguousarray(np.moveaxis(array, -1, 0))
    processor = processor_class()
    outputs = processor(torch.from_numpy(array) if array_type == "torch" else array, return_tensors="pt")
    expected = processor(image.convert("RGB"), return_tensors="pt").pixel_values
    torch.testing.assert_close(outputs.pixel_values, expected, atol=0, rtol=0)


@pytest.mark.parametrize("processor_class", BACKENDS)
def test_a_batch_of_mixed_modes(processor_class):
    images = [random_image(300, 400).convert(mode) for mode in ("RGB", "L", "RGBA", "P")]
    processor = processor_class()
    pixel_values = processor(images, return_tensors="pt").pixel_values
    assert pixel_values.shape == (4, 3, 224, 224)
    for image, values in zip(images, pixel_values):
        torch.testing.assert_close(values, processor(image.convert("RGB"), return_tensors="pt").pixel_values[0])


@pytest.mark.parametrize("processor_class", BACKENDS)
def test_convert_rgb_can_be_turned_off(processor_class):
    gray = random_image(300, 400).convert("L")

    # The images keep their own channels, for a normalization of as many.
    kept = processor_class(do_convert_rgb=False, image_mean=[0.5], image_std=[0.5])(gray, return_tensors="pt")
    assert kept.pixel_values.shape == (1, 1, 224, 224)
    per_call = processor_class(image_mean=[0.5], image_std=[0.5])(gray, do_convert_rgb=False, return_tensors="pt")
    torch.testing.assert_close(per_call.pixel_values, kept.pixel_values, atol=0, rtol=0)

    # With the default three-channel normalization, the error names the option.
    for image in (gray, random_image(300, 400).convert("RGBA")):
        with pytest.raises(ValueError, match=r"channel\(s\) but the normalization .* set do_convert_rgb=True"):
            processor_class(do_convert_rgb=False)(image, return_tensors="pt")


@pytest.mark.parametrize("processor_class", BACKENDS)
@pytest.mark.parametrize("do_convert_rgb", [True, False])
def test_convert_rgb_is_saved(tmp_path, processor_class, do_convert_rgb):
    processor_class(do_convert_rgb=do_convert_rgb).save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "preprocessor_config.json").read_text())
    assert saved["do_convert_rgb"] is do_convert_rgb
    assert processor_class.from_pretrained(tmp_path).do_convert_rgb is do_convert_rgb


def test_saved_processor_without_the_option_converts(tmp_path):
    # A preprocessor_config.json written before the option existed converts too.
    LocAtViTImageProcessor().save_pretrained(tmp_path)
    config_file = tmp_path / "preprocessor_config.json"
    saved = json.loads(config_file.read_text())
    del saved["do_convert_rgb"]
    config_file.write_text(json.dumps(saved))

    processor = AutoImageProcessor.from_pretrained(tmp_path)
    gray = random_image(300, 400).convert("L")
    pixel_values = processor(gray, return_tensors="pt").pixel_values
    assert pixel_values.shape == (1, 3, 224, 224)
    expected = processor(gray.convert("RGB"), return_tensors="pt").pixel_values
    torch.testing.assert_close(pixel_values, expected, atol=0, rtol=0)
