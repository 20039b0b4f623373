import hashlib
import sys
from pathlib import Path

import pytest
import torch

import locatvit_hf  # noqa: F401  (registers the Auto classes)
from locatvit_hf import (
    LocAtViTBackbone,
    LocAtViTConfig,
    LocAtViTForImageClassification,
    LocAtViTForSemanticSegmentation,
    LocAtViTModel,
)

SHARED = Path(__file__).resolve().parents[2] / "shared"
PARITY_DIR = SHARED / "parity"  # the full-size parity set, beside the repository (optional)
# The small parity set, carried by the repository: a 2-block, width-48, 10-class checkpoint in the original's
# format and the original implementation's outputs for it (docs/method.md#parity-with-the-original).
SMALL_PARITY_DIR = Path(__file__).resolve().parent / "fixtures" / "parity-small"
SAMPLES_DIR = SHARED / "samples"
ALL_CLASSES = [LocAtViTModel, LocAtViTForImageClassification, LocAtViTForSemanticSegmentation, LocAtViTBackbone]
# The example scripts import their data generator (`synthetic_scenes`) from beside them, as `python examples/x.py` does.
EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
if str(EXAMPLES) not in sys.path:
    sys.path.insert(0, str(EXAMPLES))


def tiny_config(**overrides) -> LocAtViTConfig:
    """A few-layer LocAtViT at 32 px (grid 4x4): fast enough for every test."""
    kwargs = dict(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        image_size=32,
        patch_size=8,
        num_labels=5,
        decoder_hidden_size=16,
    )
    kwargs.update(overrides)
    return LocAtViTConfig(**kwargs)


def compile_recording_graphs(model: torch.nn.Module) -> tuple[torch.nn.Module, list[set[str]]]:
    """`torch.compile(model, fullgraph=True)` through AOT autograd, run as traced, and the list that each compiled
    graph (forward, then backward) appends the targets of its calls to."""
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd

    graphs = []

    def record(graph_module, example_inputs):
        graphs.append({str(node.target) for node in graph_module.graph.nodes if node.op == "call_function"})
        return make_boxed_func(graph_module.forward)

    torch._dynamo.reset()
    backend = aot_autograd(fw_compiler=record, bw_compiler=record)
    return torch.compile(model, fullgraph=True, backend=backend), graphs


def parameter_digest(model: torch.nn.Module) -> str:
    """SHA-256 of every tensor of the state dict (name, dtype, shape and bytes): equal digests = identical weights."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}".encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def parity_dir() -> Path:
    if not PARITY_DIR.is_dir():
        pytest.skip(f"{PARITY_DIR} is absent: the parity files of the original implementation are needed")
    return PARITY_DIR


def assert_gradients_close(actual: torch.nn.Module, expected: torch.nn.Module, rtol: float = 1e-4) -> None:
    """Every parameter's gradient within `rtol` of the expected one, relative to that gradient's own size: the
    Gaussian's parameters get gradients of 1e-6 in tiny models, where a fixed absolute tolerance checks nothing."""
    expected_grads = dict(expected.named_parameters())
    for name, parameter in actual.named_parameters():
        reference = expected_grads[name].grad
        if reference is None:
            assert parameter.grad is None, name
            continue
        error = (parameter.grad - reference).norm()
        assert error <= rtol * reference.norm() + 1e-12, f"{name}: {error:.3g} vs norm {reference.norm():.3g}"


def assert_same_training_step(actual: torch.nn.Module, expected: torch.nn.Module, pixel_values, labels) -> None:
    """One loss and backward pass of each model (same weights, different attention paths; `actual` may be the
    `torch.compile` wrapper of a model): equal losses and parameter gradients (`assert_gradients_close`)."""
    losses = []
    for model in (actual, expected):
        loss = model(pixel_values, labels=labels, interpolate_pos_encoding=True).loss
        loss.backward()
        losses.append(loss.detach())
    torch.testing.assert_close(losses[0], losses[1])
    assert_gradients_close(getattr(actual, "_orig_mod", actual), expected)
