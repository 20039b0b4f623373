"""The fused CPU kernel (`cpu_attention_locatvit`) equals sdpa reading the written bias, forward and backward, and the
model uses it exactly where it should; its custom operators (`torch.ops.locatvit.*`) pass `torch.library.opcheck`
and compile as single operators; without its C++ source it is simply unavailable."""

import logging
import os
import shutil
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from functorch.compile import make_boxed_func
from torch._dynamo.backends.common import aot_autograd

import locatvit_hf.attention_locatvit as attention_module
import locatvit_hf.cpu_attention_locatvit as cpu_attention
import locatvit_hf.modeling_locatvit as modeling
from locatvit_hf import LocAtViTForImageClassification, LocAtViTForSemanticSegmentation
from locatvit_hf.cpu_attention_locatvit import (
    CAPABILITY_FLAGS,
    KernelBuild,
    _load,
    fused_cpu_attention,
    fused_cpu_profiles,
    gaussian_profiles,
    kernel_available,
)
from locatvit_hf.modeling_locatvit import NUM_PREFIX_TOKENS, LocAtViTGaussianBias

from .conftest import assert_same_training_step, tiny_config

BUILDABLE = torch.backends.cpu.get_cpu_capability() in CAPABILITY_FLAGS and shutil.which("c++") is not None


@pytest.fixture(scope="module")
def kernel():
    if not BUILDABLE:
        pytest.skip("the kernel is built for x86 CPUs with AVX2 or AVX-512 and needs a C++ compiler")
    built = fused_cpu_attention()
    assert built is not None, "the kernel should build here (see the log for the build error)"
    return built


def trained_like_bias(head_dim: int, grid) -> LocAtViTGaussianBias:
    config = tiny_config(hidden_size=2 * head_dim, image_size=(8 * grid[0], 8 * grid[1]))
    module = LocAtViTGaussianBias(config)
    with torch.no_grad():  # variances and strengths far from their initial 1 and ln 2
        module.variance_proj.weight.normal_(0, 0.5)
        module.variance_proj.bias.uniform_(-3, 3)
        module.strength_proj.weight.normal_(0, 0.5)
        module.strength_proj.bias.uniform_(-1, 2)
    return module.eval()


def spread_gaussians(model) -> None:
    """Variances and strengths of every layer far from their initial 1 and ln 2, so that the bias matters."""
    for layer in model.locatvit.encoder.layers:
        gaussian = layer.attention.gaussian_bias
        with torch.no_grad():
            gaussian.variance_proj.bias.uniform_(-3, 3)
            gaussian.strength_proj.bias.uniform_(0, 3)


# Where the model looks each of the kernel's entry points up.
CALLERS = {"fused_cpu_attention": attention_module, "fused_cpu_profiles": modeling}


def logits_with_and_without(model, monkeypatch, name: str):
    """Inference logits of `model` on a non-square grid other than the configured one, first with the kernel's
    operator behind `<caller>.<name>` counting its calls, then with it unavailable (None): (calls, with, without)."""
    pixels = torch.randn(2, 3, 40, 24)
    caller = CALLERS[name]
    operator, calls = getattr(caller, name)(), []
    monkeypatch.setattr(caller, name, lambda: lambda *args: calls.append(1) or operator(*args))
    with torch.inference_mode():
        with_operator = model(pixels, interpolate_pos_encoding=True).logits
    monkeypatch.setattr(caller, name, lambda: None)
    with torch.inference_mode():
        without_operator = model(pixels, interpolate_pos_encoding=True).logits
    return len(calls), with_operator, without_operator


def selects_the_kernel(model, query, dropout: float = 0.0) -> bool:
    """Whether `model`'s attention runs the fused kernel for this (batch, heads, 17, dim) query (a 4 x 4 grid)."""
    profiles = torch.rand(*query.shape[:2], 16, 4), torch.rand(*query.shape[:2], 16, 4)
    implementation, forced = model.config._attn_implementation, model.config.attention_backend
    chosen = attention_module.select_backend(
        query, profiles, implementation=implementation, forced=forced, dropout=dropout
    )
    return chosen == "cpu_fused"


def token_major(batch, seq_len, heads, dim):
    """(batch, heads, N, dim) views of a (batch, N, heads * dim) projection, as the attention gets them."""
    return torch.randn(batch, seq_len, heads, dim).transpose(1, 2)


