"""Export a saved LocAtViT to ONNX, checked in ONNX Runtime against PyTorch.

    python -m locatvit_hf.export --model DIR --output model.onnx [--dynamic] [--height H --width W]

The task class comes from the saved config's `architectures`. `--dynamic` exports one graph for any batch size and
any image size that is a multiple of the patch size (at least two patches a side), position embeddings resampled
as in PyTorch; without it, the graph takes the example size only. The image processor's settings
(`preprocessor_config.json`) are written beside the ONNX file, so that a deployment preprocesses as in training.
"""

import argparse
import sys
from pathlib import Path

import torch
from torch.export import Dim
from transformers import AutoConfig, AutoImageProcessor

from .modeling_locatvit import LocAtViTForImageClassification, LocAtViTForSemanticSegmentation, LocAtViTModel

TASK_CLASSES = {
    cls.__name__: cls for cls in (LocAtViTModel, LocAtViTForImageClassification, LocAtViTForSemanticSegmentation)
}
TOLERANCE = 1e-3  # ONNX Runtime against PyTorch in float32; measured differences are near 1e-6


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="locatvit-export", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, type=Path, help="folder of a saved model (save_pretrained)")
    parser.add_argument("--output", required=True, type=Path, help="the ONNX file to write, e.g. model.onnx")
    parser.add_argument(
        "--dynamic", action="store_true", help="any batch size and image size (multiples of the patch)"
    )
    parser.add_argument("--height", type=int, help="example input height in pixels (default: the config's)")
    parser.add_argument("--width", type=int, help="example input width in pixels (default: the config's)")
    args = parser.parse_args(argv)
    if not (args.model / "config.json").is_file():
        parser.error(
            f"--model {args.model}: no config.json there; pass the folder a model was saved to with save_pretrained"
        )
    if args.output.suffix != ".onnx":
        parser.error(
            f"--output {args.output}: the file name must end in .onnx, e.g. {args.output.with_suffix('.onnx')}"
        )
    try:
        import onnxruntime  # noqa: F401
        import onnxscript  # noqa: F401
    except ImportError as error:
        parser.error(f"{error.name} is not installed: pip install 'locatvit-hf[export]'")
    config = AutoConfig.from_pretrained(args.model)
    if config.model_type != "locatvit":
        parser.error(f"--model {args.model} holds a {config.model_type!r} model, not a LocAtViT")
    args.architecture = (config.architectures or ["LocAtViTModel"])[0]
    if args.architecture not in TASK_CLASSES:
        parser.error(f"--model {args.model} is a {args.architecture}; this command exports {', '.join(TASK_CLASSES)}")
    minimum = 2 if args.dynamic else 1
    for name, size, patch, default in zip(
        ("height", "width"), (args.height, args.width), config.patch_size, config.image_size
    ):
        size = default if size is None else size
        if size % patch or size < minimum * patch:
            parser.error(
                f"--{name} {size}: it must be a multiple of the patch size {patch} and at least {minimum * patch} "
                f"pixels, e.g. --{name} {max(minimum, round(size / patch)) * patch}"
            )
        setattr(args, name, size)
    return args


def export(model: torch.nn.Module, pixel_values: torch.Tensor, output: Path, dynamic: bool) -> list[str]:
    """Writes `model` as ONNX to `output`; returns the output names. Dynamic sizes are whole numbers of patches,
    so that the graph holds no check of divisibility."""
    with torch.no_grad():
        output_names = list(model(pixel_values).keys())
    dynamic_shapes = None
    if dynamic:
        patch_h, patch_w = model.config.patch_size
        sides = {2: patch_h * Dim("rows", min=2), 3: patch_w * Dim("columns", min=2)}
        dynamic_shapes = {"pixel_values": {0: Dim("batch", min=1), **sides}}
    torch.onnx.export(
        model, (pixel_values,), str(output), dynamo=True, input_names=["pixel_values"], output_names=output_names,
        dynamic_shapes=dynamic_shapes, external_data=False, verbose=False,
    )  # fmt: skip
    return output_names


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import onnxruntime

    model = TASK_CLASSES[args.architecture].from_pretrained(args.model).eval()
    if args.dynamic:  # inputs of any size: position embeddings resampled, as in PyTorch with the same setting
        model.config.interpolate_pos_encoding = True
    pixel_values = torch.randn(2 if args.dynamic else 1, model.config.num_channels, args.height, args.width)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    output_names = export(model, pixel_values, args.output, args.dynamic)
    if (args.model / "preprocessor_config.json").is_file():
        AutoImageProcessor.from_pretrained(args.model).save_pretrained(args.output.parent)

    session = onnxruntime.InferenceSession(str(args.output), providers=["CPUExecutionProvider"])
    (onnx_output, *_) = session.run(None, {"pixel_values": pixel_values.numpy()})
    with torch.no_grad():
        expected = model(pixel_values)[output_names[0]]
    difference = (torch.from_numpy(onnx_output) - expected).abs().max().item()
    shape = "dynamic" if args.dynamic else f"{pixel_values.shape[0]}x{args.height}x{args.width}"
    print(f"wrote {args.output} ({args.architecture}, {shape})")
    print(f"ONNX Runtime vs PyTorch on a {args.height}x{args.width} input: max abs difference {difference:.2e}")
    if difference > TOLERANCE:
        print(f"error: the difference exceeds {TOLERANCE:g}: the export is not faithful", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
