"""Input checks of the LocAtViT models: inputs the model would otherwise misread get an error naming the problem and
the fix."""

import torch

from .configuration_locatvit import LocAtViTConfig


def check_pixel_values(pixel_values: torch.Tensor | None, config: LocAtViTConfig) -> None:
    """Rejects inputs the model would otherwise misread, naming the problem and the fix."""
    if torch.jit.is_tracing():
        raise RuntimeError(
            "LocAtViT cannot be traced with `torch.jit.trace` (TorchScript, which transformers v5 no longer supports): "
            "export it with `torch.export.export(model, (pixel_values,))`, or to ONNX with `locatvit-export`."
        )
    if pixel_values is None:
        raise ValueError("`pixel_values` is required: pass a (batch, channels, height, width) float tensor.")
    if not isinstance(pixel_values, torch.Tensor):
        raise TypeError(f"`pixel_values` must be a torch.Tensor, got {type(pixel_values).__name__}.")
    if pixel_values.ndim != 4:
        raise ValueError(
            f"`pixel_values` must have 4 dimensions (batch, channels, height, width), got shape "
            f"{tuple(pixel_values.shape)}: add a batch dimension with `unsqueeze(0)` or stack the images."
        )
    if not pixel_values.is_floating_point():
        raise TypeError(
            f"`pixel_values` must be a floating-point tensor, got {pixel_values.dtype}: normalize the images with the "
            "image processor (or convert them with `.float()`)."
        )
    if pixel_values.shape[0] == 0:
        raise ValueError("`pixel_values` is an empty batch: pass at least one image.")
    if pixel_values.shape[1] != config.num_channels:
        raise ValueError(
            f"`pixel_values` has {pixel_values.shape[1]} channels but the model expects {config.num_channels}: "
            "convert the images (e.g. to RGB) or set `num_channels` in the config."
        )
    height, width = pixel_values.shape[-2:]
    if height < config.patch_size[0] or width < config.patch_size[1]:
        raise ValueError(
            f"Images of {height}x{width} pixels are smaller than one {config.patch_size[0]}x{config.patch_size[1]} "
            "patch: resize them to at least one patch."
        )


def label_values_are_free(labels: torch.Tensor) -> bool:
    """Whether reading the labels' values costs nothing: eager, on the CPU. On an accelerator it would wait for the
    device, and under `torch.compile` break the graph; there the loss's own checks (a device-side assert) remain."""
    return labels.device.type == "cpu" and not torch.compiler.is_compiling()


def check_classification_labels(labels: torch.Tensor, logits: torch.Tensor, config: LocAtViTConfig) -> None:
    if labels.shape[0] != logits.shape[0]:
        raise ValueError(
            f"`labels` has {labels.shape[0]} entries for a batch of {logits.shape[0]} images: pass one label per image."
        )
    integer_labels = not labels.is_floating_point()
    if integer_labels and config.num_labels > 1 and labels.numel() > 0 and label_values_are_free(labels):
        low, high = int(labels.min()), int(labels.max())
        if low < 0 or high >= config.num_labels:
            bad = low if low < 0 else high
            raise ValueError(
                f"Classification label {bad} is outside the model's classes [0, {config.num_labels}): check the "
                "labels, or set `num_labels`/`id2label` in the config to cover them."
            )


def check_segmentation_labels(labels: torch.Tensor, pixel_values: torch.Tensor, config: LocAtViTConfig) -> None:
    if labels.ndim != 3 or labels.shape[0] != pixel_values.shape[0]:
        raise ValueError(
            f"Segmentation `labels` must have shape (batch, height, width) = ({pixel_values.shape[0]}, H, W), got "
            f"{tuple(labels.shape)}: pass one label map per image, without a channel dimension."
        )
    if labels.is_floating_point():
        raise TypeError(f"Segmentation `labels` must be an integer tensor of class ids, got {labels.dtype}.")
    if not label_values_are_free(labels):
        return
    valid = labels != config.semantic_loss_ignore_index
    if valid.any():
        values = labels[valid]
        low, high = int(values.min()), int(values.max())
        if low < 0 or high >= config.num_labels:
            bad = low if low < 0 else high
            raise ValueError(
                f"Segmentation label value {bad} is outside [0, {config.num_labels}) and is not the ignore index "
                f"{config.semantic_loss_ignore_index}: remap the labels (e.g. `do_reduce_labels` for ADE20K) or set "
                "`num_labels`."
            )