def attention_inputs(batch, heads, dim, grid, dtype=torch.float32, requires_grad=False):
    """Query, key and value as the attention gets them, and random row and column profiles of `grid`."""
    seq_len = grid[0] * grid[1] + NUM_PREFIX_TOKENS
    inputs = [token_major(batch, seq_len, heads, dim) * 2 for _ in range(3)]
    inputs += [torch.rand(batch, heads, seq_len - 1, grid[0]) * 3, torch.rand(batch, heads, seq_len - 1, grid[1])]
    return [t.to(dtype).detach().requires_grad_(requires_grad) for t in inputs]


def profile_inputs(batch, heads, grid, requires_grad=False):
    """Statistics (batch, heads, 3, Q) and the constants of `gaussian_profiles`: a distance table (-0.5 times the
    squared distance between grid lines, as `grid_distance_table` gives at scale 1), eps, the floor and the clamp."""
    statistics = (torch.randn(batch, heads, 3, grid[0] * grid[1]) * 2).requires_grad_(requires_grad)
    lines = torch.arange(max(grid), dtype=torch.float32)
    distances = -0.5 * (lines[:, None] - lines[None, :]).square()
    return statistics, distances, 1e-3, modeling.PROFILE_FLOOR, modeling.FLUSH_CLAMP


@pytest.mark.parametrize(
    "batch, heads, dim, grid",
    [
        (2, 2, 16, (4, 4)),
        (1, 1, 16, (3, 5)),  # one (image, head): the queries are split into blocks to give every thread work
        (2, 3, 64, (14, 14)),  # ViT-Tiny at 224 px
        (1, 2, 24, (7, 30)),  # a non-square grid, a head size that is not a whole number of vectors
        (1, 2, 16, (30, 7)),  # a narrow grid (vectors of keys span several grid rows) taller than a vector
        (1, 1, 32, (24, 24)),  # 577 tokens: scores in several blocks of queries
        (1, 1, 8, (64, 65)),  # 4,161 tokens: keys in chunks of grid rows, the last one shorter (online softmax)
        (1, 1, 8, (300, 14)),  # chunks of a narrow grid (vectors of keys span several grid rows)
    ],
)
def test_kernel_equals_sdpa_with_the_written_bias(kernel, batch, heads, dim, grid):
    module = trained_like_bias(dim, grid)
    seq_len = grid[0] * grid[1] + NUM_PREFIX_TOKENS
    query, key, value = (token_major(batch, seq_len, heads, dim) for _ in range(3))
    query = query * 3  # sharper attention than random unit vectors
    with torch.inference_mode():
        row, col = module(query, grid)
        bias = attention_module.full_bias(row, col, NUM_PREFIX_TOKENS)
        expected = F.scaled_dot_product_attention(query, key, value, attn_mask=bias, scale=dim**-0.5)
        actual = kernel(query, key, value, row, col, dim**-0.5, NUM_PREFIX_TOKENS)
    assert bias[:, :, 1:, 1:].abs().max() > 0.1  # the bias matters
    assert actual.shape == (batch, seq_len, heads, dim)
    torch.testing.assert_close(actual, expected.transpose(1, 2), rtol=1e-5, atol=2e-6)


def assert_profiles_kernel_equals_the_formula(write_profiles, grid):
    """`gaussian_profiles_` (inference's profiles in one pass, query-major) against `profiles`, the formula in
    PyTorch operations: same values within float32 rounding, the same entries flushed to 0 (including a strength
    past softplus's linear threshold and strengths whose whole profile is flushed), NaN kept where the statistics
    have one."""
    module = trained_like_bias(16, grid)
    seq_len = grid[0] * grid[1] + NUM_PREFIX_TOKENS
    query = token_major(2, seq_len, 3, 16) * 3
    with torch.inference_mode():
        statistics = module.statistics(query)[..., NUM_PREFIX_TOKENS:].clone()
        statistics[0, 0, 2, :3] = torch.tensor([25.0, -60.0, -200.0])[: statistics.shape[-1]]
        statistics[1, 2, :, -1] = float("nan")
        distances = module.query_distances(grid, torch.float32, query.device)
        expected_row, expected_col = module.profiles(statistics, distances, grid)
        row, col = torch.empty(expected_row.shape), torch.empty(expected_col.shape)
        scale = module.variance_scale(grid)
        table = modeling.grid_distance_table(max(grid), module.min_half_sq_distance, scale, torch.float32, "cpu")
        write_profiles(row, col, statistics, table, module.eps / scale, modeling.PROFILE_FLOOR, modeling.FLUSH_CLAMP)
    assert (expected_row == 0).any() or (expected_col == 0).any()  # flushed entries are compared too
    for actual, expected in ((row, expected_row), (col, expected_col)):
        assert torch.equal(actual == 0, expected == 0) and torch.equal(actual.isnan(), expected.isnan())
        assert actual.isnan().any()
        torch.testing.assert_close(actual, expected, rtol=2e-5, atol=0, equal_nan=True)


