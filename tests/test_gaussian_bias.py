"""The Gaussian module's separable profiles give the bias of the paper's formula (docs/method.md), evaluated entry by
entry; the bias-writing helpers of the attention backends keep what they promise."""

import math

import pytest
import torch

import locatvit_hf.attention_locatvit as attention
from locatvit_hf.attention_locatvit import SeparableBiasWriter, full_bias
from locatvit_hf.modeling_locatvit import LocAtViTGaussianBias

from .conftest import tiny_config


def module_bias(module: LocAtViTGaussianBias, query: torch.Tensor, grid) -> torch.Tensor:
    """The (batch, heads, N, N) bias of the module's profiles, in the queries' dtype, as the backends write it."""
    return full_bias(*module(query, grid), 1).to(query.dtype)


def formula_bias(module: LocAtViTGaussianBias, query: torch.Tensor, grid, initial_grid) -> torch.Tensor:
    """The bias of docs/method.md#the-bias written out literally: one exponential per (query, key) pair, in float64."""
    side = max(initial_grid)
    c = side**2
    shift = math.log(c - 1) if c > 2 else 0.0
    eps = 0.1
    while 0.5 * (side - 1) ** 2 / eps**2 > 32500:
        eps *= 2
    floor = max(-0.5 * (side - 1) ** 2, -6550.0)
    w_var, b_var = module.variance_proj.weight.double(), module.variance_proj.bias.double()
    w_alpha, b_alpha = module.strength_proj.weight.double(), module.strength_proj.bias.double()
    height, width = grid
    batch, heads, seq_len, _ = query.shape
    bias = torch.zeros(batch, heads, seq_len, seq_len, dtype=torch.float64)
    for b in range(batch):
        for h in range(heads):
            for i in range(height * width):
                q = query[b, h, 1 + i].double()
                var = c * torch.sigmoid(w_var @ q + b_var - shift)
                if tuple(grid) != tuple(initial_grid):
                    var = var * min(height, width) / min(initial_grid)
                alpha = torch.nn.functional.softplus(w_alpha @ q + b_alpha)[0]
                r_i, c_i = divmod(i, width)
                for j in range(height * width):
                    r_j, c_j = divmod(j, width)
                    d_row = max(-0.5 * (r_i - r_j) ** 2, floor)
                    d_col = max(-0.5 * (c_i - c_j) ** 2, floor)
                    bias[b, h, 1 + i, 1 + j] = alpha * torch.exp(d_row / (var[0] + eps) + d_col / (var[1] + eps))
    return bias


def randomized_module(config) -> LocAtViTGaussianBias:
    module = LocAtViTGaussianBias(config)
    with torch.no_grad():  # trained-like values: variances and strengths far from their initial 1 and ln 2
        module.variance_proj.weight.normal_(0, 0.5)
        module.variance_proj.bias.uniform_(-3, 3)
        module.strength_proj.weight.normal_(0, 0.5)
        module.strength_proj.bias.uniform_(-1, 2)
    return module.eval()


@pytest.mark.parametrize(
    "image_size, grid",
    [
        (32, (4, 4)),  # the initial grid
        (32, (3, 5)),  # smaller and non-square: variance scaling
        (32, (6, 7)),  # larger than the initial grid: the distance clamp bites
        ((32, 48), (4, 6)),  # non-square initial grid
        ((32, 48), (7, 3)),
    ],
)
def test_bias_matches_formula(image_size, grid):
    config = tiny_config(image_size=image_size)
    module = randomized_module(config)
    seq_len = 1 + grid[0] * grid[1]
    query = torch.randn(2, config.num_attention_heads, seq_len, config.head_dim) * 2
    expected = formula_bias(module, query, grid, config.grid_size)
    with torch.no_grad():
        actual = module_bias(module, query, grid)
    assert actual.shape == expected.shape
    assert actual.dtype == query.dtype
    torch.testing.assert_close(actual.double(), expected, rtol=1e-5, atol=1e-6)
    assert torch.all(actual[:, :, 0] == 0) and torch.all(actual[:, :, :, 0] == 0)


