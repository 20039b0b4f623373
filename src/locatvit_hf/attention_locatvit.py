"""Attention with LocAtViT's Gaussian bias: the backends that compute it, and the one function that chooses.

Every backend computes softmax(q k^T * scale + B) v, where B is the Gaussian bias of `LocAtViTGaussianBias`, given
by its separable profiles: B[i, j] = row[i, r_j] * col[i, c_j] for patch query i and patch key j at grid position
(r_j, c_j), and 0 in the rows and columns of the prefix (CLS) token (docs/method.md). Backends take the same
arguments and return the output as (batch, N, heads, head_dim) and, for `eager` only, the attention probabilities.
`select_backend` holds the whole decision table; `config.attention_backend` forces a backend by name.

| backend | when (`attention_backend=None`) | what it does |
|---|---|---|
| `eager` | `attn_implementation="eager"`, and `torch.export` / ONNX export | the reference: the bias written out, softmax in at least float32; returns the probabilities |
| `sdpa` | otherwise: no bias, attention dropout, inference and compiled training where no kernel below runs | the bias written once per layer as `sdpa`'s float mask |
| `cpu_fused` | CPU, float32, no attention dropout, kernel built | the bias added inside a fused C++ kernel from the profiles |
| `cuda_triton` | CUDA, no attention dropout, once `triton_check` has passed on the device and dtype | a Triton kernel with the bias evaluated inside it, forward and backward (the profiles, too, from a Triton kernel: `triton_profiles`) |
| `cuda_chunked` | CUDA training where `cuda_triton` cannot run | the memory-efficient kernel in chunks; the bias recomputed in backward |
| `blocked` | training (not compiled) where none of the above runs: any device, dtype or head size | plain operators in blocks of queries, recomputed in backward: a ViT's memory |

In training, `cuda_triton` keeps the kernel's outputs and recomputes the Gaussian's profiles in backward
(`gaussian_attention`): they are (H + W) floats per query and head, the only thing it would keep that a plain ViT's
attention does not. Forward hooks on the Gaussian module then also fire during backward. Wherever the automatic
choice would take the Triton kernels (`triton_chosen`), the profiles come from their Triton kernel, whichever backend
then attends, as on CPU they come from the fused C++ kernel where it is built.
"""

import functools
import logging
import math
import threading
from collections.abc import Callable

import torch
from torch.autograd.function import once_differentiable
from torch.nn import functional as F
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

from .cpu_attention_locatvit import fused_cpu_attention
from .triton_attention_locatvit import DTYPES as TRITON_DTYPES
from .triton_attention_locatvit import MAX_SLICES as MAX_TRITON_SLICES
from .triton_attention_locatvit import interpreting as triton_interpreting
from .triton_attention_locatvit import triton_available, triton_gaussian_attention, triton_gaussian_profiles

logger = logging.getLogger(__name__)

NUM_PREFIX_TOKENS = 1  # the CLS token, which gets no Gaussian bias

# Profile values below this are set to 0, so that the product of two profiles is 0 or a normal float32: the bias then
# holds no subnormal numbers, which x86 CPUs multiply and add about 100x slower (a trained model's narrow Gaussians
# reach them on every far key). It changes a bias entry by less than 1e-37.
PROFILE_FLOOR = 2.0**-62
FLUSH_CLAMP = math.log(PROFILE_FLOOR) - 1.0  # exp of it is below the floor, so clamped entries are flushed


def flushed_exp(exponent: torch.Tensor) -> torch.Tensor:
    """exp(exponent), set to 0 wherever it would not exceed `PROFILE_FLOOR`; in place outside compilation. The
    exponent is clamped first: on CPU, exp takes a slow path for very negative arguments (and -inf), ten to a
    hundred times slower. (With a gradient, `FlushedProfiles` does this.)"""
    if traced():  # the compiler fuses the three steps itself
        return plain_flushed_exp(exponent)
    return flush_exp_(exponent.clamp_(min=FLUSH_CLAMP))


def plain_flushed_exp(exponent: torch.Tensor) -> torch.Tensor:
    """`flushed_exp` in out-of-place operators: what a tracer fuses, and differentiable by autograd."""
    return F.threshold(exponent.clamp(min=FLUSH_CLAMP).exp(), PROFILE_FLOOR, 0.0)


def flush_exp_(clamped: torch.Tensor) -> torch.Tensor:
    """In place: exp of an exponent clamped at `FLUSH_CLAMP`, with the values not above `PROFILE_FLOOR` set to 0."""
    return F.threshold_(clamped.exp_(), PROFILE_FLOOR, 0.0)


class FlushedProfiles(torch.autograd.Function):
    """Row and column profiles from their (..., 2, S, Q) exponent (`LocAtViTGaussianBias.profiles`) when a gradient
    is recorded: `flushed_exp` of it, returned as contiguous query-major row (..., Q, H) and column (..., Q, W)
    profiles, the layout the attention reads.

    Only those two are kept for backward, whose gradient is grad * profile (0 where flushed), written straight into
    the exponent's layout. Autograd through exp, unbind, transposes and copies would keep the exponential too and
    run twice as many passes over it.
    """

    @staticmethod
    def forward(ctx, exponent: torch.Tensor, height: int, width: int):
        profile = flush_exp_(exponent.clamp(min=FLUSH_CLAMP))
        row = profile[..., 0, :height, :].transpose(-1, -2).contiguous()
        col = profile[..., 1, :width, :].transpose(-1, -2).contiguous()
        ctx.save_for_backward(row, col)
        ctx.side = exponent.shape[-2]
        return row, col

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_row: torch.Tensor | None, grad_col: torch.Tensor | None):
        row, col = ctx.saved_tensors
        shape = (*row.shape[:-2], 2, ctx.side, row.shape[-2])
        padded = row.shape[-1] != ctx.side or col.shape[-1] != ctx.side  # a non-square grid's table padding: 0
        grad = row.new_zeros(shape) if padded else row.new_empty(shape)
        for index, (profile, grad_profile) in enumerate(((row, grad_row), (col, grad_col))):
            target = grad[..., index, : profile.shape[-1], :].transpose(-1, -2)
            if grad_profile is None:
                target.zero_()
            else:
                torch.mul(grad_profile, profile, out=target)
        return grad, None, None


