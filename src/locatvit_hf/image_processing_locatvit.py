"""Image processors for LocAtViT (torchvision and PIL backends).

The defaults reproduce the classification preprocessing of the released checkpoints; `for_segmentation()` gives the
test-time preprocessing of the paper's ADE20K protocol (mmsegmentation). This file imports nothing from its package, so
that it also works as Hub remote code next to the model files.
"""

import numpy as np
import torch
import torch.nn.functional as F
import torchvision.transforms.v2.functional as tvF
from transformers.image_processing_backends import PilBackend, TorchvisionBackend
from transformers.image_processing_utils import BatchFeature
from transformers.image_utils import (
    IMAGENET_DEFAULT_MEAN,
    IMAGENET_DEFAULT_STD,
    IMAGENET_STANDARD_MEAN,
    IMAGENET_STANDARD_STD,
    ChannelDimension,
    ImageInput,
    PILImageResampling,
    SizeDict,
)
from transformers.processing_utils import ImagesKwargs, Unpack
from transformers.utils import TensorType

# Test pipeline of the segmentation protocol: mmseg's `Resize(scale=(2048, 512), keep_ratio=True)`, no crop, ImageNet
# mean/std (mmseg's 0-255 values divided by 255), bilinear.
SEGMENTATION_PRESET = {
    "size": {"shortest_edge": 512, "longest_edge": 2048},
    "do_center_crop": False,
    "resample": PILImageResampling.BILINEAR,
    "image_mean": IMAGENET_DEFAULT_MEAN,
    "image_std": IMAGENET_DEFAULT_STD,
}

IGNORE_INDEX = 255


def get_fit_within_output_size(image_size: tuple[int, int], shortest_edge: int, longest_edge: int) -> tuple[int, int]:
    """
    Output (height, width) of mmcv's `rescale_size` with scale (longest_edge, shortest_edge): the largest size that
    keeps the aspect ratio and fits the long side in `longest_edge` and the short side in `shortest_edge`, rounded
    half up. `transformers.image_transforms.get_size_with_aspect_ratio` truncates instead, which makes a 400x300
    image 682 wide instead of mmseg's 683.
    """
    height, width = image_size
    scale = min(longest_edge / max(height, width), shortest_edge / min(height, width))
    return int(height * scale + 0.5), int(width * scale + 0.5)


def add_grayscale_channel_axis(images: ImageInput, input_data_format: ChannelDimension | str | None) -> ImageInput:
    """
    Give each 2-D array or tensor, a grayscale image (what `np.array` makes of a mode "L" photo), its channel axis.
    Transformers takes only 3-D images and refuses 2-D ones with "Could not make a flat list of images".
    """
    if isinstance(images, (list, tuple)):
        return [add_grayscale_channel_axis(image, input_data_format) for image in images]
    if not (isinstance(images, (np.ndarray, torch.Tensor)) and images.ndim == 2):
        return images
    channels_last = input_data_format is not None and ChannelDimension(input_data_format) == ChannelDimension.LAST
    return images[..., None] if channels_last else images[None]


def check_channels_match_mean(images: list, image_mean: float | list[float] | None, do_convert_rgb: bool) -> None:
    """
    Refuse images whose channels do not match the normalization's mean, naming the fix: the backends would fail on
    them with a bare broadcast error.
    """
    if not isinstance(image_mean, (list, tuple)):
        return
    for image in images:
        channels = image.shape[0]
        if channels == len(image_mean):
            continue
        if not do_convert_rgb and len(image_mean) == 3:
            fix = "set do_convert_rgb=True (the default) to convert grayscale, palette and RGBA images to RGB"
        elif do_convert_rgb:
            fix = (
                "set do_convert_rgb=False to keep the images' own channels, or give image_mean and image_std 3 values"
            )
        else:
            fix = f"pass {len(image_mean)}-channel images, or an image_mean and image_std of {channels} values"
        raise ValueError(
            f"An image has {channels} channel(s) but the normalization (image_mean) has {len(image_mean)}: {fix}."
        )