@pytest.mark.parametrize("grid", [(14, 14), (7, 30), (30, 7), (32, 32), (1, 5)])
def test_profiles_kernel_equals_the_formula(kernel, grid):
    assert_profiles_kernel_equals_the_formula(modeling.fused_cpu_profiles(), grid)


@pytest.mark.parametrize("grid", [(4, 4), (3, 5), (14, 14), (6, 2)])
def test_profiles_kernel_gradient_equals_autograd_through_the_formula(kernel, grid):
    """`gaussian_profiles_backward` (the statistics' gradient in one pass, used in training) against float64
    autograd through `profiles`, with flushed entries, a strength past softplus's linear threshold and one whose
    profile is flushed whole."""
    module = trained_like_bias(16, grid)
    height, width = grid
    torch.manual_seed(0)
    statistics = torch.randn(2, 3, 3, height * width) * 2
    statistics[0, 0, 2, :3] = torch.tensor([25.0, -60.0, -200.0])
    statistics[0, 1, 0, :2] = torch.tensor([-12.0, 9.0])
    single, double = statistics.clone().requires_grad_(), statistics.double().requires_grad_()
    scale = module.variance_scale(grid)
    table = modeling.grid_distance_table(max(grid), module.min_half_sq_distance, scale, torch.float32, "cpu")
    row, col = gaussian_profiles(
        single, table, module.eps / scale, modeling.PROFILE_FLOOR, modeling.FLUSH_CLAMP, *grid
    )
    expected_row, expected_col = module.profiles(double, module.query_distances(grid, torch.float64, "cpu"), grid)
    assert (expected_row == 0).any()
    weights = torch.randn_like(expected_row), torch.randn_like(expected_col)
    (actual,) = torch.autograd.grad((row * weights[0].float()).sum() + (col * weights[1].float()).sum(), single)
    (reference,) = torch.autograd.grad((expected_row * weights[0]).sum() + (expected_col * weights[1]).sum(), double)
    assert (actual.double() - reference).norm() <= 1e-5 * reference.norm()


def test_kernel_reads_strided_profiles(kernel):
    """The attention takes profiles of any layout (here queries last, as the formula computes them): the same
    output and gradients as from contiguous copies."""
    grid, dim = (6, 9), 16
    seq_len = grid[0] * grid[1] + NUM_PREFIX_TOKENS
    query, key, value = (token_major(2, seq_len, 2, dim) for _ in range(3))
    lines = torch.rand(2, 2, 2, max(grid), seq_len - 1)
    strided = lines[:, :, 0, : grid[0]].transpose(-1, -2), lines[:, :, 1, : grid[1]].transpose(-1, -2)
    contiguous = tuple(t.contiguous() for t in strided)
    results = []
    for row, col in (strided, contiguous):
        inputs = [t.detach().requires_grad_() for t in (query, key, value, row, col)]
        output = kernel(*inputs, dim**-0.5, NUM_PREFIX_TOKENS)
        results.append((output, *torch.autograd.grad(output.square().sum(), inputs)))
    for actual, expected in zip(*results):
        torch.testing.assert_close(actual, expected, rtol=0, atol=0)


def written_bias_attention(query, key, value, row, col, scale):
    """The reference: the bias written out from its profiles (padded with the prefix's zero rows and columns) and
    plain autograd through matmul, softmax and matmul."""
    bias = (row.unsqueeze(-1) * col.unsqueeze(-2)).flatten(-2)
    bias = F.pad(bias, (NUM_PREFIX_TOKENS, 0, NUM_PREFIX_TOKENS, 0))
    probabilities = torch.softmax(query @ key.transpose(-1, -2) * scale + bias, dim=-1)
    return (probabilities @ value).transpose(1, 2)