class Float32Projection(torch.autograd.Function):
    """bias + weight @ tokens^T in float32 for (rows, dim) tokens in a lower precision (`LocAtViTGaussianBias`'s
    statistics under autocast), keeping the tokens themselves for backward, which the attention keeps anyway.
    Autograd through `tokens.float()` would keep their float32 copy: per layer twice the queries' size, as much as
    the profiles at 512 px."""

    @staticmethod
    def forward(ctx, tokens: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(tokens, weight)
        return torch.addmm(bias[:, None], weight, tokens.t().to(weight.dtype))

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: torch.Tensor):
        tokens, weight = ctx.saved_tensors
        grad_tokens = (grad.t() @ weight).to(tokens.dtype) if ctx.needs_input_grad[0] else None
        grad_weight = grad @ tokens.to(grad.dtype) if ctx.needs_input_grad[1] else None
        grad_bias = grad.sum(1) if ctx.needs_input_grad[2] else None
        return grad_tokens, grad_weight, grad_bias


@functools.lru_cache(maxsize=16)
def grid_distance_table(
    side: int, floor: float, scale: float, dtype: torch.dtype, device: torch.device
) -> torch.Tensor:
    """Clamped -0.5 * squared distances between the lines (rows or columns) 0..side-1 of a grid, divided by the
    variances' `scale`: a symmetric (side, side) table, computed in float64 and rounded once to `dtype` (on CPU: not
    every accelerator has float64). Built outside inference mode, so that tables first made by an inference call also
    serve training."""
    with torch.inference_mode(False):
        positions = torch.arange(side, dtype=torch.float64)
        table = (-0.5 * (positions[:, None] - positions[None, :]) ** 2).clamp(min=floor) / scale
        return table.to(dtype).to(device)


@functools.lru_cache(maxsize=16)
def query_distance_tables(
    height: int, width: int, floor: float, scale: float, dtype: torch.dtype, device: torch.device
) -> torch.Tensor:
    """`grid_distance_table` from every patch (row-major) to each grid row and column, stacked as one (2, S, P)
    table, S = max(H, W): [0, r, i] to row r, [1, c, i] to column c (entries past H or W are padding, never read).
    Stacked so that both profiles come from one broadcast expression, and queries last, so that it runs over
    contiguous rows of queries (a grid's 14 rows or columns are too short for vectorized loops).

    Cached for the few grid sizes a run meets; shared by all layers, whose constants are the same."""
    with torch.inference_mode(False):
        table = grid_distance_table.__wrapped__(max(height, width), floor, scale, dtype, device)
        rows = torch.arange(height, device=device).repeat_interleave(width)
        cols = torch.arange(width, device=device).repeat(height)
        return torch.stack((table[:, rows], table[:, cols]))


def exported_profiles(statistics, grid_size, floor: float, scale: float, eps: float):
    """`LocAtViTGaussianBias.profiles` for `torch.export` (the same values, elementwise; differentiable): row
    (batch, heads, P, H) and column (batch, heads, P, W) profiles from `statistics` (batch, heads, 3, P), each from
    its own (lines, P) distance table built by operators from the (symbolic) grid sizes. The stacked
    (2, max(H, W), P) table would tie the export to the sign of H - W (its padding and layout) and the Python cache to
    concrete sizes."""
    height, width = grid_size
    device = statistics.device  # each patch's row and column, row-major (`%` of a symbolic size has no ONNX form)
    rows = torch.arange(height, device=device)[:, None].expand(height, width).reshape(-1)
    cols = torch.arange(width, device=device).expand(height, width).reshape(-1)
    denominator = torch.sigmoid(statistics[..., :2, :]) + eps / scale
    log_strength = torch.log(F.softplus(statistics[..., 2, :]).clamp(min=PROFILE_FLOOR)).unsqueeze(-2)
    profiles = []
    for index, (lines, position) in enumerate(((height, rows), (width, cols))):
        line = torch.arange(lines, dtype=torch.float64, device=device)[:, None]
        table = ((-0.5 * (line - position.double()) ** 2).clamp(min=floor) / scale).to(statistics.dtype)
        exponent = table / denominator[..., index, None, :]
        exponent = exponent + log_strength if index == 0 else exponent
        profiles.append(plain_flushed_exp(exponent).transpose(-1, -2))
    return tuple(profiles)


Backend = Callable[..., tuple[torch.Tensor, torch.Tensor | None]]
BACKENDS: dict[str, Backend] = {}


def register_backend(name: str) -> Callable[[Backend], Backend]:
    """Adds a backend `fn(query, key, value, profiles, *, scale, dropout, num_prefix, workspace)` under `name`:
    selectable with `config.attention_backend`, and tested against `eager` by `tests/test_attention_backends.py`."""

    def register(function: Backend) -> Backend:
        BACKENDS[name] = function
        return function

    return register


def traced() -> bool:
    """Under `torch.compile` or `torch.export`: reused buffers are Python state the tracer cannot follow, and the
    compiler fuses the bias's formula itself."""
    return torch.compiler.is_compiling()


def reuses_buffers(workspace: "BiasWorkspace | None") -> bool:
    """Whether this call may write into the encoder's reused buffers: outside tracing, and only without gradient
    mode, since a backward may need what a later write replaces (a layer's bias when only its keys train, say)."""
    return workspace is not None and not torch.is_grad_enabled() and not traced()


def full_bias(row: torch.Tensor, col: torch.Tensor, num_prefix: int) -> torch.Tensor:
    """The (batch, heads, N, N) bias of the profiles, in plain operators: the outer product of each query's row and
    column profiles, padded with the prefix's zero rows and columns."""
    patch_bias = (row.unsqueeze(-1) * col.unsqueeze(-2)).flatten(-2)
    return F.pad(patch_bias, (num_prefix, 0, num_prefix, 0))


def separable_bias(row, col, num_prefix: int, dtype: torch.dtype, workspace: "BiasWorkspace | None", query):
    """The bias as `sdpa`'s mask, in `dtype`: written into a reused buffer without a gradient, by
    `SeparableBiasWriter` with one, in plain operators when traced."""
    if reuses_buffers(workspace):
        batch, heads, seq_len, _ = query.shape
        bias = workspace.get("bias", (batch, heads, seq_len, seq_len), dtype, query.device)
        return write_separable_bias(bias, row, col, num_prefix)
    if traced():
        return full_bias(row, col, num_prefix).to(dtype)
    return SeparableBiasWriter.apply(row, col, num_prefix, dtype)


