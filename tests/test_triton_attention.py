"""The Triton kernel (`triton_attention_locatvit`) against the float64 eager reference, run by Triton's interpreter on
CPU tensors: the output and the gradients of query, key, value and both profiles, for every way its key blocks can
cover a grid (several rows per block, one row with unused lanes, row segments), with and without the CLS token, and
partial blocks. Float32 is checked tightly; bfloat16 and float16 within twice the eager reference's own error in that
dtype. Its custom operators pass `torch.library.opcheck` and trace under `torch.compile(fullgraph=True)`, the module
imports and explains itself without Triton, and every kernel compiles for sm_80 and sm_90 within their resources.

Small blocks (`FORCED_BLOCKS`) make tiny grids span several blocks; the released models' 14 x 14 grid runs with the
blocks a GPU gets. The interpreter runs each program in Python."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # read when the kernels are first wrapped: before any call below

import json  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

triton = pytest.importorskip("triton", reason="the Triton kernel's tests need the `triton` package")
tl = triton.language

import locatvit_hf.attention_locatvit as attention  # noqa: E402
import locatvit_hf.modeling_locatvit as modeling  # noqa: E402
import locatvit_hf.triton_attention_locatvit as triton_attention  # noqa: E402
from locatvit_hf import LocAtViTForSemanticSegmentation  # noqa: E402
from locatvit_hf.attention_locatvit import eager_attention, full_bias  # noqa: E402
from locatvit_hf.cpu_attention_locatvit import fused_cpu_profiles  # noqa: E402

from .conftest import (  # noqa: E402
    assert_gradients_close,
    assert_same_training_step,
    compile_recording_graphs,
    tiny_config,
)

MODULE_PATH = Path(triton_attention.__file__)


@pytest.fixture(autouse=True)
def _interpreter_or_cuda():
    if not triton_attention.triton_available():
        pytest.fail("TRITON_INTERPRET was set to something other than 1 before this module set it, and no GPU")


@pytest.fixture
def blocks(monkeypatch):
    """Sets the kernels' (query, key) block sizes for one test."""

    def force(sizes):
        monkeypatch.setattr(triton_attention, "FORCED_BLOCKS", sizes)

    return force


def attention_inputs(batch, heads, grid, dim, num_prefix, dtype, seed=0):
    """Query, key and value as the model passes them ((batch, heads, N, D) views of token-major projections), and
    row and column profiles of `grid` (positive rows, signed columns: any bias sign)."""
    generator = torch.Generator().manual_seed(seed)
    height, width = grid
    seq_len = num_prefix + height * width
    projections = [torch.randn(batch, seq_len, heads, dim, generator=generator) for _ in range(3)]
    row = torch.rand(batch, heads, height * width, height, generator=generator) * 3
    col = torch.randn(batch, heads, height * width, width, generator=generator)
    tensors = [t.to(dtype).transpose(1, 2) for t in projections] + [row, col]
    return [t.detach().requires_grad_() for t in tensors]


def output_and_grads(attention, inputs, grad_output):
    """(output (batch, N, heads, D), gradients of the five inputs) of `attention(query, key, value, row, col)`."""
    output = attention(*inputs)
    grads = torch.autograd.grad(output, inputs, grad_output.to(output.dtype))
    return [output, *grads]


def run_all(inputs, scale, num_prefix):
    """Kernel, eager in the inputs' dtype, and eager in float64: each as output and gradients, and the gradient of
    the output used."""

    def kernel(q, k, v, row, col):
        return triton_attention.triton_gaussian_attention(q, k, v, row, col, scale, num_prefix)

    def eager(q, k, v, row, col):
        return eager_attention(q, k, v, (row, col), scale=scale, dropout=0.0, num_prefix=num_prefix)[0]

    batch, heads, seq_len, dim = inputs[0].shape
    grad_output = torch.randn(batch, seq_len, heads, dim, generator=torch.Generator().manual_seed(1))
    reference_inputs = [t.detach().double().requires_grad_() for t in inputs]
    return (
        output_and_grads(kernel, inputs, grad_output),
        output_and_grads(eager, inputs, grad_output),
        output_and_grads(eager, reference_inputs, grad_output),
    )


NAMES = ("output", "grad query", "grad key", "grad value", "grad row", "grad col")