@pytest.mark.parametrize(
    "batch, heads, dim, grid",
    [
        (2, 2, 16, (4, 4)),
        (1, 3, 24, (7, 30)),
        (1, 2, 16, (30, 7)),
        (2, 3, 64, (14, 14)),
        (1, 1, 32, (24, 24)),
        (1, 1, 8, (64, 65)),  # the forward's keys in chunks: the log-sum-exp the backward starts from
    ],
)
def test_kernel_gradients_equal_autograd_through_the_written_bias(kernel, batch, heads, dim, grid):
    """The backward (probabilities recomputed from the log-sum-exp block by block, bias gradient reduced to the
    profiles in the kernel) against autograd through the formula, for every input."""
    seq_len = grid[0] * grid[1] + NUM_PREFIX_TOKENS
    inputs = [token_major(batch, seq_len, heads, dim) * 2 for _ in range(3)]
    inputs += [torch.rand(batch, heads, seq_len - 1, grid[0]) * 3, torch.rand(batch, heads, seq_len - 1, grid[1])]
    inputs = [t.detach().requires_grad_() for t in inputs]
    weight = torch.randn(batch, seq_len, heads, dim)
    outputs = kernel(*inputs, dim**-0.5, NUM_PREFIX_TOKENS), written_bias_attention(*inputs, dim**-0.5)
    gradients = [torch.autograd.grad((output * weight).sum(), inputs) for output in outputs]
    for name, actual, expected in zip(["query", "key", "value", "row", "col"], *gradients):
        assert (actual - expected).norm() <= 1e-5 * expected.norm(), name


@pytest.mark.parametrize("batch, heads, dim, grid", [(2, 2, 8, (3, 4)), (1, 1, 16, (4, 3)), (1, 2, 4, (2, 5))])
def test_kernel_gradients_pass_gradcheck_in_float64(kernel, batch, heads, dim, grid):
    """The fast bias's gradients in float64 (the kernel runs in float64 too, for this check): numerical gradients of
    every input, the profiles included (their gradients are reduced from the bias gradient inside the kernel),
    against its backward."""
    seq_len = grid[0] * grid[1] + NUM_PREFIX_TOKENS
    inputs = [token_major(batch, seq_len, heads, dim).double() for _ in range(3)]
    inputs += [torch.rand(batch, heads, seq_len - 1, grid[0], dtype=torch.float64) * 3]
    inputs += [torch.rand(batch, heads, seq_len - 1, grid[1], dtype=torch.float64)]
    inputs = [t.requires_grad_() for t in inputs]
    assert torch.autograd.gradcheck(lambda *args: kernel(*args, dim**-0.5, NUM_PREFIX_TOKENS), inputs)


@pytest.mark.parametrize(
    "image_size, pixels, checkpointing",
    [
        (32, (40, 24), False),
        (32, (40, 24), True),  # gradient checkpointing: the forward runs again in backward
        (256, (256, 256), False),  # a 32 x 32 configured grid: the original's pooled-query training shortcut
    ],
)
def test_model_training_with_the_kernel_equals_eager(kernel, image_size, pixels, checkpointing):
    import copy

    config = tiny_config(image_size=image_size)
    sdpa = LocAtViTForSemanticSegmentation._from_config(copy.deepcopy(config), attn_implementation="sdpa").train()
    eager = LocAtViTForSemanticSegmentation._from_config(copy.deepcopy(config), attn_implementation="eager").train()
    spread_gaussians(sdpa)
    eager.load_state_dict(sdpa.state_dict())
    if checkpointing:
        for model in (sdpa, eager):
            model.activation_checkpointing_enable()
    x, labels = torch.randn(2, 3, *pixels), torch.randint(0, 5, (2, *pixels))
    assert selects_the_kernel(sdpa, torch.zeros(1, 1, 17, 16, requires_grad=True))
    assert_same_training_step(sdpa, eager, x, labels)


