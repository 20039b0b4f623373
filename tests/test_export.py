"""Export: `torch.export` and ONNX (`torch.onnx.export(dynamo=True)`, run by ONNX Runtime) give the eager model's
outputs, at the export size and, exported with dynamic batch, height and width, at other sizes and shapes (taller
where the export was wider, batch 1 where it was 2). Under export the attention goes through plain operators (the
`eager` backend). The `locatvit-export` command on a saved model, and its errors."""

import sys

import pytest
import torch
from torch.export import Dim

from locatvit_hf import (
    LocAtViTForImageClassification,
    LocAtViTForSemanticSegmentation,
    LocAtViTImageProcessor,
    LocAtViTModel,
)
from locatvit_hf.export import main

from .conftest import tiny_config

onnxruntime = pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

TASK_MODELS = [LocAtViTForImageClassification, LocAtViTForSemanticSegmentation]
EXPORT_SIZE = (2, 3, 32, 48)  # wider than tall; the config's size too, where no resampling happens in eager
OTHER_SIZES = [(3, 3, 48, 32), (1, 3, 64, 80)]  # taller; larger and still wider, batch 1
PATCH = tiny_config().patch_size[0]
DYNAMIC = {
    "pixel_values": {0: Dim("batch", min=1, max=64), 2: PATCH * Dim("rows", min=2), 3: PATCH * Dim("cols", min=2)}
}


def dynamic_config():
    """A one-block tiny model (the export's time grows with the depth) that takes any size (position embeddings
    resampled), configured at the export size."""
    return tiny_config(num_hidden_layers=1, image_size=EXPORT_SIZE[2:], interpolate_pos_encoding=True)


def dynamic_model(model_class):
    return model_class(dynamic_config()).eval()


def first_output(model, pixel_values):
    with torch.no_grad():
        return model(pixel_values)[0]


def run_onnx(path, pixel_values):
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (output, *_) = session.run(None, {session.get_inputs()[0].name: pixel_values.numpy()})
    return torch.from_numpy(output)


@pytest.mark.parametrize("model_class", TASK_MODELS, ids=lambda cls: cls.__name__)
def test_torch_export_equals_eager(model_class):
    model = model_class(tiny_config(image_size=(32, 48))).eval()
    pixel_values = torch.randn(2, 3, 32, 48)
    exported = torch.export.export(model, (pixel_values,))
    torch.testing.assert_close(
        exported.module()(pixel_values)[0], first_output(model, pixel_values), rtol=0, atol=1e-5
    )


@pytest.mark.parametrize("model_class", TASK_MODELS, ids=lambda cls: cls.__name__)
def test_onnx_export_runs_in_onnx_runtime(model_class, tmp_path):
    model = model_class(tiny_config(image_size=(32, 48))).eval()
    pixel_values = torch.randn(2, 3, 32, 48)
    path = tmp_path / "model.onnx"
    torch.onnx.export(model, (pixel_values,), str(path), dynamo=True, verbose=False)
    torch.testing.assert_close(run_onnx(path, pixel_values), first_output(model, pixel_values), rtol=0, atol=1e-4)


@pytest.mark.parametrize("model_class", [*TASK_MODELS, LocAtViTModel], ids=lambda cls: cls.__name__)
def test_dynamic_torch_export_equals_eager_at_other_sizes(model_class):
    model = dynamic_model(model_class)
    exported = torch.export.export(model, (torch.randn(EXPORT_SIZE),), dynamic_shapes=DYNAMIC).module()
    for size in OTHER_SIZES:
        pixel_values = torch.randn(size)
        expected = first_output(model, pixel_values)
        assert expected.shape[0] == size[0]
        torch.testing.assert_close(exported(pixel_values)[0], expected, rtol=0, atol=1e-5)


def test_dynamic_onnx_export_equals_eager_at_other_sizes(tmp_path):
    """The segmentation model here; the classifier through the command (`test_cli_writes_...`)."""
    model = dynamic_model(LocAtViTForSemanticSegmentation)
    path = tmp_path / "model.onnx"
    torch.onnx.export(
        model, (torch.randn(EXPORT_SIZE),), str(path), dynamo=True, dynamic_shapes=DYNAMIC, verbose=False
    )
    for size in OTHER_SIZES:
        pixel_values = torch.randn(size)
        torch.testing.assert_close(run_onnx(path, pixel_values), first_output(model, pixel_values), rtol=0, atol=1e-4)


@pytest.fixture
def saved_model(tmp_path):
    folder = tmp_path / "tiny"
    # Configured without `interpolate_pos_encoding`: the command's dynamic export turns it on.
    LocAtViTForImageClassification(tiny_config(num_hidden_layers=1, image_size=(32, 48))).save_pretrained(folder)
    LocAtViTImageProcessor(size={"height": 32, "width": 48}).save_pretrained(folder)
    return folder


def test_cli_writes_a_checked_onnx_file_and_the_preprocessor(saved_model, tmp_path, capsys):
    output = tmp_path / "deploy" / "model.onnx"
    assert main(["--model", str(saved_model), "--output", str(output), "--dynamic"]) == 0
    printed = capsys.readouterr().out
    assert "LocAtViTForImageClassification" in printed and "max abs difference" in printed
    assert float(printed.rsplit("difference", 1)[1]) <= 1e-4
    processor = LocAtViTImageProcessor.from_pretrained(output.parent)
    assert processor.size == {"height": 32, "width": 48}
    model = LocAtViTForImageClassification.from_pretrained(saved_model).eval()
    pixel_values = torch.randn(OTHER_SIZES[0])  # dynamic: another batch and shape than the example input
    with torch.no_grad():
        expected = model(pixel_values, interpolate_pos_encoding=True).logits
    torch.testing.assert_close(run_onnx(output, pixel_values), expected, rtol=0, atol=1e-4)


@pytest.mark.parametrize(
    "arguments, message",
    [
        (["--model", "{tmp}/missing", "--output", "{tmp}/m.onnx"], "no config.json there"),
        (["--model", "{model}", "--output", "{tmp}/m.pt"], "must end in .onnx"),
        (["--model", "{model}", "--output", "{tmp}/m.onnx", "--height", "36"], "multiple of the patch size 8"),
        (["--model", "{model}", "--output", "{tmp}/m.onnx", "--width", "8", "--dynamic"], "at least 16 pixels"),
    ],
)
def test_cli_rejects_bad_arguments_naming_the_fix(saved_model, tmp_path, capsys, arguments, message):
    argv = [argument.format(tmp=tmp_path, model=saved_model) for argument in arguments]
    with pytest.raises(SystemExit) as error:
        main(argv)
    assert error.value.code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "m.onnx").exists()


def test_cli_without_onnxruntime_says_what_to_install(saved_model, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # as if not installed: importing it fails
    with pytest.raises(SystemExit):
        main(["--model", str(saved_model), "--output", str(tmp_path / "m.onnx")])
    assert "onnxruntime is not installed: pip install 'locatvit-hf[export]'" in capsys.readouterr().err