class LocAtViTImageProcessorKwargs(ImagesKwargs, total=False):
    r"""
    do_reduce_labels (`bool`, *optional*, defaults to `self.do_reduce_labels`):
        Whether to map the segmentation maps with the ADE20K convention: 0 ("other", not a class) becomes 255 (the
        ignore index), every class k becomes k - 1, and 255 stays 255.
    """

    do_reduce_labels: bool


class LocAtViTImageProcessorMixin:
    """Defaults and the segmentation support shared by both backends."""

    valid_kwargs = LocAtViTImageProcessorKwargs
    resample = PILImageResampling.BICUBIC
    image_mean = IMAGENET_STANDARD_MEAN
    image_std = IMAGENET_STANDARD_STD
    size = {"shortest_edge": 248}
    default_to_square = False
    # Grayscale, palette and RGBA images become RGB (transparency composited onto white), as with Transformers' own
    # image processors: the models and the normalization take three channels.
    do_convert_rgb = True
    crop_size = {"height": 224, "width": 224}
    do_resize = True
    do_center_crop = True
    do_rescale = True
    do_normalize = True
    do_reduce_labels = False

    def to_dict(self) -> dict:
        """As saved to `preprocessor_config.json`. Saved as remote code (`register_for_auto_class`), `auto_map` names
        the class of each backend, so that `AutoImageProcessor.from_pretrained(..., trust_remote_code=True,
        backend="pil")` gets the PIL one. Transformers reads a plain string there as one class for every backend, and
        its pipelines take it for a video processor's as well (the name with "Video" for "Image"), which does not
        exist: without the code trusted, building a pipeline would stop to ask whether to run it."""
        output = super().to_dict()
        auto_map = output.get("auto_map") or {}
        reference = auto_map.get("AutoImageProcessor")
        if isinstance(reference, str):
            module = reference.rsplit(".", 1)[0]
            output["auto_map"] = {
                **auto_map,
                "AutoImageProcessor": {
                    backend: f"{module}.{cls.__name__}" for backend, cls in BACKEND_CLASSES.items()
                },
            }
        return output

    @classmethod
    def for_segmentation(cls, **kwargs: Unpack[LocAtViTImageProcessorKwargs]):
        """The test-time preprocessing of the segmentation protocol; `kwargs` override any of its settings."""
        return cls(**{**SEGMENTATION_PRESET, **kwargs})

    def preprocess(
        self,
        images: ImageInput,
        segmentation_maps: ImageInput | None = None,
        **kwargs: Unpack[LocAtViTImageProcessorKwargs],
    ) -> BatchFeature:
        r"""
        segmentation_maps (`ImageInput`, *optional*):
            The segmentation maps to preprocess. They go through the same resize and crop as the images, with nearest
            neighbour interpolation, and come back as `labels` of integers.
        """
        return super().preprocess(images, segmentation_maps, **kwargs)

    def _preprocess_image_like_inputs(
        self,
        images: ImageInput,
        segmentation_maps: ImageInput | None,
        do_convert_rgb: bool,
        input_data_format: ChannelDimension,
        return_tensors: str | TensorType | None,
        **kwargs,
    ) -> BatchFeature:
        images = self._prepare_image_like_inputs(
            add_grayscale_channel_axis(images, input_data_format),
            do_convert_rgb=do_convert_rgb,
            input_data_format=input_data_format,
            device=kwargs.get("device"),
        )
        if kwargs.get("do_normalize"):
            check_channels_match_mean(images, kwargs.get("image_mean"), do_convert_rgb)
        image_kwargs = {**kwargs, "do_reduce_labels": False, "return_tensors": None}
        data = {"pixel_values": self._preprocess(images, **image_kwargs)["pixel_values"]}

        if segmentation_maps is not None:
            segmentation_maps = self._prepare_image_like_inputs(
                segmentation_maps,
                expected_ndims=2,
                do_convert_rgb=False,
                input_data_format=ChannelDimension.FIRST,
                device=kwargs.get("device"),
            )
            label_kwargs = {
                **kwargs,
                "resample": self.label_resample,
                "do_rescale": False,
                "do_normalize": False,
                "return_tensors": None,
            }
            labels = self._preprocess(segmentation_maps, **label_kwargs)["pixel_values"]
            data["labels"] = [self.to_int64(label[0]) for label in labels]

        return BatchFeature(data=data, tensor_type=return_tensors)

    def _preprocess(self, images, do_reduce_labels: bool, **kwargs) -> BatchFeature:
        if do_reduce_labels:
            images = [self.reduce_label(image) for image in images]
        return super()._preprocess(images, **kwargs)

    def resize(self, image, size: SizeDict, resample=None, **kwargs):
        """Resize; `shortest_edge` together with `longest_edge` means "fit within", rounded as mmseg does."""
        if size.shortest_edge and size.longest_edge:
            height, width = get_fit_within_output_size(image.shape[-2:], size.shortest_edge, size.longest_edge)
            size = SizeDict(height=height, width=width)
        return super().resize(image, size, resample, **kwargs)

    def center_crop(self, image, size: SizeDict, **kwargs):
        """
        Crop at torchvision's `CenterCrop` offsets, which the released checkpoints were evaluated with: they round
        half to even where the backends floor, e.g. 54 instead of 53 for a 331-wide image cropped to 224.
        """
        height, width = image.shape[-2:]
        if size.height > height or size.width > width:
            return super().center_crop(image, size, **kwargs)
        top, left = round((height - size.height) / 2), round((width - size.width) / 2)
        return image[..., top : top + size.height, left : left + size.width]

    def post_process_semantic_segmentation(self, outputs, target_sizes: list[tuple[int, int]] | None = None):
        """
        Converts the logits of [`LocAtViTForSemanticSegmentation`] into semantic segmentation maps.

        Args:
            outputs ([`SemanticSegmenterOutput`]):
                Raw outputs of the model.
            target_sizes (`list[tuple[int, int]]` or `torch.Tensor` of length `batch_size`, *optional*):
                The (height, width) of each map, usually the original image size, to which the logits are resized
                bilinearly (as the segmentation protocol does before its argmax). If unset, the maps keep the
                resolution of the logits.

        Returns:
            `list[torch.Tensor]`: one `(height, width)` map of class ids per image.
        """
        logits = outputs.logits
        if target_sizes is None:
            return list(logits.argmax(dim=1))

        if len(logits) != len(target_sizes):
            raise ValueError("Make sure that you pass in as many target sizes as the batch dimension of the logits")
        if isinstance(target_sizes, torch.Tensor):
            target_sizes = target_sizes.tolist()
        return [
            F.interpolate(logit[None], size=tuple(size), mode="bilinear", align_corners=False)[0].argmax(dim=0)
            for logit, size in zip(logits, target_sizes)
        ]


