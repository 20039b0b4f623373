"""Quick start: build a LocAtViT-Tiny segmentation model from its preset and segment an image.

    python examples/quickstart.py [IMAGE]

The weights are random (no download): this shows the API end to end, not a trained model's output.
"""

import sys

import numpy as np
import torch
from PIL import Image

from locatvit_hf import LocAtViTConfig, LocAtViTForSemanticSegmentation


def main() -> None:
    if len(sys.argv) > 1:
        image = Image.open(sys.argv[1]).convert("RGB")
    else:  # a drawn image: a bright disc on a gradient
        yy, xx = np.mgrid[0:240, 0:320]
        pixels = np.stack([xx / 320 * 255, yy / 240 * 255, np.full_like(xx, 96)], axis=-1)
        pixels[(yy - 120) ** 2 + (xx - 160) ** 2 < 60**2] = 255
        image = Image.fromarray(pixels.astype(np.uint8))

    torch.manual_seed(0)
    config = LocAtViTConfig.from_preset("tiny", num_labels=150)
    model = LocAtViTForSemanticSegmentation(config).eval()

    mean = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)
    pixel_values = (torch.from_numpy(np.array(image)).permute(2, 0, 1).float() / 255 - mean) / std
    with torch.no_grad():
        logits = model(pixel_values[None], interpolate_pos_encoding=True).logits
    upsampled = torch.nn.functional.interpolate(logits, size=image.size[::-1], mode="bilinear", align_corners=False)
    segmentation = upsampled.argmax(1)[0]
    print(f"image {image.size[0]}x{image.size[1]} -> logits {tuple(logits.shape)} -> map {tuple(segmentation.shape)}")
    print(f"classes present: {segmentation.unique().numel()}")


if __name__ == "__main__":
    main()