# (batch, heads, grid, head size, prefix tokens, (queries, keys) per block, None: `_config`'s, as on a GPU), named by
# what each case covers
FLOAT32_CASES = [
    pytest.param(2, 2, (4, 4), 16, 1, None, id="default-blocks-one-partial-block"),
    pytest.param(1, 2, (3, 5), 16, 1, (16, 16), id="3-rows-per-block-full-query-block"),
    pytest.param(1, 1, (5, 6), 64, 1, (16, 16), id="2-rows-per-block-partial-row-group-D64"),
    pytest.param(1, 1, (3, 10), 16, 0, (16, 16), id="1-row-per-block-unused-lanes-no-prefix"),
    pytest.param(1, 1, (2, 20), 16, 1, (16, 16), id="row-segments"),
    pytest.param(1, 2, (1, 6), 16, 0, (16, 16), id="one-grid-row"),
    pytest.param(1, 1, (6, 1), 16, 1, (16, 16), id="one-grid-column"),
    pytest.param(2, 1, (5, 2), 64, 1, None, id="default-blocks-D64"),
    pytest.param(1, 2, (14, 14), 64, 1, None, id="released-grid-default-blocks"),
    pytest.param(1, 1, (7, 3), 16, 1, (32, 16), id="5-rows-per-block-more-queries-than-keys-per-block"),
    pytest.param(1, 1, (4, 9), 16, 0, (16, 32), id="3-rows-per-block-more-keys-than-queries-per-block"),
]


@pytest.mark.parametrize("batch, heads, grid, dim, num_prefix, sizes", FLOAT32_CASES)
def test_float32_matches_float64_reference(blocks, batch, heads, grid, dim, num_prefix, sizes):
    blocks(sizes)
    inputs = attention_inputs(batch, heads, grid, dim, num_prefix, torch.float32)
    kernel, _, reference = run_all(inputs, dim**-0.5, num_prefix)
    for name, actual, expected in zip(NAMES, kernel, reference):
        assert actual.shape == expected.shape, name
        torch.testing.assert_close(
            actual.double(), expected, rtol=1e-4, atol=1e-5 * expected.abs().max().item(), msg=name
        )


@pytest.mark.parametrize(
    "dtype, batch, heads, grid, dim, num_prefix, sizes",
    [
        pytest.param(torch.bfloat16, 2, 2, (3, 5), 16, 1, (16, 16), id="bfloat16-rows"),
        pytest.param(torch.bfloat16, 1, 1, (2, 20), 64, 0, (16, 16), id="bfloat16-segments-D64"),
        pytest.param(torch.float16, 1, 1, (5, 6), 24, 1, (16, 16), id="float16-D24"),
        pytest.param(torch.bfloat16, 1, 2, (14, 14), 64, 1, None, id="bfloat16-released-grid-default-blocks"),
    ],
)
def test_low_precision_within_eager_error(blocks, dtype, batch, heads, grid, dim, num_prefix, sizes):
    """The kernel rounds its inputs and its probabilities (to multiply them with V) like eager attention in that
    dtype, and keeps scores, softmax and accumulators in float32: its error is at most twice eager's, plus a floor of
    a tenth of the dtype's resolution of the values. The last case is a released model's layer at 224 px with the
    blocks `_config` gives on a GPU."""
    blocks(sizes)
    inputs = attention_inputs(batch, heads, grid, dim, num_prefix, dtype)
    kernel, eager, reference = run_all(inputs, dim**-0.5, num_prefix)
    resolution = torch.finfo(dtype).eps
    for name, actual, low, expected in zip(NAMES, kernel, eager, reference):
        assert actual.dtype == expected_dtype(name, dtype), name
        error = (actual.double() - expected).abs().max().item()
        eager_error = (low.double() - expected).abs().max().item()
        floor = 0.1 * resolution * expected.abs().max().item()
        assert error <= 2 * eager_error + floor, f"{name}: {error:.3g} vs eager {eager_error:.3g}"


