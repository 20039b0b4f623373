"""Export: `torch.export` and ONNX (`torch.onnx.export(dynamo=True)`, run by ONNX Runtime) at the export size give
the eager model's outputs. Under export the attention goes through plain operators (the `eager` backend)."""

import pytest
import torch

from locatvit_hf import LocAtViTForImageClassification, LocAtViTForSemanticSegmentation

from .conftest import tiny_config

onnxruntime = pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

TASK_MODELS = [LocAtViTForImageClassification, LocAtViTForSemanticSegmentation]


@pytest.mark.parametrize("model_class", TASK_MODELS, ids=lambda cls: cls.__name__)
def test_torch_export_equals_eager(model_class):
    model = model_class(tiny_config(image_size=(32, 48))).eval()
    pixel_values = torch.randn(2, 3, 32, 48)
    exported = torch.export.export(model, (pixel_values,))
    with torch.no_grad():
        expected = model(pixel_values).logits
    torch.testing.assert_close(exported.module()(pixel_values).logits, expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("model_class", TASK_MODELS, ids=lambda cls: cls.__name__)
def test_onnx_export_runs_in_onnx_runtime(model_class, tmp_path):
    model = model_class(tiny_config(image_size=(32, 48))).eval()
    pixel_values = torch.randn(2, 3, 32, 48)
    path = tmp_path / "model.onnx"
    torch.onnx.export(model, (pixel_values,), str(path), dynamo=True, verbose=False)
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (logits, *_) = session.run(None, {session.get_inputs()[0].name: pixel_values.numpy()})
    with torch.no_grad():
        expected = model(pixel_values).logits
    torch.testing.assert_close(torch.from_numpy(logits), expected, rtol=0, atol=1e-4)