def test_second_derivatives_are_refused(kernel):
    """The backward is not itself differentiable: asking for a gradient of gradients raises instead of being wrong."""
    inputs = [token_major(1, 17, 1, 16).requires_grad_() for _ in range(3)]
    inputs += [torch.rand(1, 1, 16, 4, requires_grad=True), torch.rand(1, 1, 16, 4, requires_grad=True)]
    output = kernel(*inputs, 0.25, NUM_PREFIX_TOKENS)
    (grad_query,) = torch.autograd.grad(output.square().sum(), inputs[0], create_graph=True)
    with pytest.raises(RuntimeError, match="double backward"):
        grad_query.sum().backward()
    statistics, *constants = profile_inputs(1, 1, (4, 4), requires_grad=True)
    row, col = gaussian_profiles(statistics, *constants, 4, 4)
    (grad_statistics,) = torch.autograd.grad(row.square().sum() + col.square().sum(), statistics, create_graph=True)
    with pytest.raises(RuntimeError, match="double backward"):
        grad_statistics.sum().backward()


def test_kernel_rejects_profiles_of_another_grid(kernel):
    query = token_major(1, 17, 1, 16)
    row, col = torch.rand(1, 1, 16, 4), torch.rand(1, 1, 16, 4)
    with pytest.raises(RuntimeError, match="profiles do not match"):
        kernel(query, query, query, row[:, :, :15], col[:, :, :15], 0.25, NUM_PREFIX_TOKENS)
    with pytest.raises(RuntimeError, match="float32"):
        kernel(query.double(), query, query, row, col, 0.25, NUM_PREFIX_TOKENS)


@pytest.mark.parametrize("operator", ["fused_cpu_attention", "fused_cpu_profiles"])
@pytest.mark.parametrize("model_class", [LocAtViTForImageClassification, LocAtViTForSemanticSegmentation])
def test_model_outputs_equal_with_and_without_the_kernel(kernel, model_class, operator, monkeypatch):
    """Inference on CPU in float32 runs the kernel's attention (instead of the mask path) and its profiles operator
    (`gaussian_profiles_`, into the encoder's reused buffers, instead of the formula) once a layer each; the
    model's outputs equal those without either."""
    model = model_class._from_config(tiny_config(), attn_implementation="sdpa").eval()
    spread_gaussians(model)
    calls, fused, stock = logits_with_and_without(model, monkeypatch, operator)
    assert calls == model.config.num_hidden_layers
    torch.testing.assert_close(fused, stock, rtol=1e-5, atol=1e-5)


def test_kernel_only_where_it_applies(kernel):
    """Other dtypes, attention dropout and other attention implementations keep their paths; inference and
    training both use it."""
    model = LocAtViTForImageClassification._from_config(tiny_config(), attn_implementation="sdpa")
    query = torch.randn(1, 2, 17, 16)
    with torch.inference_mode():
        assert selects_the_kernel(model, query)
        assert not selects_the_kernel(model, query.bfloat16())
        assert not selects_the_kernel(model, query, dropout=0.1)
    assert selects_the_kernel(model, query.requires_grad_())  # a gradient is recorded
    eager = LocAtViTForImageClassification._from_config(tiny_config(), attn_implementation="eager")
    with torch.inference_mode():
        assert not selects_the_kernel(eager, query)


def test_environment_switch_turns_the_kernel_off(monkeypatch):
    monkeypatch.setenv("LOCATVIT_CPU_KERNEL", "0")
    assert _load.__wrapped__() is None