@register_backend("eager")
def eager_attention(query, key, value, profiles, *, scale: float, dropout: float, num_prefix: int, workspace=None):
    """The reference: scores plus the whole bias, softmax in at least float32, dropout, weighted values. The only backend that
    returns the attention probabilities (`output_attentions`)."""
    scores = torch.matmul(query, key.transpose(-1, -2)) * scale
    if profiles is not None:
        scores = scores + full_bias(*profiles, num_prefix).to(scores.dtype)
    weights = F.softmax(scores, dim=-1, dtype=torch.promote_types(scores.dtype, torch.float32)).to(query.dtype)
    weights = F.dropout(weights, p=dropout, training=dropout > 0)
    return torch.matmul(weights, value).transpose(1, 2), weights


@register_backend("sdpa")
def sdpa_attention(query, key, value, profiles, *, scale: float, dropout: float, num_prefix: int, workspace=None):
    """`scaled_dot_product_attention` with the bias as its float mask, written once per layer from the profiles (in
    blocks of queries when it would exceed `INFERENCE_BIAS_BYTES` without a gradient)."""
    if profiles is None:
        bias = None
    elif reuses_buffers(workspace) and bias_bytes(query) > INFERENCE_BIAS_BYTES:
        return attention_in_query_blocks(query, key, value, *profiles, scale, workspace, num_prefix), None
    else:
        bias = separable_bias(*profiles, num_prefix, query.dtype, workspace, query)
    output = F.scaled_dot_product_attention(query, key, value, attn_mask=bias, dropout_p=dropout, scale=scale)
    return output.transpose(1, 2), None


@register_backend("cpu_fused")
def cpu_fused_attention(query, key, value, profiles, *, scale: float, dropout: float, num_prefix: int, workspace=None):
    """The fused C++ kernel (`cpu_attention_locatvit`): the bias added from the profiles inside each block of
    queries, nothing N x N written; inference and training."""
    return fused_cpu_attention()(query, key, value, *profiles, scale, num_prefix), None


@register_backend("cuda_chunked")
def cuda_chunked_attention(query, key, value, profiles, *, scale: float, dropout: float, num_prefix: int, workspace):
    """CUDA's memory-efficient kernel in chunks (`EfficientBiasAttention`): a ViT's training memory."""
    output = EfficientBiasAttention.apply(
        query, key, value, *profiles, scale, num_prefix, workspace or BiasWorkspace()
    )
    return output.transpose(1, 2), None


@register_backend("blocked")
def blocked_attention(query, key, value, profiles, *, scale: float, dropout: float, num_prefix: int, workspace=None):
    """Plain operators on any device (`BlockedBiasAttention`): scores, bias and probabilities in blocks of queries,
    computed again in backward, so that training keeps what a ViT's flash attention keeps."""
    return BlockedBiasAttention.apply(query, key, value, *profiles, scale, num_prefix), None


@register_backend("cuda_triton")
def cuda_triton_attention(
    query, key, value, profiles, *, scale: float, dropout: float, num_prefix: int, workspace=None
):
    """The Triton kernel (`triton_attention_locatvit`): FlashAttention-2 style, the bias evaluated from the profiles
    inside each block of scores, nothing N x N in memory; inference and training."""
    return triton_gaussian_attention(query, key, value, *profiles, scale, num_prefix), None


def triton_unavailable(query: torch.Tensor) -> str | None:
    """Why the Triton kernel cannot run `query` (None if it can)."""
    if not triton_available():
        return "the 'cuda_triton' backend needs Triton and a CUDA device (or TRITON_INTERPRET=1 for CPU tensors)"
    if query.device.type not in ("cuda", "cpu") or query.dtype not in TRITON_DTYPES or query.shape[-1] > 128:
        return f"the 'cuda_triton' backend runs float32/bfloat16/float16 with head sizes up to 128, not {query.dtype}"
    if query.device.type == "cpu" and not torch.cuda.is_available() and not triton_interpreting():
        return "the 'cuda_triton' backend runs CPU tensors only under Triton's interpreter (TRITON_INTERPRET=1)"
    if query.shape[0] * query.shape[1] > MAX_TRITON_SLICES:
        return f"the 'cuda_triton' backend runs at most {MAX_TRITON_SLICES} (batch x heads) slices a call"
    return None


# The automatic choice takes the Triton kernels for tensors on these devices, where `triton_check` passes.
TRITON_DEVICES = ("cuda",)


def triton_chosen(query: torch.Tensor) -> bool:
    """Whether the automatic choice runs `query`'s layer with the Triton kernels: the attention (`select_backend`)
    and the Gaussian's profiles (`triton_profiles`)."""
    if query.device.type not in TRITON_DEVICES or triton_unavailable(query) is not None:
        return False
    return triton_checked(query.device, query.dtype, query.shape[-1])


def triton_profiles(query: torch.Tensor) -> Callable | None:
    """`triton_gaussian_profiles` where `triton_chosen(query)` (and not exporting), else None: the statistics and the
    profiles in one kernel launch, and their gradients in one more, instead of a float32 copy of the queries, a
    product and about a dozen elementwise passes over (H + W) floats per query in each direction (memory traffic,
    which bounds a small ViT's layer on a GPU: benchmarks/bench_traffic.py)."""
    if torch.compiler.is_exporting():  # an exported graph holds plain operators only
        return None
    return triton_gaussian_profiles if triton_chosen(query) else None


@torch.compiler.assume_constant_result  # under `torch.compile`: run when traced, a constant in the graph
def triton_checked(device: torch.device, dtype: torch.dtype, head_dim: int) -> bool:
    """Whether `triton_check` passed for these (run once per device, dtype and head size)."""
    return cached_triton_check(device, dtype, head_dim) is None