def test_clamp_is_what_bounds_large_grids():
    """On a grid larger than the initial one, far keys get exactly the clamped distance's value."""
    config = tiny_config(image_size=32)  # initial grid 4x4: floor = -0.5 * 3^2 = -4.5
    module = randomized_module(config)
    assert module.min_half_sq_distance == -4.5
    grid = (9, 9)
    query = torch.randn(1, config.num_attention_heads, 1 + 81, config.head_dim)
    with torch.no_grad():
        bias = module_bias(module, query, grid)
    # Query at (0, 0): keys at columns 3..8 of row 0 are all clamped to the same distance.
    row0 = bias[0, 0, 1, 1 : 1 + 9]
    torch.testing.assert_close(row0[3:], row0[3].expand(6))
    assert row0[2] > row0[3]


def test_eps_and_clamp_constants_follow_the_spec():
    for side, expected_eps in [(14, 0.1), (32, 0.2), (64, 0.4)]:
        module = LocAtViTGaussianBias(tiny_config(image_size=side * 8, patch_size=8))
        assert module.eps == pytest.approx(expected_eps)
        assert 0.5 * (side - 1) ** 2 / module.eps**2 <= 32500
    assert LocAtViTGaussianBias(tiny_config(image_size=512, patch_size=4)).min_half_sq_distance == -6550.0


def test_initial_variance_is_one_and_strength_ln2():
    """With zero weights (the from-scratch init has zero biases), var = 1 and alpha = ln 2 exactly
    (docs/method.md#initialization)."""
    config = tiny_config()
    module = LocAtViTGaussianBias(config)
    with torch.no_grad():
        for linear in (module.variance_proj, module.strength_proj):
            linear.weight.zero_()
            linear.bias.zero_()
    query = torch.randn(1, 2, 5, config.head_dim)
    variance, strength = module.variance_and_strength(query, config.grid_size)
    torch.testing.assert_close(variance, torch.ones_like(variance))
    torch.testing.assert_close(strength, torch.full_like(strength, math.log(2)))