@pytest.mark.parametrize("grid", [(14, 14), (30, 7)])
def test_avx2_build_equals_the_reference(kernel, grid):
    """The build for AVX2 CPUs (which this machine can run, if it is the AVX-512 one) has no vectors of 16 keys: its
    bias is added one grid row at a time. Forward and backward operators against autograd through the formula, and
    its profiles against the formula's."""
    if torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"):
        pytest.skip("the CPU does not run AVX2 code")
    operators = _load("AVX2")
    assert operators is not None
    seq_len, dim = grid[0] * grid[1] + NUM_PREFIX_TOKENS, 16
    inputs = [token_major(2, seq_len, 2, dim) * 2 for _ in range(3)]
    inputs += [torch.rand(2, 2, seq_len - 1, grid[0]) * 3, torch.rand(2, 2, seq_len - 1, grid[1])]
    inputs = [t.detach().requires_grad_() for t in inputs]
    output, logsumexp = operators.gaussian_attention(*inputs, dim**-0.5, NUM_PREFIX_TOKENS)
    expected = written_bias_attention(*inputs, dim**-0.5)
    torch.testing.assert_close(output, expected, rtol=1e-5, atol=2e-6)
    weight = torch.randn(2, seq_len, 2, dim)
    expected_grads = torch.autograd.grad((expected * weight).sum(), inputs)
    grads = operators.gaussian_attention_backward(weight, *inputs, output, logsumexp, dim**-0.5, NUM_PREFIX_TOKENS)
    for name, actual, reference in zip(["query", "key", "value", "row", "col"], grads, expected_grads):
        assert (actual - reference).norm() <= 1e-5 * reference.norm(), name
    assert_profiles_kernel_equals_the_formula(operators.gaussian_profiles_, grid)


def build_messages(caplog) -> list[str]:
    """The loader's announcements of a compilation in the captured log."""
    return [record.getMessage() for record in caplog.records if "Compiling" in record.getMessage()]


def test_cached_kernel_loads_without_a_build_message(kernel, caplog):
    caplog.set_level(logging.INFO, logger="locatvit_hf.cpu_attention_locatvit")
    assert _load.__wrapped__() is not None
    assert build_messages(caplog) == []


def test_build_is_announced_until_the_library_is_cached(kernel, caplog, monkeypatch, tmp_path):
    """An empty extension cache announces the build (where, and what it does); the library in place and the stamp of
    its inputs written, the next load is silent. The compiler is not run: `load` is replaced."""
    from torch.utils import cpp_extension

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    monkeypatch.setattr(cpp_extension, "load", lambda *args, **kwargs: None)
    caplog.set_level(logging.INFO, logger="locatvit_hf.cpu_attention_locatvit")
    capability = torch.backends.cpu.get_cpu_capability()
    assert _load.__wrapped__(capability) is not None
    (message,) = build_messages(caplog)
    assert str(tmp_path) in message and capability in message
    build = KernelBuild(capability)
    (tmp_path / build.extension_name / f"{build.extension_name}.so").touch()  # what the build would have left
    caplog.clear()
    assert _load.__wrapped__(capability) is not None
    assert build_messages(caplog) == []


def test_loading_torch_extension_tools_hides_only_the_cuda_runtime_warning():
    """`torch.utils.cpp_extension` warns "No CUDA runtime is found" when it is imported by a CUDA build of PyTorch on
    a machine without a GPU, where the CPU kernel is built; the loader imports it without that warning."""
    if not (torch.cuda._is_compiled() and torch.version.cuda):
        pytest.skip("only CUDA builds of PyTorch look for a CUDA toolkit")
    env = {**os.environ, "CUDA_HOME": "/nonexistent/cuda", "CUDA_VISIBLE_DEVICES": ""}

    def stderr_of(code: str) -> str:
        command = [sys.executable, "-c", f"import logging; logging.basicConfig(); {code}"]
        return subprocess.run(command, env=env, capture_output=True, text=True, timeout=120, check=True).stderr

    assert "No CUDA runtime is found" in stderr_of("import torch.utils.cpp_extension")  # the warning this hides
    quiet = "from locatvit_hf.cpu_attention_locatvit import _import_cpp_extension; _import_cpp_extension()"
    assert "No CUDA runtime is found" not in stderr_of(quiet)


# ---------------------------------------------------------------------------------------------------------------------
# The custom operators (torch.ops.locatvit.*): opcheck, torch.compile, and the module without its C++ source

OPS = torch.ops.locatvit


@pytest.mark.parametrize(
    "dtype, requires_grad, grid",
    [
        (torch.float32, False, (4, 4)),
        (torch.float32, True, (4, 4)),
        (torch.float32, True, (3, 5)),  # a non-square grid
        (torch.float64, True, (2, 5)),
    ],
)
def test_attention_operators_pass_opcheck(kernel, dtype, requires_grad, grid):
    """Schema, fake implementation (shapes, strides: the output token-major, the gradients (batch, heads, N, dim)
    views of token-major tensors), autograd registration and AOT dispatch with dynamic shapes, for the attention and
    its backward operator."""
    inputs = attention_inputs(2, 2, 16, grid, dtype, requires_grad)
    torch.library.opcheck(OPS.gaussian_attention.default, (*inputs, 0.25, NUM_PREFIX_TOKENS))
    with torch.no_grad():
        output, logsumexp = OPS.gaussian_attention(*inputs, 0.25, NUM_PREFIX_TOKENS)
    grad_output = torch.randn_like(output)
    backward_args = (grad_output, *(t.detach() for t in inputs), output, logsumexp, 0.25, NUM_PREFIX_TOKENS)
    torch.library.opcheck(OPS.gaussian_attention_backward.default, backward_args)