class LocAtViTImageProcessor(LocAtViTImageProcessorMixin, TorchvisionBackend):
    """LocAtViT image processor on the torchvision backend (batched, runs on GPU too)."""

    # Half-pixel centres like PIL's NEAREST: both backends pick the same label pixels except on float ties.
    label_resample = tvF.InterpolationMode.NEAREST_EXACT

    def reduce_label(self, label: torch.Tensor) -> torch.Tensor:
        return torch.where((label == 0) | (label == IGNORE_INDEX), IGNORE_INDEX, label - 1)

    def to_int64(self, label: torch.Tensor) -> torch.Tensor:
        return label.to(torch.int64)


class LocAtViTImageProcessorPil(LocAtViTImageProcessorMixin, PilBackend):
    """LocAtViT image processor on the PIL/NumPy backend."""

    label_resample = PILImageResampling.NEAREST

    def reduce_label(self, label: np.ndarray) -> np.ndarray:
        return np.where((label == 0) | (label == IGNORE_INDEX), IGNORE_INDEX, label - 1).astype(label.dtype)

    def to_int64(self, label: np.ndarray) -> np.ndarray:
        return label.astype(np.int64)


# The class of each backend, by the names `AutoImageProcessor`'s `backend` argument takes.
BACKEND_CLASSES = {"torchvision": LocAtViTImageProcessor, "pil": LocAtViTImageProcessorPil}

__all__ = ["LocAtViTImageProcessor", "LocAtViTImageProcessorPil"]