def expected_dtype(name: str, dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if name in ("grad row", "grad col") else dtype


def _rounding_round_trip(X, ROUNDED, RESTORED, BLOCK: tl.constexpr):
    """Rounds float32 values to ROUNDED's dtype and restores them from the rounding and its error's code."""
    i = tl.arange(0, BLOCK)
    value = tl.load(X + i)
    rounded = value.to(ROUNDED.dtype.element_ty)
    tl.store(ROUNDED + i, rounded)
    tl.store(RESTORED + i, _restore_rounded(rounded, _rounding_error_code(value, rounded)))


@pytest.mark.parametrize("dtype, decades", [(torch.bfloat16, 30), (torch.float16, 4)], ids=str)
def test_rounding_error_code_restores_float32_outputs(dtype, decades):
    """The one-byte code of the output's rounding error that the forward keeps for the backward's delta: float32
    values of either sign over many magnitudes (and 0) come back from their rounding and its code to 1/127 of the
    dtype's resolution, where the rounding alone is off by up to a whole one (Triton's interpreter truncates)."""
    global _restore_rounded, _rounding_error_code  # the Triton helpers the test kernel calls
    triton_attention._kernels()  # wraps the helpers as Triton functions
    _restore_rounded, _rounding_error_code = triton_attention._restore_rounded, triton_attention._rounding_error_code
    generator = torch.Generator().manual_seed(0)
    magnitudes = 10 ** ((torch.rand(1024, generator=generator) * 2 - 1) * decades)
    values = torch.where(torch.rand(1024, generator=generator) < 0.5, -magnitudes, magnitudes)
    values[0] = 0.0
    rounded, restored = torch.empty(1024, dtype=dtype), torch.empty(1024)
    triton.jit(_rounding_round_trip)[(1,)](values, rounded, restored, BLOCK=1024)
    resolution = torch.finfo(dtype).eps * values.abs()
    assert ((rounded.float() - values).abs() > resolution / 4).any()  # the rounding is visible
    assert ((restored - values).abs() <= resolution / 127).all()
    assert restored[0] == 0


def test_operators_pass_opcheck(blocks):
    """Schema, fake implementations (the output token-major, the gradients (batch, heads, N, D) views of token-major
    tensors), autograd registration and AOT dispatch with dynamic shapes, for both operators."""
    blocks((16, 16))
    query, key, value, row, col = attention_inputs(1, 2, (3, 5), 16, 1, torch.float32)
    operators = torch.ops.locatvit
    torch.library.opcheck(operators.triton_gaussian_attention.default, (query, key, value, row, col, 0.25, 1))
    with torch.no_grad():
        output, logsumexp, residual = operators.triton_gaussian_attention(query, key, value, row, col, 0.25, 1)
    detached = [t.detach() for t in (query, key, value, row, col)]
    backward_args = (torch.randn_like(output), *detached, output, logsumexp, residual, 0.25, 1)
    torch.library.opcheck(operators.triton_gaussian_attention_backward.default, backward_args)


def test_logsumexp_and_double_backward(blocks):
    """The operator's second output is the log-sum-exp of each query's biased scores; a gradient of the gradients
    raises instead of being wrong."""
    blocks((16, 16))
    inputs = attention_inputs(1, 1, (3, 5), 16, 1, torch.float32)
    query, key, value, row, col = inputs
    output, logsumexp, _ = torch.ops.locatvit.triton_gaussian_attention(query, key, value, row, col, 0.25, 1)
    scores = query.double() @ key.double().transpose(-1, -2) * 0.25
    biased = scores + full_bias(row.double(), col.double(), 1)
    torch.testing.assert_close(logsumexp.double(), biased.logsumexp(-1), rtol=1e-5, atol=1e-5)
    (grad_query,) = torch.autograd.grad(output.square().sum(), query, create_graph=True)
    with pytest.raises(RuntimeError, match="differentiable once"):
        grad_query.sum().backward()


def test_gradient_of_a_sum(blocks):
    """The gradient of `output.sum()` reaches the backward as an expanded tensor (all strides 0), read in place."""
    blocks((16, 16))
    inputs = attention_inputs(1, 2, (3, 5), 16, 1, torch.float32)
    reference_inputs = [t.detach().double().requires_grad_() for t in inputs]
    triton_attention.triton_gaussian_attention(*inputs, 0.25, 1).sum().backward()
    query, key, value, row, col = reference_inputs
    reference, _ = eager_attention(query, key, value, (row, col), scale=0.25, dropout=0.0, num_prefix=1)
    reference.sum().backward()
    for name, actual, expected in zip(NAMES[1:], inputs, reference_inputs):
        torch.testing.assert_close(actual.grad.double(), expected.grad, rtol=1e-4, atol=1e-6, msg=name)


class OperatorCalls(TorchDispatchMode):
    """Records the name of every operator called in its context."""

    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(str(func))
        return func(*args, **(kwargs or {}))


def test_training_recomputes_the_profiles_not_the_attention():
    """A training step on `cuda_triton` (eager, a non-square grid) equals the eager reference's; the kernel runs once
    per layer in forward and its backward once in backward, and the Gaussian module runs once more per layer in
    backward: its profiles are recomputed there instead of kept."""
    config = tiny_config(attention_backend="cuda_triton")
    model = LocAtViTForSemanticSegmentation(config).train()
    reference = LocAtViTForSemanticSegmentation(tiny_config(attention_backend="eager")).train()
    reference.load_state_dict(model.state_dict())
    gaussian_calls = []
    for layer in model.locatvit.encoder.layers:
        layer.attention.gaussian_bias.register_forward_hook(
            lambda *args: gaussian_calls.append(torch.is_grad_enabled())
        )

    pixel_values, labels = torch.randn(2, 3, 40, 24), torch.randint(0, config.num_labels, (2, 40, 24))
    with OperatorCalls() as calls:
        assert_same_training_step(model, reference, pixel_values, labels)
    layers = config.num_hidden_layers
    assert calls.names.count("locatvit.triton_gaussian_attention.default") == layers
    assert calls.names.count("locatvit.triton_gaussian_attention_backward.default") == layers
    assert len(gaussian_calls) == 2 * layers


@pytest.mark.filterwarnings("error::FutureWarning")  # e.g. torch's, when saved-tensor hooks meet an unset choice
@pytest.mark.parametrize("offload", [False, True], ids=["checkpointing", "checkpointing with offload"])
def test_activation_checkpointing_around_the_recomputed_profiles(offload):
    """Transformers' activation checkpointing of every layer (offloading to CPU memory, too), around the selective
    checkpointing of the profiles: the same gradients as without it."""
    model = LocAtViTForSemanticSegmentation(tiny_config(attention_backend="cuda_triton")).train()
    pixel_values, labels = torch.randn(2, 3, 40, 24), torch.randint(0, 5, (2, 40, 24))

    def gradients():
        model.zero_grad()
        model(pixel_values, labels=labels, interpolate_pos_encoding=True).loss.backward()
        return {name: p.grad.clone() for name, p in model.named_parameters()}

    plain = gradients()
    model.activation_checkpointing_enable(offload=offload)
    checkpointed = gradients()
    for name, grad in plain.items():
        torch.testing.assert_close(checkpointed[name], grad, rtol=1e-5, atol=1e-7, msg=name)


def test_compiled_model_traces_the_kernel_as_operators():
    """`torch.compile(fullgraph=True)` of a training step of a model on `cuda_triton` (a non-square grid, not the
    configured one): the forward graph calls the kernel's operator and the backward graph its backward operator and
    the profiles' operator (recomputed, not kept), and the loss and every parameter's gradient equal the eager
    model's."""
    config = tiny_config(attention_backend="cuda_triton")
    model = LocAtViTForSemanticSegmentation(config).train()
    reference = LocAtViTForSemanticSegmentation(tiny_config(attention_backend="eager")).train()
    reference.load_state_dict(model.state_dict())
    compiled, graphs = compile_recording_graphs(model)
    pixel_values, labels = torch.randn(2, 3, 40, 24), torch.randint(0, config.num_labels, (2, 40, 24))
    assert_same_training_step(compiled, reference, pixel_values, labels)
    forward, backward = graphs
    assert "locatvit.triton_gaussian_attention.default" in forward
    assert "locatvit.triton_gaussian_attention_backward.default" in backward
    profiles = "locatvit.gaussian_profiles.default" if fused_cpu_profiles() is not None else "aten.exp.default"
    assert profiles in forward and profiles in backward


def test_triton_check_passes_here_and_catches_a_wrong_kernel(monkeypatch, caplog):
    """The check that guards the automatic choice of the kernels passes for them in every dtype and rejects, with a
    logged warning that says why, an attention kernel that drops the row profiles' bias or fails to run, and a
    profiles kernel whose column profiles are 10% too strong."""
    for dtype in triton_attention.DTYPES:
        assert attention.triton_check(torch.device("cpu"), dtype, 16) is None
    kernel = attention.triton_gaussian_attention

    def without_row_bias(query, key, value, row, col, scale, num_prefix):
        return kernel(query, key, value, row * 0 + 1, col, scale, num_prefix)

    def failing(*args):
        raise RuntimeError("no kernel image is available for execution on the device")

    profiles = attention.triton_gaussian_profiles

    def with_stronger_columns(statistics, *constants):
        row, col = profiles(statistics, *constants)
        return row, col * 1.1

    for name, wrong, expected in (
        ("triton_gaussian_attention", without_row_bias, "the output is off by"),
        ("triton_gaussian_attention", failing, "failed to run: RuntimeError: no kernel image"),
        ("triton_gaussian_profiles", with_stronger_columns, "the column profile is off by"),
    ):
        with monkeypatch.context() as patch:
            patch.setattr(attention, name, wrong)
            caplog.clear()
            with caplog.at_level("WARNING", logger=attention.__name__):
                problem = attention.triton_check(torch.device("cpu"), torch.bfloat16, 16)
        assert expected in problem
        assert expected in caplog.text and "the other attention backends run instead" in caplog.text


def test_automatic_choice_takes_the_kernel_where_its_check_passed(monkeypatch):
    """For tensors on a device of `TRITON_DEVICES` (here the CPU, under the interpreter, in bfloat16: float32 CPU
    calls take the fused CPU kernel first), the automatic choice is the Triton kernel, in a model's training step and
    in its compiled graph; where the check failed, or the call has more (batch, head) slices than one launch takes,
    it is the next backend of the table."""
    monkeypatch.setattr(attention, "TRITON_DEVICES", ("cuda", "cpu"))
    query = torch.randn(1, 2, 17, 16, dtype=torch.bfloat16)
    profiles = (torch.rand(1, 2, 16, 4), torch.rand(1, 2, 16, 4))

    def select():
        return attention.select_backend(query, profiles, implementation="sdpa", forced=None, dropout=0.0)

    assert select() == "cuda_triton"
    assert attention.select_backend(query, profiles, implementation="sdpa", forced=None, dropout=0.1) == "sdpa"
    with monkeypatch.context() as patch:
        patch.setattr(attention, "MAX_TRITON_SLICES", 1)
        assert select() == "sdpa"
    with monkeypatch.context() as patch:
        patch.setattr(attention, "triton_checked", lambda *args: False)
        assert select() == "sdpa"

    model = LocAtViTForSemanticSegmentation(tiny_config()).train()
    pixel_values, labels = torch.randn(2, 3, 40, 24), torch.randint(0, 5, (2, 40, 24))
    with OperatorCalls() as calls, torch.autocast("cpu", dtype=torch.bfloat16):
        model(pixel_values, labels=labels, interpolate_pos_encoding=True).loss.backward()
    assert calls.names.count("locatvit.triton_gaussian_attention.default") == model.config.num_hidden_layers
    compiled, graphs = compile_recording_graphs(model)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        compiled(pixel_values, labels=labels, interpolate_pos_encoding=True).loss.backward()
    assert "locatvit.triton_gaussian_attention.default" in graphs[0]


def profile_inputs(batch, heads, grid, dim, dtype, seed=0):
    """Queries as the model passes them ((batch, heads, N, D) views of a token-major projection, a CLS token first)
    and the variance and strength maps' weight (3, D) and bias (3), with statistics over their whole range and the
    edge cases in the first patches (the weight's rows are nearly the first three unit vectors): a strength whose
    softplus is below the flush floor, one past softplus's linear threshold (20), and variance maps far negative
    (narrow Gaussians, flushed far lines)."""
    generator = torch.Generator().manual_seed(seed)
    patches = grid[0] * grid[1]
    projected = torch.randn(batch, 1 + patches, heads, dim, generator=generator) * 3
    projected[:, 1:4, :, 2] = torch.tensor([-100.0, 25.0, -16.0])[:, None]
    projected[:, 4, :, :2] = -30.0
    weight = torch.eye(3, dim) + torch.randn(3, dim, generator=generator) * 0.02
    bias = torch.randn(3, generator=generator) * 0.1
    return [projected.to(dtype).transpose(1, 2), weight, bias]


def profile_constants(grid):
    """A model's constants for `grid`'s larger side: the distance table's clamp, the variances' scale, eps."""
    side = max(grid)
    return -0.5 * (side - 1) ** 2, float(side**2), 0.1


def profiles_kernel(query, weight, bias, grid):
    floor, scale, eps = profile_constants(grid)
    table = attention.grid_distance_table(max(grid), floor, scale, torch.float32, "cpu")
    flush = (attention.PROFILE_FLOOR, attention.FLUSH_CLAMP)
    return triton_attention.triton_gaussian_profiles(query, weight, bias, table, eps / scale, *flush, *grid)


@pytest.mark.parametrize(
    "grid, dtype",
    [((14, 14), torch.float32), ((2, 14), torch.float32), ((5, 3), torch.float32), ((3, 40), torch.float32),
     ((14, 14), torch.bfloat16), ((5, 3), torch.float16)],
)  # fmt: skip
def test_profiles_kernel_matches_the_reference(grid, dtype):
    """Both profiles and the gradients of the queries and of the maps' weight and bias against the float64 formula
    (`attention_locatvit.profiles_of_queries`), as close as the formula with the same inputs in float32 (the path GPUs
    take without the kernel: twice its error, plus 4 float32 steps of the largest value, and one step of the query's
    dtype for its gradient): square and non-square
    grids, a grid wider than one step of lines (40 > 16), partial blocks of queries, strided queries in float32,
    bfloat16 and float16 (the statistics in float32 either way), and the edge cases of `profile_inputs`. The CLS
    token's query gets no gradient."""
    inputs = profile_inputs(2, 3, grid, 16, dtype)
    generator = torch.Generator().manual_seed(1)
    patches = grid[0] * grid[1]
    grad_row = torch.randn(2, 3, patches, grid[0], generator=generator)
    grad_col = torch.randn(2, 3, patches, grid[1], generator=generator)

    def run(function, precision, weight_precision):
        tensors = [inputs[0].to(precision)] + [t.to(weight_precision) for t in inputs[1:]]
        tensors = [t.detach().requires_grad_() for t in tensors]
        row, col = function(*tensors)
        loss = (row * grad_row.to(row.dtype)).sum() + (col * grad_col.to(col.dtype)).sum()
        return [row, col, *torch.autograd.grad(loss, tensors)]

    def formula(query, weight, bias):
        return attention.profiles_of_queries(query, weight, bias, grid, *profile_constants(grid))

    actual = run(lambda *tensors: profiles_kernel(*tensors, grid), dtype, torch.float32)
    low = run(formula, dtype, torch.float32)
    exact = run(formula, torch.float64, torch.float64)
    assert [t.dtype for t in actual] == [torch.float32, torch.float32, dtype, torch.float32, torch.float32]
    names = ("row", "column", "query's gradient", "weight's gradient", "bias's gradient")
    for name, kernel, float32, float64 in zip(names, actual, low, exact):
        # The query's gradient is rounded to the query's dtype, towards zero under the interpreter: one more step.
        rounding = 4 * 2.0**-23 + (torch.finfo(kernel.dtype).eps if kernel.dtype != torch.float32 else 0.0)
        error = (kernel.double() - float64).abs().max().item()
        allowed = 2 * (float32.double() - float64).abs().max().item() + rounding * float64.abs().max().item()
        assert error <= allowed, (name, error, allowed)
    assert actual[2][:, :, 0].eq(0).all()
    # Values flush to exact zeros where the formula's do (the floored strength's row profiles, narrow Gaussians on
    # large grids), but for the floored strength's own line, whose value is the floor itself, within rounding.
    assert (exact[0] == 0).any()
    for kernel, float64 in zip(actual[:2], exact[:2]):
        flushed = float64 == 0
        assert (kernel[flushed] <= attention.PROFILE_FLOOR * (1 + 1e-5)).all()
        assert (kernel[~flushed] > 0).all()


def test_profile_operators_pass_opcheck():
    """Schema, fake implementations, autograd registration and AOT dispatch of both profile operators."""
    grid = (3, 5)
    query, weight, bias = (t.requires_grad_() for t in profile_inputs(1, 2, grid, 16, torch.float32))
    table = attention.grid_distance_table(5, -8.0, 25.0, torch.float32, "cpu")
    constants = (0.004, attention.PROFILE_FLOOR, attention.FLUSH_CLAMP)
    arguments = (query, weight, bias, table, *constants, *grid)
    torch.library.opcheck(torch.ops.locatvit.triton_gaussian_profiles.default, arguments)
    grads = (torch.randn(1, 2, 15, 3), torch.randn(1, 2, 15, 5))
    detached = (t.detach() for t in (query, weight, bias))
    backward_arguments = (*grads, *detached, table, *constants)
    torch.library.opcheck(torch.ops.locatvit.triton_gaussian_profiles_backward.default, backward_arguments)


def test_profile_operator_bad_inputs_raise_clear_errors():
    query, weight, bias = profile_inputs(1, 2, (3, 5), 16, torch.float32)
    table = attention.grid_distance_table(5, -8.0, 25.0, torch.float32, "cpu")
    constants = (0.004, attention.PROFILE_FLOOR, attention.FLUSH_CLAMP)
    profiles = triton_attention.triton_gaussian_profiles
    with pytest.raises(ValueError, match="16 tokens do not fit a 4 x 5 grid"):
        profiles(query, weight, bias, table, *constants, 4, 5)
    with pytest.raises(ValueError, match=r"distance table must be \(5, 5\)"):
        profiles(query, weight, bias, table[:4, :4], *constants, 3, 5)
    with pytest.raises(ValueError, match=r"weight and bias must be \(3, 16\) and \(3,\)"):
        profiles(query, weight[:, :8], bias, table, *constants, 3, 5)
    with pytest.raises(ValueError, match="must be float32"):
        profiles(query, weight.double(), bias, table, *constants, 3, 5)


def test_model_takes_the_profiles_kernel_with_the_attention_kernel(monkeypatch):
    """Where the automatic choice takes the Triton kernels (here the CPU under the interpreter, the fused CPU kernel
    set aside), the Gaussian's profiles come from their Triton kernel: once per layer in forward and once more in
    backward (recomputed), their gradient from its one operator per layer, and the training step equals the eager
    reference's (computed before, with the profiles of the fused CPU kernel or the formula), also compiled."""
    model = LocAtViTForSemanticSegmentation(tiny_config(attention_backend="cuda_triton")).train()
    reference = LocAtViTForSemanticSegmentation(tiny_config(attention_backend="eager")).train()
    reference.load_state_dict(model.state_dict())
    pixel_values, labels = torch.randn(2, 3, 40, 24), torch.randint(0, 5, (2, 40, 24))

    def step(model):
        loss = model(pixel_values, labels=labels, interpolate_pos_encoding=True).loss
        loss.backward()
        return loss.detach()

    expected = step(reference)
    monkeypatch.setattr(attention, "TRITON_DEVICES", ("cuda", "cpu"))
    monkeypatch.setattr(modeling, "fused_cpu_profiles", lambda: None)
    attention.triton_checked(torch.device("cpu"), torch.float32, model.config.head_dim)
    with OperatorCalls() as calls:
        torch.testing.assert_close(step(model), expected)
    assert_gradients_close(model, reference)
    layers = model.config.num_hidden_layers
    assert calls.names.count("locatvit.triton_gaussian_profiles.default") == 2 * layers
    assert calls.names.count("locatvit.triton_gaussian_profiles_backward.default") == layers
    model.zero_grad(set_to_none=True)
    compiled, graphs = compile_recording_graphs(model)
    torch.testing.assert_close(step(compiled), expected)
    assert_gradients_close(model, reference)
    assert "locatvit.triton_gaussian_profiles.default" in graphs[0]
    assert "locatvit.triton_gaussian_profiles_backward.default" in graphs[1]


def test_first_check_from_inside_checkpointed_layers(monkeypatch, caplog):
    """The kernels' check often first runs from inside a layer's forward pass: under the selective checkpointing of
    a forced `cuda_triton` (the profiles' kernel asks first), or under the model's activation checkpointing around an
    automatic choice. It passes there all the same (it runs in a thread of its own), and the kernels run."""
    monkeypatch.setattr(attention, "TRITON_DEVICES", ("cuda", "cpu"))
    monkeypatch.setattr(modeling, "fused_cpu_profiles", lambda: None)
    pixel_values, labels = torch.randn(2, 3, 40, 24), torch.randint(0, 5, (2, 40, 24))
    for config, checkpointing in ((tiny_config(attention_backend="cuda_triton"), False), (tiny_config(), True)):
        attention.cached_triton_check.cache_clear()
        model = LocAtViTForSemanticSegmentation(config).train()
        if checkpointing:
            model.activation_checkpointing_enable()
        caplog.clear()
        with caplog.at_level("WARNING", logger=attention.__name__), OperatorCalls() as calls:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                model(pixel_values, labels=labels, interpolate_pos_encoding=True).loss.backward()
        assert "failed" not in caplog.text
        assert attention.triton_checked(torch.device("cpu"), torch.bfloat16, config.head_dim)
        assert "locatvit.triton_gaussian_profiles_backward.default" in calls.names
        assert "locatvit.triton_gaussian_attention_backward.default" in calls.names


def test_export_keeps_plain_operators_where_the_kernels_are_chosen(monkeypatch):
    """Where the automatic choice takes the Triton kernels, `torch.export` (the ONNX exporter's tracer) still gets
    the plain operators: no Triton operator in the exported graph, and the same outputs as the eager model."""
    monkeypatch.setattr(attention, "TRITON_DEVICES", ("cuda", "cpu"))
    model = LocAtViTForSemanticSegmentation(tiny_config()).eval()
    pixel_values = torch.randn(1, 3, 32, 32)
    exported = torch.export.export(model, (pixel_values,))
    targets = {str(node.target) for node in exported.graph.nodes if node.op == "call_function"}
    assert targets and not any("locatvit" in target for target in targets)
    with torch.no_grad():
        torch.testing.assert_close(exported.module()(pixel_values).logits, model(pixel_values).logits)


def test_bad_inputs_raise_clear_errors():
    query, key, value, row, col = attention_inputs(1, 1, (3, 5), 16, 1, torch.float32)
    with pytest.raises(ValueError, match="H \\* W = P = N - num_prefix"):
        triton_attention.triton_gaussian_attention(query, key, value, row[:, :, 1:], col[:, :, 1:], 0.25, 1)
    with pytest.raises(ValueError, match="share one dtype"):
        triton_attention.triton_gaussian_attention(query, key.double(), value, row, col, 0.25, 1)
    slices = torch.zeros(triton_attention.MAX_SLICES + 1, 1, 2, 1)  # one CLS token and one patch each
    profile = torch.ones(triton_attention.MAX_SLICES + 1, 1, 1, 1)
    with pytest.raises(ValueError, match="exceeds the 65535 .* split the batch"):
        triton_attention.triton_gaussian_attention(slices, slices, slices, profile, profile, 0.25, 1)


def test_module_imports_without_triton_and_explains_cpu_tensors():
    """Copied alone (as Hugging Face remote code) where Triton is absent, the module imports and says the kernel is
    unavailable; with Triton but without its interpreter, CPU tensors get an explanation instead of a crash."""
    script = f"""
import importlib.util, sys
sys.modules["triton"] = None  # `import triton` raises ImportError
spec = importlib.util.spec_from_file_location("remote_copy", {str(MODULE_PATH)!r})
module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)
import torch
assert not module.triton_available()
tensors = [torch.zeros(1, 1, 5, 16)] * 3 + [torch.zeros(1, 1, 4, 2)] * 2
for expected in ("needs the `triton` package", "set TRITON_INTERPRET=1"):
    try:
        module.triton_gaussian_attention(*tensors, 0.25, 1)
    except RuntimeError as error:
        assert expected in str(error), error
    else:
        raise AssertionError("no error")
    del sys.modules["triton"]  # Triton importable again, the interpreter off
    module._triton_importable.cache_clear()
print("ok")
"""
    environment = {**os.environ, "TRITON_INTERPRET": "0"}
    completed = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=environment)
    assert completed.returncode == 0 and completed.stdout.strip() == "ok", completed.stderr[-3000:]