def test_pooled_query_shortcut_for_large_initial_grids():
    """Initial grid >= 32 in training (docs/method.md#pooled-query-shortcut-for-large-initial-grids): q pooled over
    2x2 blocks, bias of the query at the even position of each block, shared by the block's four queries, and
    evaluated at the even position of each key's block too (every second grid row and column, repeated)."""
    config = tiny_config(image_size=256, patch_size=8)  # grid 32x32
    module = randomized_module(config).train()
    assert module.pools_queries_in_training
    grid = (6, 5)  # odd width: the last block is a 2x1 half block
    heads, dim = config.num_attention_heads, config.head_dim
    query = torch.randn(1, heads, 1 + 30, dim)
    with torch.no_grad():
        actual = module_bias(module, query, grid)
        full = module_bias(module.eval(), query, grid)
    # Reference: pooled query placed at the block's even corner, evaluated with the full-grid formula at the even
    # corner of each key's block.
    patches = query[:, :, 1:].reshape(1, heads, 6, 5, dim)
    key_corners = [0] + [1 + (r // 2 * 2) * 5 + (c // 2 * 2) for r in range(6) for c in range(5)]
    for r in range(6):
        for c in range(5):
            block = patches[:, :, r // 2 * 2 : r // 2 * 2 + 2, c // 2 * 2 : c // 2 * 2 + 2].mean(dim=(2, 3))
            corner = (r // 2 * 2) * 5 + (c // 2 * 2)
            probe = query.clone()
            probe[:, :, 1 + corner] = block
            with torch.no_grad():
                reference = module_bias(module.eval(), probe, grid)[:, :, 1 + corner][..., key_corners]
            torch.testing.assert_close(actual[:, :, 1 + r * 5 + c], reference)
    assert not torch.allclose(actual, full)


def test_separable_writer_gradcheck():
    """The hand-written backward of the bias writer equals numerical gradients (float64)."""
    row = torch.rand(2, 2, 6, 2, dtype=torch.float64, requires_grad=True)
    col = torch.rand(2, 2, 6, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda r, c: SeparableBiasWriter.apply(r, c, 1, torch.float64), (row, col))


def test_bias_gradients_equal_autograd_through_the_formula():
    """Gradients reaching the queries and both linear maps equal those of the entry-by-entry formula."""
    config = tiny_config(image_size=32)
    module = randomized_module(config).double()
    grid = (3, 5)
    query = torch.randn(1, 2, 16, config.head_dim, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(1, 2, 16, 16, dtype=torch.float64)
    (module_bias(module, query, grid) * weight).sum().backward()
    fast = [query.grad.clone()] + [p.grad.clone() for p in module.parameters()]
    query.grad = None
    module.zero_grad()
    (formula_bias_differentiable(module, query, grid, config.grid_size) * weight).sum().backward()
    slow = [query.grad] + [p.grad for p in module.parameters()]
    for a, b in zip(fast, slow):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


def formula_bias_differentiable(module, query, grid, initial_grid):
    """The bias of docs/method.md#the-bias on the whole (N x N) grid of pairs with plain autograd (no factorization, no
    custom backward)."""
    side = max(initial_grid)
    c = side**2
    eps = module.eps
    height, width = grid
    q = query[:, :, 1:]
    var = c * torch.sigmoid(module.variance_proj(q) - math.log(c - 1))
    if tuple(grid) != tuple(initial_grid):
        var = var * min(grid) / min(initial_grid)
    alpha = torch.nn.functional.softplus(module.strength_proj(q))
    rows = torch.arange(height, dtype=q.dtype).repeat_interleave(width)
    cols = torch.arange(width, dtype=q.dtype).repeat(height)
    floor = max(-0.5 * (side - 1) ** 2, -6550.0)
    d_row = (-0.5 * (rows[:, None] - rows[None, :]) ** 2).clamp(min=floor)
    d_col = (-0.5 * (cols[:, None] - cols[None, :]) ** 2).clamp(min=floor)
    patch = alpha * torch.exp(d_row / (var[..., 0:1] + eps) + d_col / (var[..., 1:2] + eps))
    return torch.nn.functional.pad(patch, (1, 0, 1, 0))


@pytest.mark.parametrize("grid", [(14, 14), (17, 16)])  # both sides of the 256-patch switch
def test_bias_gradient_reduction_on_small_and_large_grids(grid):
    from locatvit_hf.attention_locatvit import reduce_bias_gradient

    height, width = grid
    patches = height * width
    grad = torch.randn(3, patches + 1, patches + 1, dtype=torch.float64)[:, 1:, 1:]  # strided, like the mask's block
    row = torch.rand(3, patches, height, dtype=torch.float64)
    col = torch.rand(3, patches, width, dtype=torch.float64)
    grad_row, grad_col = torch.empty_like(row), torch.empty_like(col)
    reduce_bias_gradient(grad, row, col, grad_row, grad_col)
    blocks = grad.reshape(3, patches, height, width)
    torch.testing.assert_close(grad_row, torch.einsum("sprc,spc->spr", blocks, col))
    torch.testing.assert_close(grad_col, torch.einsum("sprc,spr->spc", blocks, row))


def test_bias_holds_no_subnormal_numbers():
    """Narrow Gaussians underflow far from the query: those entries are exact zeros, never subnormal floats (which
    x86 CPUs process about 100x slower), and the rest still equals the formula."""
    config = tiny_config(image_size=128, patch_size=8)  # grid 16 x 16
    torch.manual_seed(0)
    module = randomized_module(config)
    with torch.no_grad():
        module.variance_proj.bias.fill_(-8.0)  # variances ~0.1: exp(-0.5 * 15^2 / 0.2) underflows float32
        query = torch.randn(2, 2, 1 + 16 * 16, config.head_dim)
        bias = module_bias(module.eval(), query, (16, 16))
    magnitude = bias.abs()
    assert not ((magnitude > 0) & (magnitude < torch.finfo(torch.float32).tiny)).any()
    assert (bias == 0).float().mean() > 0.5
    expected = formula_bias(module, query, (16, 16), config.grid_size)
    torch.testing.assert_close(bias.double(), expected, rtol=1e-5, atol=1e-6)


def test_bias_buffer_layout():
    """`new_bias_buffer`: zero prefix rows and columns, rows padded to 64-byte lines, and on CPU each row's patch
    block starting on a line (aligned vector stores)."""
    from locatvit_hf.attention_locatvit import new_bias_buffer

    for seq_len in (17, 197, 1025):
        bias = new_bias_buffer((2, 3, seq_len, seq_len), torch.float32, torch.device("cpu"))
        assert bias.shape == (2, 3, seq_len, seq_len) and bias.stride(-1) == 1
        assert bias.stride(-2) % 16 == 0 and bias.stride(-2) >= seq_len
        assert bias[0, 0, 1, 1:].data_ptr() % 64 == 0 and bias[1, 2, 5, 1:].data_ptr() % 64 == 0
        assert (bias[..., 0, :] == 0).all() and (bias[..., 0] == 0).all()


@pytest.mark.parametrize("backend", ["sdpa", "cpu_fused"])
def test_inference_reuses_one_bias_buffer(backend):
    """Without a gradient all layers and calls write their bias (and their profiles) into the encoder's one buffer
    each (no allocation, and no page faults, per layer), and results do not depend on what the buffers held before.
    With the fused CPU kernel no bias is written at all, only the profiles."""
    import locatvit_hf.modeling_locatvit as modeling
    from locatvit_hf import LocAtViTModel

    if backend == "cpu_fused" and attention.fused_cpu_attention() is None:
        pytest.skip("the fused CPU kernel is not built here")
    torch.manual_seed(0)
    config = tiny_config(num_hidden_layers=3, attention_backend=backend)
    model = LocAtViTModel._from_config(config, attn_implementation="sdpa").eval()
    workspace = model.encoder.bias_workspace
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        first = model(x).last_hidden_state
        pointers = {key: buffer.data_ptr() for key, buffer in workspace._buffers.items()}
        model(torch.randn(2, 3, 32, 32))
        again = model(x).last_hidden_state
    # The kernel writes its profiles into two query-major buffers, the formula into one (2, S, P) exponent.
    profiles = ["column profiles", "row profiles"] if modeling.fused_cpu_profiles() is not None else ["profiles"]
    expected = profiles if backend == "cpu_fused" else ["bias", *profiles]
    assert sorted(purpose for _, purpose in pointers) == sorted(expected)
    assert {k: b.data_ptr() for k, b in workspace._buffers.items()} == pointers
    torch.testing.assert_close(again, first, rtol=0, atol=0)


@pytest.mark.parametrize("grid", [(3, 3), (2, 4)])
def test_flushed_profiles_gradient(grid):
    """The profiles' hand-written backward (flushed exponential, query-major copies) equals numerical gradients,
    and autograd through the clamp, exp, threshold, slices and transposes it replaces, including at flushed entries
    (gradient 0) and on a non-square grid (whose distance table is padded)."""
    from locatvit_hf.modeling_locatvit import PROFILE_FLOOR, FlushedProfiles

    height, width = grid
    side, queries = max(grid), height * width
    torch.manual_seed(0)
    exponent = (torch.rand(2, 2, side, queries, dtype=torch.float64) * 10 - 8).requires_grad_()
    assert torch.autograd.gradcheck(FlushedProfiles.apply, (exponent, height, width))
    exponent = torch.rand(2, 2, side, queries) * 10 - 8
    exponent[0, 0, 0, :3] = torch.tensor([-200.0, -50.0, -43.5])  # flushed: below PROFILE_FLOOR
    exponent.requires_grad_()
    row, col = FlushedProfiles.apply(exponent, height, width)
    weights = torch.randn_like(row), torch.randn_like(col)
    (grad,) = torch.autograd.grad((row, col), exponent, weights)
    profile = torch.nn.functional.threshold(exponent.clamp(min=math.log(PROFILE_FLOOR) - 1).exp(), PROFILE_FLOOR, 0.0)
    reference = profile[:, 0, :height].transpose(-1, -2), profile[:, 1, :width].transpose(-1, -2)
    (expected,) = torch.autograd.grad(reference, exponent, weights)
    torch.testing.assert_close(row, reference[0].detach(), rtol=0, atol=0)
    torch.testing.assert_close(col, reference[1].detach(), rtol=0, atol=0)
    assert row.is_contiguous() and col.is_contiguous()
    torch.testing.assert_close(grad, expected)
    assert row[0, :3, 0].eq(0).all() and grad[0, 0, 0, :3].eq(0).all()


@pytest.mark.parametrize("limit", [1, 700, 2000])
@pytest.mark.parametrize("pixels", [(32, 32), (32, 48)])
def test_inference_in_query_blocks_matches_one_piece(monkeypatch, limit, pixels):
    """Above `INFERENCE_BIAS_BYTES`, inference writes and attends the bias one block of queries at a time (bounded
    memory at high resolution). The output equals the bias written in one piece, for blocks of one row, a few rows
    and a last partial block, on square and non-square grids; the workspace then holds one block's rows. (The path
    of inference without the fused CPU kernel: on accelerators, in other dtypes, or where the kernel is not built.)"""
    from locatvit_hf import LocAtViTModel

    config = tiny_config(num_hidden_layers=2, attention_backend="sdpa")
    model = LocAtViTModel._from_config(config, attn_implementation="sdpa").eval()
    x = torch.randn(2, 3, *pixels)
    with torch.no_grad():
        expected = model(x, interpolate_pos_encoding=True).last_hidden_state
        monkeypatch.setattr(attention, "INFERENCE_BIAS_BYTES", limit)
        blocked = model(x, interpolate_pos_encoding=True).last_hidden_state
    torch.testing.assert_close(blocked, expected)
    seq_len = 1 + (pixels[0] // 8) * (pixels[1] // 8)
    rows = {
        buffer.shape[-2] for (_, purpose), buffer in model.encoder.bias_workspace._buffers.items() if purpose == "bias"
    }
    blocks = -(-2 * 2 * seq_len * seq_len * 4 // limit)
    assert rows == {1 + -(-seq_len // blocks)} and rows.pop() < seq_len


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("slab_bytes", [2**19, 2**17])
def test_cuda_training_attention_runs_its_kernel_calls_on_meta_tensors(monkeypatch, dtype, slab_bytes):
    """`EfficientBiasAttention` calls CUDA's memory-efficient kernel directly (its numerics are checked on a GPU by
    benchmarks/check_accelerator.py); on meta tensors its calls, chunking and padded log-sum-exp are exercised
    here: outputs and gradients of the right shapes and dtypes, the profile gradients in float32."""
    monkeypatch.setattr(attention, "SLAB_BYTES", slab_bytes)
    batch, heads, (height, width), dim = 3, 2, (16, 12), 64
    seq_len = 1 + height * width
    query, key, value = (
        torch.empty(batch, seq_len, heads, dim, device="meta", dtype=dtype).transpose(1, 2).requires_grad_()
        for _ in "qkv"
    )
    row = torch.empty(batch, heads, height * width, height, device="meta", requires_grad=True)
    col = torch.empty(batch, heads, height * width, width, device="meta", requires_grad=True)
    chunks = attention.attention_chunks(batch, heads, seq_len, query.element_size())
    # (heads, N, N) of one image: 298 KB in float32, 149 KB in bfloat16
    expected_chunks = {(torch.float32, 2**19): 3, (torch.bfloat16, 2**19): 1}.get((dtype, slab_bytes), 6)
    assert len(chunks) == expected_chunks
    output = attention.EfficientBiasAttention.apply(query, key, value, row, col, 0.125, 1, attention.BiasWorkspace())
    assert output.shape == (batch, heads, seq_len, dim) and output.dtype == dtype
    grads = torch.autograd.grad(output.sum(), (query, key, value, row, col))
    assert [g.shape for g in grads] == [t.shape for t in (query, key, value, row, col)]
    assert [g.dtype for g in grads] == [dtype] * 3 + [torch.float32] * 2


@pytest.mark.parametrize("slab_bytes", [3200, 1600, 1000])  # two images, one image, two heads of one image
def test_chunk_views_write_through(monkeypatch, slab_bytes):
    """`EfficientBiasAttention` writes each chunk's profile gradients into `flat_chunk` views: every chunk of a
    contiguous tensor must be a view, so that together the chunks fill the whole tensor."""
    monkeypatch.setattr(attention, "SLAB_BYTES", slab_bytes)
    batch, heads, seq_len = 3, 4, 10
    target = torch.zeros(batch, heads, seq_len - 1, 3)
    chunks = attention.attention_chunks(batch, heads, seq_len, 4)
    for index, chunk in enumerate(chunks):
        attention.flat_chunk(target, chunk).fill_(index + 1)
    expected = torch.zeros_like(target)
    for index, chunk in enumerate(chunks):
        expected[chunk] = index + 1
    assert len(chunks) > 1 and (target > 0).all() and torch.equal(target, expected)


@pytest.mark.parametrize("image_size", [32, 256], ids=["per-query", "pooled-queries"])
def test_autocast_training_keeps_no_float32_copy_of_the_queries(image_size, monkeypatch):
    """Under bfloat16 autocast the variance and strength maps run in float32 on bfloat16 queries; for backward the
    Gaussian keeps those queries as they are (the attention keeps them anyway), not a float32 copy twice their
    size, and every gradient is that of autograd through the float32 product."""
    from locatvit_hf import LocAtViTModel

    config = tiny_config(image_size=image_size, num_hidden_layers=1)
    model = LocAtViTModel(config).train()
    module = model.encoder.layers[0].attention.gaussian_bias
    inside, saved = [], []
    module.register_forward_pre_hook(lambda *args: inside.append(True))
    module.register_forward_hook(lambda *args: inside.clear())

    def pack(tensor):
        if inside:
            saved.append(tensor)
        return tensor

    def training_step():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            output = model(pixel_values).last_hidden_state
        output.float().square().sum().backward()
        grads = [parameter.grad.clone() for parameter in model.parameters()]
        model.zero_grad()
        return output, grads

    pixel_values = torch.randn(2, 3, image_size, image_size)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        output, grads = training_step()
    query_size = output.numel()  # tokens x hidden size = tokens x heads x head size
    assert saved and not [t.shape for t in saved if t.dtype == torch.float32 and t.numel() >= query_size]

    def float32_product(tokens, weight, bias):
        return torch.addmm(bias[:, None], weight, tokens.to(weight.dtype).t())

    monkeypatch.setattr(attention.Float32Projection, "apply", float32_product)
    reference_output, reference_grads = training_step()
    torch.testing.assert_close(output, reference_output, rtol=0, atol=0)
    for grad, expected in zip(grads, reference_grads):
        torch.testing.assert_close(grad, expected, rtol=1e-5, atol=1e-7)
