"""The segmentation script's training transform keeps image and labels aligned through the random rescale, the crop
with the category-ratio rule, the flip and the padding.

The test image's colour encodes the source pixel: red = 4 x + 2, green = 5 y + 2, blue = 128, so a transformed pixel
tells where it came from (bilinear resampling of a linear ramp keeps it linear), and its label must be the class of
that place, up to the one-pixel disagreement of nearest (labels) and bilinear (image) resampling. The classes: 0 on
the left 40 columns, then 8x8 blocks of classes 1-4, so that about half of the possible crops are more than 75 % class
0 and break the rule.
"""

import numpy as np
import pytest
import torch
from PIL import Image

from .test_examples import SEGMENTATION, load_script

HEIGHT, WIDTH, CROP = 48, 64, 32
IGNORE = 255


def source_classes() -> np.ndarray:
    y, x = np.mgrid[0:HEIGHT, 0:WIDTH]
    return np.where(x < 40, 0, 1 + (x // 8 + y // 8) % 4)


def source_image() -> Image.Image:
    y, x = np.mgrid[0:HEIGHT, 0:WIDTH]
    pixels = np.stack([4 * x + 2, 5 * y + 2, np.full_like(x, 128)], axis=-1)
    return Image.fromarray(pixels.astype(np.uint8))


@pytest.fixture(scope="module")
def script():
    return load_script(SEGMENTATION)


def transform(script, cat_max_ratio: float):
    args = script.DataTrainingArguments(
        crop_size=CROP,
        train_scale=[64, 48],
        ratio_range=[0.5, 2.0],
        cat_max_ratio=cat_max_ratio,
        photometric_distortion=False,
    )
    return script.TrainTransform(args)


def colours(script, pixel_values: torch.Tensor) -> np.ndarray:
    mean = torch.tensor(script.IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(script.IMAGENET_STD).view(3, 1, 1)
    return (pixel_values * std + mean).permute(1, 2, 0).numpy()


def breaks_the_rule(label: np.ndarray, cat_max_ratio: float) -> bool:
    counts = np.bincount(label[label != IGNORE].ravel())
    counts = counts[counts > 0]
    return len(counts) < 2 or counts.max() / counts.sum() >= cat_max_ratio


def test_training_transform_keeps_image_and_labels_aligned(script):
    train = transform(script, 0.75)
    classes = source_classes()
    annotation = Image.fromarray(classes.astype(np.uint8), mode="L")
    flipped = padded = 0
    for seed in range(60):
        torch.manual_seed(seed)
        pixel_values, label = train(source_image(), annotation)
        assert pixel_values.shape == (3, CROP, CROP) and label.shape == (CROP, CROP)
        label = label.numpy()
        rgb = colours(script, pixel_values)
        # Padding, bottom and right: ignored labels exactly where the image is padding (the normalized zero).
        is_padding = np.abs(rgb[..., 2] - 128) > 2
        assert np.array_equal(label == IGNORE, is_padding)
        assert (pixel_values[:, torch.from_numpy(is_padding)] == 0).all()
        rows, cols = np.nonzero(~is_padding)
        height, width = rows.max() + 1, cols.max() + 1
        assert not is_padding[:height, :width].any() and is_padding[height:].all() and is_padding[:, width:].all()
        padded += bool(is_padding.any())
        # Alignment: each labelled pixel carries the class of the place its colour comes from (within 1.5 px).
        x, y = (rgb[..., 0] - 2) / 4, (rgb[..., 1] - 2) / 5
        for row, col in zip(rows, cols):
            x0, x1 = int(np.floor(x[row, col] - 1.5)), int(np.ceil(x[row, col] + 1.5))
            y0, y1 = int(np.floor(y[row, col] - 1.5)), int(np.ceil(y[row, col] + 1.5))
            near = classes[max(y0, 0) : y1 + 1, max(x0, 0) : x1 + 1]
            assert label[row, col] in near, (seed, row, col, x[row, col], y[row, col], label[row, col])
        # The flip is seen in the colours: red decreasing along a row.
        flipped += bool(rgb[0, 0, 0] > rgb[0, width - 1, 0])
    assert 10 < flipped < 50 and padded >= 3  # about half flipped, about a tenth padded (ratio under 2/3)


def test_training_crop_follows_the_category_ratio_rule(script):
    """With the rule, the crops where one class covers 75 % or more (or the only class) are rare: the crop is redrawn
    up to 10 times; without it (cat_max_ratio 1), they are about half."""
    annotation = Image.fromarray(source_classes().astype(np.uint8), mode="L")
    broken = {}
    for cat_max_ratio in (0.75, 1.0):
        train = transform(script, cat_max_ratio)
        count = 0
        for seed in range(100):
            torch.manual_seed(seed)
            _, label = train(source_image(), annotation)
            count += breaks_the_rule(label.numpy(), 0.75)
        broken[cat_max_ratio] = count
    assert broken[0.75] <= 3 and broken[1.0] >= 25, broken