def triton_check(device: torch.device, dtype: torch.dtype, head_dim: int) -> str | None:
    """Runs the Triton kernels once on `device` on a small case (a CLS token and a 2 x 14 grid, two heads: rows as
    wide as a 224 px model's, whose compiled kernels it then shares), forward and backward, against the eager
    reference in float64: the attention in `dtype` (`check_triton_attention`), then the Gaussian's profiles
    (`check_triton_profiles`). None if they agree, else what went wrong (also logged).

    The automatic choice takes the kernels only where they have run correctly, so that a GPU, driver or Triton release
    on which they fail to compile or miscompute gets the other backends instead of wrong results. They agree if every
    output and gradient is within twice the eager reference's own error in `dtype`, plus 1/1000 of the largest value
    (four resolution steps in bfloat16 and float16): far below what a miscomputed bias or block would be off by, far
    above the summation order's rounding."""
    generator = torch.Generator().manual_seed(0)
    try:
        with torch.inference_mode(False), torch.enable_grad(), torch.autocast(device.type, enabled=False):
            problem = check_triton_attention(device, dtype, head_dim, generator) or check_triton_profiles(
                device, dtype, head_dim, generator
            )
    except Exception as error:  # noqa: BLE001 - any failure to compile or run means: not these kernels here
        problem = f"it failed to run: {type(error).__name__}: {error}"
    if problem is not None:
        logger.warning(
            "LocAtViT's Triton kernels failed their check on %s in %s with head size %d, so the other attention "
            "backends run instead (please report this with your GPU, driver, torch and Triton versions): %s",
            device, dtype, head_dim, problem,
        )  # fmt: skip
    return problem


def check_triton_attention(device, dtype, head_dim: int, generator: torch.Generator) -> str | None:
    """`triton_check`'s attention part: output and the five inputs' gradients."""
    height, width = 2, 14
    tokens, patches = 1 + height * width, height * width
    tensors = [torch.randn(1, 2, tokens, head_dim, generator=generator, dtype=torch.float64) for _ in range(3)]
    tensors += [torch.rand(1, 2, patches, height, generator=generator, dtype=torch.float64) * 2]
    tensors += [torch.randn(1, 2, patches, width, generator=generator, dtype=torch.float64)]
    scale = head_dim**-0.5

    def eager(q, k, v, row, col):
        return eager_attention(q, k, v, (row, col), scale=scale, dropout=0.0, num_prefix=1)[0]

    def kernel(q, k, v, row, col):
        return triton_gaussian_attention(q, k, v, row, col, scale, 1)

    def outputs(attention, precision):
        profile_precision = torch.float64 if precision == torch.float64 else torch.float32
        inputs = [t.to(device, precision) for t in tensors[:3]] + [
            t.to(device, profile_precision) for t in tensors[3:]
        ]
        return outputs_and_gradients(attention, inputs)

    exact, low, checked = (outputs(*run) for run in ((eager, torch.float64), (eager, dtype), (kernel, dtype)))
    names = ("output", "query's gradient", "key's gradient", "value's gradient", "row profiles' gradient",
             "column profiles' gradient")  # fmt: skip
    return disagreement(names, checked, low, exact, dtype)


def check_triton_profiles(device, dtype, head_dim: int, generator: torch.Generator) -> str | None:
    """`triton_check`'s profiles part, with the constants of a 224 px model (14 x 14 grid): both profiles from
    queries in `dtype`, and the gradients of the queries and the variance and strength maps' weight and bias."""
    height, width, side = 2, 14, 14
    floor, scale, eps = -0.5 * (side - 1) ** 2, float(side**2), 0.1
    query = torch.randn(1, 2, 1 + height * width, head_dim, generator=generator, dtype=torch.float64)
    weight = torch.randn(3, head_dim, generator=generator, dtype=torch.float64) * head_dim**-0.5
    bias = torch.randn(3, generator=generator, dtype=torch.float64)

    def eager(query, weight, bias):
        return profiles_of_queries(query, weight, bias, (height, width), floor, scale, eps)

    def kernel(query, weight, bias):
        table = grid_distance_table.__wrapped__(side, floor, scale, torch.float32, device)
        constants = (eps / scale, PROFILE_FLOOR, FLUSH_CLAMP)
        return triton_gaussian_profiles(query, weight, bias, table, *constants, height, width)

    def inputs(precision):
        weight_precision = torch.float64 if precision == torch.float64 else torch.float32
        return [query.to(device, precision), weight.to(device, weight_precision), bias.to(device, weight_precision)]

    exact, low, checked = (
        outputs_and_gradients(function, inputs(precision))
        for function, precision in ((eager, torch.float64), (eager, dtype), (kernel, dtype))
    )
    names = ("row profile", "column profile", "query's gradient", "maps' weight gradient", "maps' bias gradient")
    return disagreement(names, checked, low, exact, dtype)


def profiles_of_queries(query, weight, bias, grid_size, floor: float, scale: float, eps: float):
    """`exported_profiles` of the statistics weight q + bias (in the weight's dtype) of `query`'s (batch, heads, N,
    D) patch queries, its last H * W: what `triton_gaussian_profiles` computes, in plain operators."""
    patches = query[:, :, query.shape[2] - grid_size[0] * grid_size[1] :].to(weight.dtype)
    statistics = (patches @ weight.t() + bias).transpose(-1, -2)
    return exported_profiles(statistics, grid_size, floor, scale, eps)


