"""Generated example data: deterministic textured scenes with exact masks and an image-level label, made with numpy
alone (no download), for the CPU demo of `run_semantic_segmentation.py`, the smoke run of
`run_image_classification.py`, `reproduce_locality.py` and the tests.

- `render_synthetic_scene(seed, index, height, width)`: one scene, the same pixels for the same arguments.
- `synthetic_dataset`: a `datasets.Dataset` of scenes for segmentation or classification.
- `write_synthetic_imagefolder`, `write_synthetic_ade20k`: scenes written in the layouts the scripts read.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

SYNTHETIC_PATTERNS = ("stripes", "checks", "dots", "waves")
SYNTHETIC_PALETTES = {
    # name: (foreground RGB, background RGB)
    "warm": ((220, 60, 40), (250, 200, 90)),
    "cool": ((40, 80, 210), (120, 220, 230)),
}
SYNTHETIC_CLASS_NAMES = ("background",) + tuple(
    f"{palette} {pattern}" for pattern in SYNTHETIC_PATTERNS for palette in SYNTHETIC_PALETTES
)
SYNTHETIC_NUM_LABELS = len(SYNTHETIC_CLASS_NAMES)
# Pattern period in pixels, per pattern.
_PERIODS = {"stripes": 6.0, "checks": 8.0, "dots": 7.0, "waves": 9.0}


@dataclass
class SyntheticScene:
    image: np.ndarray  # (H, W, 3) uint8
    mask: np.ndarray  # (H, W) uint8, 0 = background, k = SYNTHETIC_CLASS_NAMES[k]
    label: int  # image-level class: the object class (1..8) covering the most pixels


def _pattern(kind: str, x: np.ndarray, y: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A [0, 1] texture over pixel coordinates, with a random orientation, phase and slight period change."""
    angle = rng.uniform(0, np.pi)
    period = _PERIODS[kind] * rng.uniform(0.85, 1.15)
    u = x * np.cos(angle) + y * np.sin(angle) + rng.uniform(0, period)
    v = -x * np.sin(angle) + y * np.cos(angle) + rng.uniform(0, period)
    if kind == "stripes":
        return (np.sin(2 * np.pi * u / period) > 0).astype(np.float32)
    if kind == "checks":
        return ((np.floor(2 * u / period) + np.floor(2 * v / period)) % 2).astype(np.float32)
    if kind == "dots":
        du, dv = (u % period) - period / 2, (v % period) - period / 2
        return (du**2 + dv**2 < (0.32 * period) ** 2).astype(np.float32)
    # waves: smooth sinusoidal bands whose position oscillates along the other axis
    return (
        0.5 + 0.5 * np.sin(2 * np.pi * (u + 0.35 * period * np.sin(2 * np.pi * v / (2.5 * period))) / period)
    ).astype(np.float32)


def _shape_mask(x: np.ndarray, y: np.ndarray, height: int, width: int, rng: np.random.Generator) -> np.ndarray:
    """An ellipse, a rotated rectangle or a triangle with its centre inside the image."""
    side = min(height, width)
    cy, cx = rng.uniform(0.15, 0.85) * height, rng.uniform(0.15, 0.85) * width
    ry, rx = rng.uniform(0.14, 0.34, size=2) * side
    angle = rng.uniform(0, np.pi)
    dx, dy = x - cx, y - cy
    u = dx * np.cos(angle) + dy * np.sin(angle)
    v = -dx * np.sin(angle) + dy * np.cos(angle)
    kind = rng.integers(3)
    if kind == 0:
        return (u / rx) ** 2 + (v / ry) ** 2 <= 1.0
    if kind == 1:
        return (np.abs(u) <= rx) & (np.abs(v) <= ry)
    # triangle: intersection of three half-planes around the centre
    inside = np.ones_like(u, dtype=bool)
    radius = max(rx, ry)
    for k in range(3):
        theta = angle + 2 * np.pi * k / 3
        inside &= u * np.cos(theta) + v * np.sin(theta) <= 0.5 * radius
    return inside