@pytest.mark.parametrize("requires_grad, grid", [(False, (4, 4)), (True, (4, 4)), (True, (3, 5)), (True, (6, 2))])
def test_profile_operators_pass_opcheck(kernel, requires_grad, grid):
    """The profiles with their gradient, their backward operator, and the in-place writer (which mutates only its
    row and column buffers)."""
    statistics, *constants = profile_inputs(2, 3, grid, requires_grad)
    torch.library.opcheck(OPS.gaussian_profiles.default, (statistics, *constants, *grid))
    with torch.no_grad():
        row, col = OPS.gaussian_profiles(statistics, *constants, *grid)
    grads = torch.randn_like(row), torch.randn_like(col)
    torch.library.opcheck(
        OPS.gaussian_profiles_backward.default, (*grads, statistics.detach(), row, col, *constants[:3])
    )
    buffers = torch.zeros_like(row), torch.zeros_like(col)
    torch.library.opcheck(OPS.gaussian_profiles_.default, (*buffers, statistics.detach(), *constants))


class GraphRecorder:
    """A `torch.compile` backend that traces as "aot_eager" does (forward and backward through AOTAutograd, run
    uncompiled) and keeps every graph it is given: Dynamo's, then AOTAutograd's forward (and backward)."""

    def __init__(self):
        self.graphs = []

    def __call__(self, graph_module, example_inputs):
        self.graphs.append(graph_module)

        def keep(aot_graph, inputs):
            self.graphs.append(aot_graph)
            return make_boxed_func(aot_graph.forward)

        return aot_autograd(fw_compiler=keep, bw_compiler=keep)(graph_module, example_inputs)


def operators_called(graph_module) -> set:
    """The operators a graph calls, those a functionalization wrapper (`auto_functionalized`) calls included."""
    called = set()
    for node in graph_module.graph.nodes:
        if node.op == "call_function":
            called.add(node.target)
            called.update(arg for arg in node.args if isinstance(arg, torch._ops.OpOverload))
    return called


def test_operators_compile_as_single_operators_with_their_backward(kernel):
    """`torch.compile(fullgraph=True)` of the profiles and the attention: one graph (no break) that calls both
    operators, a backward graph that calls their backward operators, and the eager results and gradients."""
    grid, dim = (3, 5), 16
    query, key, value, _, _ = attention_inputs(2, 2, dim, grid, requires_grad=True)
    statistics, *constants = profile_inputs(2, 2, grid, requires_grad=True)

    def attend(query, key, value, statistics):  # looks the kernel up as the model does, inside the traced code
        row, col = gaussian_profiles(statistics, *constants, *grid)
        return fused_cpu_attention()(query, key, value, row, col, dim**-0.5, NUM_PREFIX_TOKENS)

    recorder = GraphRecorder()
    compiled = torch.compile(attend, backend=recorder, fullgraph=True)
    weight = torch.randn(2, grid[0] * grid[1] + NUM_PREFIX_TOKENS, 2, dim)
    results = []
    for function in (attend, compiled):
        output = function(query, key, value, statistics)
        results.append((output, *torch.autograd.grad((output * weight).sum(), (query, key, value, statistics))))
    for name, actual, expected in zip(["output", "query", "key", "value", "statistics"], *results[::-1]):
        torch.testing.assert_close(actual, expected, rtol=0, atol=0, msg=name)
    dynamo_graph, forward, backward = recorder.graphs
    for graph in (dynamo_graph, forward):
        assert {OPS.gaussian_profiles.default, OPS.gaussian_attention.default} <= operators_called(graph)
    assert {OPS.gaussian_profiles_backward.default, OPS.gaussian_attention_backward.default} <= operators_called(
        backward
    )