def outputs_and_gradients(function, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
    """`function`'s output(s) and the gradients of its inputs for fixed output gradients: quarters in [-1, 1], the
    same in every dtype."""
    inputs = [t.requires_grad_() for t in inputs]
    outputs = function(*inputs)
    outputs = list(outputs) if isinstance(outputs, tuple) else [outputs]
    loss = 0
    for output in outputs:
        weight = torch.arange(output.numel(), device=output.device).remainder(9).view(output.shape) / 4 - 1
        loss = loss + (output * weight.to(output.dtype)).sum()
    return [*outputs, *torch.autograd.grad(loss, inputs)]


def disagreement(names, checked, low, exact, dtype: torch.dtype) -> str | None:
    """The first of `checked` (in `dtype`) that is off from `exact` (float64) by more than twice `low`'s error (the
    reference in `dtype`) plus 1/1000 of the largest value, described; None if none is."""
    for name, actual, reference, expected in zip(names, checked, low, exact):
        error = (actual.double() - expected).abs().max().item()
        tolerance = 2 * (reference.double() - expected).abs().max().item()
        tolerance += max(4 * torch.finfo(dtype).eps, 1e-3) * expected.abs().max().item()
        if not error <= tolerance:
            return f"the {name} is off by {error:.3g} (allowed: {tolerance:.3g})"
    return None


@functools.cache
def cached_triton_check(device: torch.device, dtype: torch.dtype, head_dim: int) -> str | None:
    """`triton_check`, once per process, device, dtype and head size, in a thread of its own: its first call often
    comes from inside a layer's forward pass, where activation checkpointing's saved-tensor hooks and dispatch modes
    (thread-local) would take over the check's own forward and backward."""
    outcome = []
    worker = threading.Thread(target=lambda: outcome.append(triton_check(device, dtype, head_dim)), daemon=True)
    worker.start()
    worker.join()
    return outcome[0] if outcome else "it failed to run in its thread"


def backend_unavailable(name: str, query: torch.Tensor, bias, dropout: float) -> str | None:
    """Why backend `name` cannot run this call (None if it can); `bias` as for `select_backend`."""
    if name not in BACKENDS:
        return f"unknown attention backend {name!r}: choose one of {sorted(BACKENDS)} or None (automatic)"
    if name in ("cpu_fused", "cuda_chunked", "cuda_triton", "blocked") and (bias is None or dropout > 0):
        return f"the {name!r} backend needs the Gaussian bias (`use_gaussian_attention=True`) and no attention dropout"
    if name == "cpu_fused" and (query.device.type != "cpu" or query.dtype not in (torch.float32, torch.float64)):
        return f"the 'cpu_fused' backend runs float32 or float64 CPU tensors, not {query.dtype} on {query.device}"
    if name == "cpu_fused" and fused_cpu_attention() is None:
        return "the 'cpu_fused' kernel is not built here (x86 with AVX2/AVX-512, a C++ compiler and ninja)"
    if name == "cuda_chunked" and (query.device.type != "cuda" or query.shape[-1] % 8):
        return "the 'cuda_chunked' backend runs CUDA tensors with a head size that is a multiple of 8"
    if name == "cuda_triton":
        return triton_unavailable(query)
    return None


def select_backend(query: torch.Tensor, bias, *, implementation: str, forced: str | None, dropout: float) -> str:
    """The name of the backend for this call: `forced` (`config.attention_backend`) if given, else the decision table
    of this module's docstring. `bias` is the Gaussian bias (its profiles, or what computes them), None without one."""
    if forced is not None:
        problem = backend_unavailable(forced, query, bias, dropout)
        if problem:
            raise ValueError(
                f"Cannot use `attention_backend={forced!r}`: {problem}. Set it to None to choose automatically."
            )
        return forced
    if implementation == "eager" or torch.compiler.is_exporting():
        return "eager"
    if bias is None or dropout > 0:
        return "sdpa"
    float32_on_cpu = query.device.type == "cpu" and query.dtype == torch.float32
    if float32_on_cpu and fused_cpu_attention() is not None:  # an operator `torch.compile` traces
        return "cpu_fused"
    if triton_chosen(query):
        return "cuda_triton"
    if not torch.is_grad_enabled() or not query.requires_grad or traced():
        return "sdpa"
    if query.device.type == "cuda" and torch.backends.cuda.mem_efficient_sdp_enabled():
        if backend_unavailable("cuda_chunked", query, bias, dropout) is None:
            return "cuda_chunked"
    return "blocked"


def gaussian_attention(query, key, value, gaussian, *, implementation: str, forced: str | None, **kwargs):
    """Runs the selected backend with the profiles `gaussian(query)` (`gaussian` None: no bias): (output (batch, N,
    heads, head_dim), probabilities or None). Backends in `PROFILES_RECOMPUTED` run under selective activation
    checkpointing when a gradient is recorded (`keep_kernel_outputs`)."""
    name = select_backend(query, gaussian, implementation=implementation, forced=forced, dropout=kwargs["dropout"])
    backend = BACKENDS[name]

    def attend(query, key, value):
        return backend(query, key, value, None if gaussian is None else gaussian(query), **kwargs)

    if name in PROFILES_RECOMPUTED and torch.is_grad_enabled():
        # No random numbers in these backends (no dropout): no generator state to save. The kept outputs go through
        # the saved-tensor hooks around the call, as every other saved tensor (activation offloading moves them too).
        return checkpoint(
            attend, query, key, value, use_reentrant=False, context_fn=keep_kernel_outputs,
            preserve_rng_state=False, respect_saved_tensors_hooks=True,
        )  # fmt: skip
    return attend(query, key, value)


# Backends whose training keeps only their kernel's outputs (`keep_kernel_outputs`): the kernel's operator in
# `torch.ops.locatvit`.
PROFILES_RECOMPUTED = {"cuda_triton": "triton_gaussian_attention"}


def keep_kernel_outputs():
    """Selective checkpointing contexts for `gaussian_attention`: the outputs of the kernels of `PROFILES_RECOMPUTED`
    are kept for backward, and everything else (the Gaussian's statistics and profiles: one launch of their kernel
    where `triton_profiles` chose it) is computed again there. The attention itself never runs twice."""
    kept = {getattr(torch.ops.locatvit, name).default for name in PROFILES_RECOMPUTED.values()}

    def policy(ctx, operator, *args, **kwargs) -> CheckpointPolicy:
        return CheckpointPolicy.MUST_SAVE if operator in kept else CheckpointPolicy.MUST_RECOMPUTE

    return create_selective_checkpoint_contexts(policy)


class SeparableBiasWriter(torch.autograd.Function):
    """Writes B[i, j] = row[i, r_j] * col[i, c_j] for patch queries i and keys j straight into the (B, heads, N, N)
    mask the attention reads, with zero rows and columns for the prefix tokens.

    Autograd through the formula would build the (B, heads, P, H, W) product, copy it into a padded buffer, and in
    backward read the mask gradient through strided views. Here the forward is one broadcast multiply into the mask's
    patch block, and the backward reduces the incoming gradient to the (B, heads, P, H) and (B, heads, P, W) profile
    gradients with batched matmuls over each (batch, head) slice, without copying it.
    """

    @staticmethod
    def forward(ctx, row: torch.Tensor, col: torch.Tensor, num_prefix: int, dtype: torch.dtype) -> torch.Tensor:
        batch, heads, num_patches, _ = row.shape
        seq_len = num_prefix + num_patches
        bias = new_bias_buffer((batch, heads, seq_len, seq_len), dtype, row.device)
        ctx.save_for_backward(row, col)
        ctx.num_prefix = num_prefix
        return write_separable_bias(bias, row, col, num_prefix)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_bias: torch.Tensor):
        row, col = ctx.saved_tensors
        num_prefix = ctx.num_prefix
        grad_row = row.new_empty(row.shape) if ctx.needs_input_grad[0] else None
        grad_col = col.new_empty(col.shape) if ctx.needs_input_grad[1] else None
        slices = row.shape[0] * row.shape[1]  # (batch, heads) flattened: views of the contiguous tensors

        def flat(tensor):
            return None if tensor is None else tensor.reshape(slices, *tensor.shape[2:])

        patch_block = grad_bias[:, :, num_prefix:, num_prefix:].to(row.dtype).flatten(0, 1)
        reduce_bias_gradient(patch_block, flat(row), flat(col), flat(grad_row), flat(grad_col))
        return grad_row, grad_col, None, None


