"""The fused CPU inference kernel (`cpu_attention_locatvit`) equals sdpa reading the written bias, and the model uses
it exactly where it should."""

import logging
import os
import shutil
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import locatvit_hf.modeling_locatvit as modeling
from locatvit_hf import LocAtViTForImageClassification, LocAtViTForSemanticSegmentation
from locatvit_hf.cpu_attention_locatvit import CAPABILITY_FLAGS, KernelBuild, _load, fused_cpu_attention
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


def logits_with_and_without(model, monkeypatch, name: str):
    """Inference logits of `model` on a non-square grid other than the configured one, first with the kernel's
    operator behind `modeling.<name>` counting its calls, then with it unavailable (None): (calls, with, without)."""
    pixels = torch.randn(2, 3, 40, 24)
    operator, calls = getattr(modeling, name)(), []
    monkeypatch.setattr(modeling, name, lambda: lambda *args: calls.append(1) or operator(*args))
    with torch.inference_mode():
        with_operator = model(pixels, interpolate_pos_encoding=True).logits
    monkeypatch.setattr(modeling, name, lambda: None)
    with torch.inference_mode():
        without_operator = model(pixels, interpolate_pos_encoding=True).logits
    return len(calls), with_operator, without_operator


def token_major(batch, seq_len, heads, dim):
    """(batch, heads, N, dim) views of a (batch, N, heads * dim) projection, as the attention gets them."""
    return torch.randn(batch, seq_len, heads, dim).transpose(1, 2)


@pytest.mark.parametrize(
    "batch, heads, dim, grid",
    [
        (2, 2, 16, (4, 4)),
        (1, 1, 16, (3, 5)),  # one (image, head): the queries are split into blocks to give every thread work
        (2, 3, 64, (14, 14)),  # ViT-Tiny at 224 px
        (1, 2, 24, (7, 30)),  # a non-square grid, a head size that is not a whole number of vectors
        (1, 2, 16, (30, 7)),  # a narrow grid (vectors of keys span several grid rows) taller than a vector
        (1, 1, 32, (24, 24)),  # 577 tokens: scores in several blocks of queries
    ],
)
def test_kernel_equals_sdpa_with_the_written_bias(kernel, batch, heads, dim, grid):
    module = trained_like_bias(dim, grid)
    seq_len = grid[0] * grid[1] + NUM_PREFIX_TOKENS
    query, key, value = (token_major(batch, seq_len, heads, dim) for _ in range(3))
    query = query * 3  # sharper attention than random unit vectors
    with torch.inference_mode():
        row, col = module.patch_profiles(query, grid)
        bias = module(query, grid).clone()
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
    from locatvit_hf.cpu_attention_locatvit import gaussian_profiles

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
    [(2, 2, 16, (4, 4)), (1, 3, 24, (7, 30)), (1, 2, 16, (30, 7)), (2, 3, 64, (14, 14)), (1, 1, 32, (24, 24))],
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
    assert sdpa.locatvit.encoder.layers[0].attention.uses_fused_cpu_kernel(torch.zeros(1), 0.0)
    assert_same_training_step(sdpa, eager, x, labels)


def test_second_derivatives_are_refused(kernel):
    """The backward is not itself differentiable: asking for a gradient of gradients raises instead of being wrong."""
    inputs = [token_major(1, 17, 1, 16).requires_grad_() for _ in range(3)]
    inputs += [torch.rand(1, 1, 16, 4, requires_grad=True), torch.rand(1, 1, 16, 4, requires_grad=True)]
    output = kernel(*inputs, 0.25, NUM_PREFIX_TOKENS)
    (grad_query,) = torch.autograd.grad(output.square().sum(), inputs[0], create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable|double backward|second"):
        grad_query.sum().backward()


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
    attention = model.locatvit.encoder.layers[0].attention
    query = torch.randn(1, 2, 17, 16)
    with torch.inference_mode():
        assert attention.uses_fused_cpu_kernel(query, 0.0)
        assert not attention.uses_fused_cpu_kernel(query.bfloat16(), 0.0)
        assert not attention.uses_fused_cpu_kernel(query, 0.1)
    assert attention.uses_fused_cpu_kernel(query.requires_grad_(), 0.0)  # a gradient is recorded
    eager = LocAtViTForImageClassification._from_config(tiny_config(), attn_implementation="eager")
    with torch.inference_mode():
        assert not eager.locatvit.encoder.layers[0].attention.uses_fused_cpu_kernel(query, 0.0)


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
    its inputs written, the next load is silent. The compiler is not run: `load_inline` is replaced."""
    from torch.utils import cpp_extension

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    monkeypatch.setattr(cpp_extension, "load_inline", lambda *args, **kwargs: None)
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