def test_inference_operators_compile_as_single_operators(kernel):
    """Inference as the encoder runs it: the profiles written in place into buffers, then the attention; compiled
    in one graph that calls both operators, with the eager output."""
    grid, dim = (4, 3), 16
    query, key, value, _, _ = attention_inputs(1, 2, dim, grid)
    statistics, *constants = profile_inputs(1, 2, grid)

    def attend(query, key, value, statistics):
        batch, heads, _, queries = statistics.shape
        row, col = (
            statistics.new_empty(batch, heads, queries, grid[0]),
            statistics.new_empty(batch, heads, queries, grid[1]),
        )
        fused_cpu_profiles()(row, col, statistics, *constants)
        return fused_cpu_attention()(query, key, value, row, col, dim**-0.5, NUM_PREFIX_TOKENS)

    recorder = GraphRecorder()
    with torch.no_grad():
        expected = attend(query, key, value, statistics)
        actual = torch.compile(attend, backend=recorder, fullgraph=True)(query, key, value, statistics)
    torch.testing.assert_close(actual, expected, rtol=0, atol=0)
    dynamo_graph, inference = recorder.graphs
    for graph in (dynamo_graph, inference):
        assert {OPS.gaussian_profiles_.default, OPS.gaussian_attention.default} <= operators_called(graph)


@pytest.fixture
def fresh_load():
    """`_load`'s cache emptied before and after the test: it sees the test's changes, and later tests do not."""
    _load.cache_clear()
    yield
    _load.cache_clear()


def test_without_its_source_the_kernel_is_unavailable(fresh_load, monkeypatch, tmp_path, caplog):
    """The module without `kernels/cpu_attention.cpp`: the kernel unavailable, said in one informational line however
    often asked, the operators raising a clear error if called anyway, the model on its PyTorch path."""
    monkeypatch.setattr(cpu_attention, "KERNEL_SOURCE", tmp_path / "cpu_attention.cpp")
    caplog.set_level(logging.DEBUG, logger=cpu_attention.__name__)
    for _ in range(2):
        assert not kernel_available()
        assert fused_cpu_attention() is None and modeling.fused_cpu_profiles() is None
    records = [record for record in caplog.records if record.name == cpu_attention.__name__]
    if torch.backends.cpu.get_cpu_capability() in CAPABILITY_FLAGS:
        (record,) = records
        assert record.levelno == logging.INFO and str(tmp_path / "cpu_attention.cpp") in record.getMessage()
    else:
        assert records == []
    query, (row, col) = token_major(1, 17, 1, 16), (torch.rand(1, 1, 16, 4), torch.rand(1, 1, 16, 4))
    with pytest.raises(RuntimeError, match="kernel is unavailable here.*kernel_available"):
        OPS.gaussian_attention(query, query, query, row, col, 0.25, NUM_PREFIX_TOKENS)
    model = LocAtViTForImageClassification._from_config(tiny_config(), attn_implementation="sdpa").eval()
    with torch.inference_mode():
        assert model(torch.randn(1, 3, 32, 32)).logits.isfinite().all()


def test_module_copied_alone_runs_without_the_kernel(tmp_path):
    """As Hugging Face remote code next to a checkpoint, the module is copied without its package and C++ source: it
    imports, defines no operators (which would replace the installed package's in the same process), reports the
    kernel unavailable, and logs one informational line and no warning."""
    shutil.copy(cpu_attention.__file__, tmp_path / "cpu_attention_locatvit.py")
    code = (
        "import logging, torch\n"
        "logging.basicConfig(level=logging.INFO, format='%(levelname)s %(name)s %(message)s')\n"
        "import cpu_attention_locatvit as module\n"
        "assert not module.kernel_available()\n"
        "assert module.fused_cpu_attention() is None and module.fused_cpu_profiles() is None\n"
        "assert not hasattr(torch.ops.locatvit, 'gaussian_attention')\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300, check=False
    )
    assert result.returncode == 0, result.stderr
    lines = result.stderr.splitlines()
    if torch.backends.cpu.get_cpu_capability() in CAPABILITY_FLAGS:
        (line,) = lines
        assert line.startswith("INFO cpu_attention_locatvit ") and "cpu_attention.cpp is not there" in line
    else:
        assert lines == []