def render_synthetic_scene(seed: int, index: int, height: int = 64, width: int = 64) -> SyntheticScene:
    """Scene number `index` of the synthetic dataset `seed`: the same (seed, index, size) always gives the same
    pixels, independently of the other scenes.

    How it is made (numpy only, no external images): the background (class 0) is a smooth, desaturated colour
    gradient. Two to four objects are painted over it, later ones occluding earlier ones; each is an ellipse, a
    rotated rectangle or a triangle, and belongs to one of eight classes = four textures (stripes, checks, dots,
    waves, with a random orientation and phase) x two palettes (warm, cool). No class can be told by its colour or
    its texture alone, only by both, locally. The mask gives every pixel's class exactly (the painted region), and
    the image-level label is the object class with the most visible pixels (ties: the lower class). Gaussian pixel
    noise (sigma 6) and a per-object brightness jitter are added last.
    """
    rng = np.random.default_rng([seed, index, height, width])
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    base = rng.uniform(90, 170, size=3)
    tilt = rng.uniform(-40, 40, size=(2, 3))
    gray = base.mean()
    base = gray + 0.35 * (base - gray)  # desaturated
    image = base + (y / height - 0.5)[..., None] * tilt[0] + (x / width - 0.5)[..., None] * tilt[1]
    mask = np.zeros((height, width), dtype=np.uint8)
    for _ in range(rng.integers(2, 5)):
        cls = int(rng.integers(1, SYNTHETIC_NUM_LABELS))
        pattern = SYNTHETIC_PATTERNS[(cls - 1) // len(SYNTHETIC_PALETTES)]
        foreground, background = SYNTHETIC_PALETTES[tuple(SYNTHETIC_PALETTES)[(cls - 1) % len(SYNTHETIC_PALETTES)]]
        region = _shape_mask(x, y, height, width, rng)
        texture = _pattern(pattern, x, y, rng)[..., None]
        colours = texture * np.asarray(foreground) + (1 - texture) * np.asarray(background)
        colours = colours * rng.uniform(0.85, 1.15)
        image[region] = colours[region]
        mask[region] = cls
    image = image + rng.normal(0.0, 6.0, size=image.shape)
    counts = np.bincount(mask.reshape(-1), minlength=SYNTHETIC_NUM_LABELS)
    counts[0] = 0
    label = int(counts.argmax()) if counts.any() else 1
    return SyntheticScene(np.clip(image, 0, 255).astype(np.uint8), mask, label)


def synthetic_sizes(num_images: int, seed: int, image_size, max_image_size=None) -> list[tuple[int, int]]:
    """(height, width) of each scene: `image_size` (int or pair), or drawn in [image_size, max_image_size]."""
    low = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
    if max_image_size is None:
        return [low] * num_images
    high = (max_image_size, max_image_size) if isinstance(max_image_size, int) else tuple(max_image_size)
    rng = np.random.default_rng([seed, 1_000_003])
    return [
        (int(rng.integers(low[0], high[0] + 1)), int(rng.integers(low[1], high[1] + 1))) for _ in range(num_images)
    ]


def make_synthetic_scenes(num_images: int, seed: int = 0, image_size=64, max_image_size=None) -> list[SyntheticScene]:
    sizes = synthetic_sizes(num_images, seed, image_size, max_image_size)
    return [render_synthetic_scene(seed, index, *size) for index, size in enumerate(sizes)]


def synthetic_dataset(
    num_images: int, seed: int = 0, image_size=64, max_image_size=None, task: str = "semantic-segmentation"
):
    """A `datasets.Dataset` of synthetic scenes: columns `image` (PIL) and `annotation` (PIL mode L, 0..8) for
    `"semantic-segmentation"`, or `image` and `label` (ClassLabel over the eight object classes, label k-1 for object
    class k) for `"image-classification"`."""
    import datasets
    from PIL import Image

    scenes = make_synthetic_scenes(num_images, seed, image_size, max_image_size)
    images = [Image.fromarray(scene.image) for scene in scenes]
    if task == "semantic-segmentation":
        features = datasets.Features({"image": datasets.Image(), "annotation": datasets.Image()})
        data = {"image": images, "annotation": [Image.fromarray(scene.mask) for scene in scenes]}
    elif task == "image-classification":
        features = datasets.Features(
            {"image": datasets.Image(), "label": datasets.ClassLabel(names=list(SYNTHETIC_CLASS_NAMES[1:]))}
        )
        data = {"image": images, "label": [scene.label - 1 for scene in scenes]}
    else:
        raise ValueError(f"unknown task {task!r}: use 'semantic-segmentation' or 'image-classification'.")
    return datasets.Dataset.from_dict(data, features=features)


def write_synthetic_imagefolder(root, split: str, num_images: int, seed: int = 0, image_size=64) -> Path:
    """Write scenes as an `imagefolder` classification dataset: `root/split/<class name>/<index>.png`."""
    from PIL import Image

    root = Path(root) / split
    for index, scene in enumerate(make_synthetic_scenes(num_images, seed, image_size)):
        folder = root / SYNTHETIC_CLASS_NAMES[scene.label].replace(" ", "_")
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(scene.image).save(folder / f"{index:05d}.png")
    return root


def write_synthetic_ade20k(
    root, split: str, num_images: int, seed: int = 0, image_size=64, max_image_size=None
) -> Path:
    """Write scenes in the ADE20K layout and label convention: `root/images/<split>/<name>.png` and
    `root/annotations/<split>/<name>.png`, with pixel value = class + 1 and 0 ("other", unlabelled) on a one-pixel
    frame around each image, so that `--reduce_labels` gives back the classes and ignores the frame."""
    from PIL import Image

    root = Path(root)
    (root / "images" / split).mkdir(parents=True, exist_ok=True)
    (root / "annotations" / split).mkdir(parents=True, exist_ok=True)
    for index, scene in enumerate(make_synthetic_scenes(num_images, seed, image_size, max_image_size)):
        annotation = scene.mask + 1
        annotation[0, :] = annotation[-1, :] = annotation[:, 0] = annotation[:, -1] = 0
        name = f"synthetic_{split}_{index:05d}"
        Image.fromarray(scene.image).save(root / "images" / split / f"{name}.png")
        Image.fromarray(annotation.astype(np.uint8)).save(root / "annotations" / split / f"{name}.png")
    return root