def new_bias_buffer(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A (..., N, N) bias with zero prefix rows and columns and an uninitialized patch block, for
    `write_separable_bias`. Its rows are padded to whole 64-byte lines, placed (on CPU) so that each row's patch
    columns start on a line: the bias is then written with aligned vector stores (1.7x faster at 512 px), and CUDA's
    memory-efficient attention takes it without first copying it to such a layout. Attention kernels read the
    padded rows through the stride."""
    *leading, rows, cols = shape
    per_line = max(1, 64 // torch.empty((), dtype=dtype).element_size())
    row_stride = -(-cols // per_line) * per_line
    offset = -NUM_PREFIX_TOKENS % per_line if torch.device(device).type == "cpu" else 0
    storage = torch.empty(offset + math.prod(leading) * rows * row_stride, dtype=dtype, device=device)
    return zero_prefix(storage[offset:].view(*leading, rows, row_stride)[..., :cols], NUM_PREFIX_TOKENS)


def zero_prefix(bias: torch.Tensor, num_prefix: int) -> torch.Tensor:
    """Zeroes the rows and columns of the prefix tokens of `bias` (..., N, N), which get no Gaussian bias."""
    bias[..., :num_prefix, :].zero_()
    bias[..., num_prefix:, :num_prefix].zero_()
    return bias


class BiasWorkspace:
    """The buffers that all layers of an encoder reuse for what no layer keeps after its attention ran.

    Without a gradient that is the (…, N, N) bias itself (`"bias"`, from `new_bias_buffer`) and the profiles (or
    their exponent); in CUDA training (`EfficientBiasAttention`) the bias of each chunk (`chunk_biases`). Reused
    across layers and calls, they cost their writes only, not a fresh allocation per layer (on CPU, large
    allocations go back to the system when freed, and each reuse then pays a page fault per 4 KB). One set per
    thread, so concurrent calls do not share them. Consequence for forward hooks on `LocAtViTGaussianBias`: in
    inference its output, the profiles, is overwritten by the next layer; clone it to keep it.
    """

    def __init__(self):
        self._buffers: dict[tuple[int, str], torch.Tensor] = {}

    def get(self, purpose: str, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        key = (threading.get_ident(), purpose)
        buffer = self._buffers.get(key)
        if buffer is None or buffer.shape != shape or buffer.dtype != dtype or buffer.device != device:
            self._buffers.pop(key, None)  # free the old one before allocating its replacement
            live = {t.ident for t in threading.enumerate()}
            self._buffers = {k: b for k, b in self._buffers.items() if k[0] in live}
            with torch.inference_mode(False):  # a normal tensor: inference calls and training steps may share it
                if purpose == "bias":
                    buffer = new_bias_buffer(shape, dtype, device)
                else:
                    buffer = torch.empty(shape, dtype=dtype, device=device)
                self._buffers[key] = buffer
        return buffer


def write_separable_bias(bias: torch.Tensor, row: torch.Tensor, col: torch.Tensor, num_prefix: int) -> torch.Tensor:
    """Writes row[..., i, r_j] * col[..., i, c_j] into the patch block of `bias` (..., N, N), whose prefix rows and
    columns must be 0 (`new_bias_buffer`, `zero_prefix`)."""
    patch_block = bias[..., num_prefix:, num_prefix:].unflatten(-1, (row.shape[-1], col.shape[-1]))
    torch.mul(row.unsqueeze(-1), col.unsqueeze(-2), out=patch_block)
    return bias


def reduce_bias_gradient(grad: torch.Tensor, row: torch.Tensor, col: torch.Tensor, grad_row, grad_col) -> None:
    """Gradients of patch blocks (n, P, P) of the bias with respect to their (n, P, H) row and (n, P, W) column
    profiles, written into `grad_row` and `grad_col` (either may be None). Both are batched matrix-vector products
    over the P queries: on small grids (and on accelerators) one copy of the block makes them a single batched call;
    on large grids on CPU the strided block (P, H, W), strides (N, W, 1), is read in place, one slice at a time
    (measured faster there)."""
    slices, num_patches, height = row.shape
    width = col.shape[-1]
    if num_patches <= 256 or grad.device.type != "cpu":
        grid = grad.reshape(slices * num_patches, height, width)
        if grad_row is not None:
            grad_row.copy_(torch.bmm(grid, col.reshape(-1, width, 1)).view_as(grad_row))
        if grad_col is not None:
            grad_col.copy_(torch.bmm(row.reshape(-1, 1, height), grid).view_as(grad_col))
        return
    for index in range(slices):
        grid = grad[index].unflatten(-1, (height, width))
        if grad_row is not None:
            torch.bmm(grid, col[index].unsqueeze(-1), out=grad_row[index].unsqueeze(-1))
        if grad_col is not None:
            torch.bmm(row[index].unsqueeze(-2), grid, out=grad_col[index].unsqueeze(-2))


# Above this many bytes, the inference bias is written and attended in equal blocks of queries
# (`attention_in_query_blocks`): the whole (batch, heads, N, N) bias of a Tiny model takes 201 MB at 1024 px and
# 3.2 GB at 2048 px. Below, it is written in one piece: blocks cost time (measured on CPU, Tiny, 1024 px: two blocks
# about the same time as one piece, peak memory 141 instead of 238 MB; four blocks 15% slower).
INFERENCE_BIAS_BYTES = 128 * 2**20


def bias_bytes(query: torch.Tensor) -> int:
    """Size of the (batch, heads, N, N) bias of `query` (batch, heads, N, head_dim), in its dtype."""
    batch, heads, seq_len, _ = query.shape
    return batch * heads * seq_len * seq_len * query.element_size()


def attention_in_query_blocks(query, key, value, row, col, scale: float, workspace: "BiasWorkspace", prefix: int):
    """`sdpa` with the separable bias, without a gradient, for long sequences: the bias rows of a block of queries
    are written into one reused buffer and attended at once, so that the bias never takes much more than
    `INFERENCE_BIAS_BYTES`. Returns (batch, N, heads, dim), as the attention interface does."""
    batch, heads, seq_len, dim = query.shape
    blocks = -(-bias_bytes(query) // INFERENCE_BIAS_BYTES)
    block = max(prefix, -(-seq_len // blocks))  # equal blocks: a short last one would waste a kernel call
    # `prefix` rows more than a block: the first block's prefix (CLS) queries get the zero rows on top; later blocks
    # write below them, so that `write_separable_bias`, which skips the prefix rows, serves every block.
    buffer = workspace.get("bias", (batch, heads, block + prefix, seq_len), query.dtype, query.device)
    output = query.new_empty(batch, seq_len, heads, dim)
    for start in range(0, seq_len, block):
        stop = min(start + block, seq_len)
        above = 0 if start == 0 else prefix  # rows of the buffer above this block's first query
        rows = buffer[:, :, : above + stop - start]
        patches = slice(max(start - prefix, 0), stop - prefix)
        write_separable_bias(rows, row[:, :, patches], col[:, :, patches], prefix)
        block_output = F.scaled_dot_product_attention(
            query[:, :, start:stop], key, value, attn_mask=rows[:, :, above:], scale=scale
        )
        output[:, start:stop] = block_output.transpose(1, 2)
    return output


# Working memory of `EfficientBiasAttention`: (N x N) slices are processed this many bytes at a time.
SLAB_BYTES = 16 * 2**20


def attention_chunks(batch: int, heads: int, seq_len: int, element_size: int) -> list[tuple[slice, slice]]:
    """(batch, heads) blocks whose (N, N) maps take about `SLAB_BYTES` together: whole images while one fits, else
    groups of heads of one image (at least one head)."""
    map_bytes = seq_len * seq_len * element_size
    items = SLAB_BYTES // (heads * map_bytes)
    if items >= 1:
        return [(slice(start, min(start + items, batch)), slice(0, heads)) for start in range(0, batch, items)]
    group = max(1, SLAB_BYTES // map_bytes)
    return [
        (slice(item, item + 1), slice(start, min(start + group, heads)))
        for item in range(batch)
        for start in range(0, heads, group)
    ]


class EfficientBiasAttention(torch.autograd.Function):
    """softmax(q k^T * scale + B) v for a bias B given by its separable profiles, for training on CUDA.

    `sdpa` with a mask that needs a gradient keeps every layer's (batch, heads, N, N) mask for the backward pass
    (50 MB a layer for Tiny at 512 px, batch 4: twice a ViT's training memory) and returns the mask's whole
    gradient. Here CUDA's memory-efficient kernel is called directly, in chunks of about `SLAB_BYTES`
    (`attention_chunks`): the forward writes each chunk's bias into one reused buffer, the backward writes it
    again from the profiles and reduces its gradient to the profiles at once. Only the profiles and the kernel's
    log-sum-exp are kept, as for a plain ViT's attention.
    """

    @staticmethod
    def forward(ctx, query, key, value, row, col, scale: float, num_prefix: int, workspace: "BiasWorkspace"):
        batch, heads, seq_len, dim = query.shape
        ctx.scale, ctx.num_prefix, ctx.workspace = scale, num_prefix, workspace
        output = query.new_empty(batch, seq_len, heads, dim).transpose(1, 2)  # the layout the kernel writes
        logsumexp = None
        for chunk, bias in chunk_biases(workspace, query, row, col, num_prefix):
            chunk_output, chunk_logsumexp, seed, offset = torch.ops.aten._scaled_dot_product_efficient_attention(
                query[chunk], key[chunk], value[chunk], bias, True, scale=scale
            )
            if logsumexp is None:  # padded by the kernel to whole blocks of queries
                logsumexp = chunk_logsumexp.new_empty(batch, heads, chunk_logsumexp.shape[-1])
            output[chunk], logsumexp[chunk] = chunk_output, chunk_logsumexp
        ctx.save_for_backward(query, key, value, row, col, output, logsumexp, seed, offset)
        return output

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output):
        query, key, value, row, col, output, logsumexp, seed, offset = ctx.saved_tensors
        batch, heads, seq_len, dim = query.shape
        prefix = ctx.num_prefix
        grads = [query.new_empty(batch, seq_len, heads, dim).transpose(1, 2) for _ in range(3)]
        grad_row = row.new_empty(row.shape) if ctx.needs_input_grad[3] else None
        grad_col = col.new_empty(col.shape) if ctx.needs_input_grad[4] else None
        needs_bias_grad = grad_row is not None or grad_col is not None
        for chunk, bias in chunk_biases(ctx.workspace, query, row, col, prefix):
            *chunk_grads, grad_bias = torch.ops.aten._scaled_dot_product_efficient_attention_backward(
                grad_output[chunk], query[chunk], key[chunk], value[chunk], bias, output[chunk], logsumexp[chunk],
                seed, offset, 0.0, [True, True, True, needs_bias_grad], False, scale=ctx.scale,
            )  # fmt: skip
            for grad, chunk_grad in zip(grads, chunk_grads):
                grad[chunk] = chunk_grad
            if needs_bias_grad:
                patch_block = grad_bias[:, :, prefix:, prefix:].to(row.dtype).flatten(0, 1)
                profiles = (flat_chunk(tensor, chunk) for tensor in (row, col, grad_row, grad_col))
                reduce_bias_gradient(patch_block, *profiles)
        return *grads, grad_row, grad_col, None, None, None


class BlockedBiasAttention(torch.autograd.Function):
    """softmax(q k^T * scale + B) v for a bias B given by its separable profiles, in plain operators on any device.

    `sdpa` with a mask that needs a gradient keeps about 8 bytes per score of every layer for backward on CPU (2.2x a
    ViT's training memory at 512 px). Here the scores, the bias and the probabilities of one block of queries at a
    time (`query_blocks`) are computed in forward and again in backward, in at least float32, and the bias's gradient
    is reduced to the profiles block by block. Kept: the inputs, the output and one log-sum-exp per query, as flash
    attention keeps.
    """

    @staticmethod
    def forward(ctx, query, key, value, row, col, scale: float, num_prefix: int):
        with torch.autocast(query.device.type, enabled=False):  # its own dtypes: at least float32 inside
            return BlockedBiasAttention._forward(ctx, query, key, value, row, col, scale, num_prefix)

    @staticmethod
    def _forward(ctx, query, key, value, row, col, scale: float, num_prefix: int):
        compute = torch.promote_types(query.dtype, torch.float32)
        keys, values = key.to(compute), value.to(compute)
        output = torch.empty(query.shape, dtype=compute, device=query.device)
        logsumexp = torch.empty(query.shape[:-1], dtype=compute, device=query.device)
        for block in query_blocks(query):
            scores = scores_of_block(query[:, :, block].to(compute), keys, row, col, block, scale, num_prefix)
            logsumexp[:, :, block] = torch.logsumexp(scores, dim=-1)
            probabilities = scores.sub_(logsumexp[:, :, block, None]).exp_()
            output[:, :, block] = probabilities @ values
        output = output.to(query.dtype)
        ctx.scale, ctx.num_prefix = scale, num_prefix
        ctx.save_for_backward(query, key, value, row, col, output, logsumexp)
        return output.transpose(1, 2)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output):
        with torch.autocast(grad_output.device.type, enabled=False):
            return BlockedBiasAttention._backward(ctx, grad_output)

    @staticmethod
    def _backward(ctx, grad_output):
        query, key, value, row, col, output, logsumexp = ctx.saved_tensors
        scale, prefix = ctx.scale, ctx.num_prefix
        compute = logsumexp.dtype
        keys, values = key.to(compute), value.to(compute)
        grad_output = grad_output.transpose(1, 2).to(compute)
        delta = (grad_output * output.to(compute)).sum(-1, keepdim=True)  # rowsum(dO * O) = rowsum(P * dP)
        grad_query = torch.empty(query.shape, dtype=compute, device=query.device)
        grad_key, grad_value = torch.zeros_like(keys), torch.zeros_like(values)
        needs_bias_grad = ctx.needs_input_grad[3] or ctx.needs_input_grad[4]
        grad_row = torch.zeros(row.shape, dtype=compute, device=row.device) if needs_bias_grad else None
        grad_col = torch.zeros(col.shape, dtype=compute, device=col.device) if needs_bias_grad else None
        for block in query_blocks(query):
            queries = query[:, :, block].to(compute)
            probabilities = scores_of_block(queries, keys, row, col, block, scale, prefix)
            probabilities.sub_(logsumexp[:, :, block, None]).exp_()
            block_grad = grad_output[:, :, block]
            grad_value += probabilities.transpose(-1, -2) @ block_grad
            grad_scores = (block_grad @ values.transpose(-1, -2)).sub_(delta[:, :, block]).mul_(probabilities)
            if needs_bias_grad and (rows := patch_rows(block, prefix)) is not None:
                first, patches = rows
                profiles = [tensor[:, :, patches].to(compute).flatten(0, 1) for tensor in (row, col)]
                block_grads = [torch.empty_like(profile) for profile in profiles]
                reduce_bias_gradient(grad_scores[:, :, first:, prefix:].flatten(0, 1), *profiles, *block_grads)
                grad_row[:, :, patches] = block_grads[0].view_as(grad_row[:, :, patches])
                grad_col[:, :, patches] = block_grads[1].view_as(grad_col[:, :, patches])
            grad_scores.mul_(scale)
            grad_query[:, :, block] = grad_scores @ keys
            grad_key += grad_scores.transpose(-1, -2) @ queries
        grads = (grad.to(tensor.dtype) for grad, tensor in ((grad_query, query), (grad_key, key), (grad_value, value)))
        profile_grads = (None, None) if grad_row is None else (grad_row.to(row.dtype), grad_col.to(col.dtype))
        return *grads, *profile_grads, None, None


# Working memory of `BlockedBiasAttention`: each block's float32 scores take about this many bytes (its backward holds
# two such blocks). Measured on CPU, Tiny, 512 px, batch 4, training with gradient checkpointing: malloc's bytes in use
# 1.42x a ViT's with 16 MiB blocks, 1.06x with 4 MiB, the step's time within the run-to-run spread.
BLOCKED_SCORES_BYTES = 8 * 2**20


def query_blocks(query: torch.Tensor) -> list[slice]:
    """Blocks of query positions whose (batch, heads, block, N) float32 scores take about `BLOCKED_SCORES_BYTES`."""
    batch, heads, seq_len, _ = query.shape
    size = max(1, BLOCKED_SCORES_BYTES // (batch * heads * seq_len * 4))
    return [slice(start, min(start + size, seq_len)) for start in range(0, seq_len, size)]


def scores_of_block(queries, keys, row, col, block: slice, scale: float, num_prefix: int) -> torch.Tensor:
    """q k^T * scale + B for `queries`, the block `block` of query positions, against every key, in their dtype
    (batch, heads, block, N): the bias's patch block written from the profiles of the block's patch queries."""
    scores = torch.matmul(queries, keys.transpose(-1, -2)).mul_(scale)
    if (rows := patch_rows(block, num_prefix)) is not None:
        first, patches = rows
        grid = scores[:, :, first:, num_prefix:].unflatten(-1, (row.shape[-1], col.shape[-1]))
        grid.addcmul_(row[:, :, patches, :, None].to(keys.dtype), col[:, :, patches, None, :].to(keys.dtype))
    return scores


def patch_rows(block: slice, num_prefix: int) -> tuple[int, slice] | None:
    """Where a block of query positions holds patch queries: the first such row within the block and the slice of
    the profiles' patch queries it covers (None for a block of prefix queries only)."""
    first = max(block.start, num_prefix)
    if first >= block.stop:
        return None
    return first - block.start, slice(first - num_prefix, block.stop - num_prefix)


def flat_chunk(tensor: torch.Tensor | None, chunk) -> torch.Tensor | None:
    """One `attention_chunks` chunk of a (batch, heads, ...) tensor as (slices, ...). Of a contiguous tensor it is a
    view, since a chunk (whole images, or heads of one image) is one contiguous block: the gradients written into
    it land in `tensor`."""
    return None if tensor is None else tensor[chunk].flatten(0, 1)


def chunk_biases(workspace: "BiasWorkspace", query: torch.Tensor, row, col, num_prefix: int):
    """Each (batch, heads) chunk of `attention_chunks` with its bias, written in turn into one reused workspace
    buffer, sized for the first (largest) chunk."""
    batch, heads, seq_len, _ = query.shape
    chunks = attention_chunks(batch, heads, seq_len, query.element_size())
    items, group = (part.stop - part.start for part in chunks[0])
    buffer = workspace.get("bias", (items, group, seq_len, seq_len), query.dtype, query.device)
    for chunk in chunks:
        bias = buffer[: chunk[0].stop - chunk[0].start, : chunk[1].stop - chunk[1].start]
        yield chunk, write_separable_bias(bias, row[chunk], col[chunk], num_prefix)