def test_kernels_compile_for_ampere_and_hopper_within_their_resources(tmp_path):
    """Every kernel, in each dtype, compiled for sm_80 and sm_90 by Triton's own compiler and `ptxas` (no GPU needed,
    `benchmarks/bench_triton.py --compile-only`), at the released models' grid (14 x 14, a CLS token, head size 64)
    and at a grid whose rows are cut into segments, and the profile kernel (forward and gradient) alike: each fits the
    device's shared memory per block; in bfloat16 and float16 at the released grid no attention kernel spills
    registers (what `_config`'s blocks were chosen for), and no profile kernel spills at all. The interpreter
    tests above check the numbers; this checks that the same kernels build for real GPUs."""
    output = tmp_path / "compile.json"
    command = [
        sys.executable, str(MODULE_PATH.parents[2] / "benchmarks" / "bench_triton.py"), "--compile-only",
        "--arch", "80", "90", "--dtype", "bfloat16", "float16", "float32", "--width", "14", "100", "--json", str(output),
    ]  # fmt: skip
    environment = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    completed = subprocess.run(command, capture_output=True, text=True, env=environment, timeout=900)
    assert completed.returncode == 0, completed.stderr[-3000:]
    rows = json.loads(output.read_text())["compile"]
    attention_rows = [row for row in rows if not row["kernel"].startswith("profiles")]
    profile_rows = [row for row in rows if row["kernel"].startswith("profiles")]
    assert len(attention_rows) == 2 * 3 * 2 * 4 and len(profile_rows) == 2 * 3 * 2 * 2
    for row in rows:
        assert row["registers"] is not None and row["spilled_bytes"] is not None, row
        assert 0 <= row["shared_bytes"] <= row["shared_limit"], row
    for row in attention_rows:
        assert row["shared_bytes"] > 0, row
        assert (row["rows_per_block"], row["segments"]) == ((4, 1) if row["width"] == 14 else (1, 2)), row
        if row["width"] == 14 and row["dtype"] != "float32":
            assert row["spilled_bytes"] == 0, row
    assert all(row["spilled_bytes"] == 0 for row in profile_rows)
