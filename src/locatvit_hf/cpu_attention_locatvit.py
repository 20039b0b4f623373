"""A fused CPU kernel: attention with the separable Gaussian bias evaluated inside it, for inference and training.

With stock kernels, the bias is written as a (batch, heads, N, N) float mask that `sdpa` then reads: at 512 px that is
25 MB a layer for ViT-Tiny, written and read once each, and it costs a third more than the attention itself; in
training, `sdpa` has no fused kernel for a mask that needs a gradient at all. Here each block of queries gets its
scores from one matrix product, the bias is added from the (H + W) profile values of each query while the scores are
in the core's cache, the softmax follows in the same pass, and a second product writes the output straight into the
token-major layout the output projection reads. The backward pass recomputes the probabilities from one log-sum-exp
per query, block by block, and reduces the bias gradient to the profiles in the same pass. Nothing of size N x N is
kept or leaves the cache. For inference, a second operator computes the profiles themselves from the variance and
strength maps' outputs in one pass (the formula in PyTorch takes a dozen elementwise operations).

The C++ source is `kernels/cpu_attention.cpp`, package data next to this module. It is compiled on first use with
`torch.utils.cpp_extension` (needs a C++ compiler and ninja, about 30 s, cached per machine) for x86 CPUs with AVX2
or AVX-512, into the operators `torch.ops.locatvit_cpu_<instruction set>`. The model calls them through the custom
operators `torch.ops.locatvit.*` defined here (`torch.library.custom_op`): each has a fake implementation and, where
it has a gradient, an autograd formula calling the kernel's backward, so that `torch.compile` and `torch.export`
trace it as one operator and `torch.library.opcheck` checks it. The attention runs in float32, the model's dtype
here, and in float64, so that `torch.autograd.gradcheck` can check its gradients; the profiles in float32.

Elsewhere, if the build fails, with `LOCATVIT_CPU_KERNEL=0` in the environment, or where the C++ source is absent
(this module copied alone next to a checkpoint, as Hugging Face remote code), `kernel_available()` is False and the
model writes the mask for `sdpa` instead (same results within float32 rounding).
"""

import functools
import hashlib
import logging
import os
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

# The kernel's C++ source, shipped as package data (pyproject.toml).
KERNEL_SOURCE = Path(__file__).resolve().parent / "kernels" / "cpu_attention.cpp"

# The instruction sets the kernel is built for, with PyTorch's own compiler flags for each (ATen's vectorized types
# pick their implementation from CPU_CAPABILITY).
CAPABILITY_FLAGS = {
    "AVX512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma", "-mavx2"],
    "AVX2": ["-mavx2", "-mfma"],
}

_build_lock = threading.Lock()

# Written next to the built library once it loaded: the fingerprint of everything the build depends on.
BUILD_STAMP = "locatvit_build_stamp.txt"

UNAVAILABLE = (
    "LocAtViT's fused CPU kernel is unavailable here: it needs an x86 CPU with AVX2 or AVX-512, a C++ compiler, "
    "ninja, its source locatvit_hf/kernels/cpu_attention.cpp and LOCATVIT_CPU_KERNEL unset or 1 (the log says what "
    "was missing). Check `kernel_available()` before calling its operators."
)


class _DropMessage(logging.Filter):
    """Drops the log records whose message starts with `prefix`, and only those."""

    def __init__(self, prefix: str):
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.prefix)


def _import_cpp_extension():
    """`torch.utils.cpp_extension`, imported without its "No CUDA runtime is found" warning. The module looks for a
    CUDA toolkit when it is imported and warns on CUDA builds of PyTorch running without a GPU, which is exactly where
    this CPU kernel is built: there the warning says nothing about this kernel, whose build needs no CUDA."""
    torch_logger = logging.getLogger("torch.utils.cpp_extension")
    quiet = _DropMessage("No CUDA runtime is found")
    torch_logger.addFilter(quiet)
    try:
        from torch.utils import cpp_extension
    finally:
        torch_logger.removeFilter(quiet)
    return cpp_extension


@dataclass(frozen=True)
class KernelBuild:
    """What `torch.utils.cpp_extension.load` is given to build the kernel for one instruction set."""

    capability: str
    source: Path = KERNEL_SOURCE

    @property
    def extension_name(self) -> str:
        return f"locatvit_cpu_attention_{self.capability.lower()}"

    @property
    def namespace(self) -> str:
        """The operators' namespace, `torch.ops.<namespace>`: one per instruction set, so both builds can load."""
        return f"locatvit_cpu_{self.capability.lower()}"

    @property
    def cflags(self) -> list[str]:
        capability = self.capability
        flags = ["-O3", "-fopenmp", f"-DCPU_CAPABILITY={capability}", f"-DCPU_CAPABILITY_{capability}"]
        return [*flags, f"-DLOCATVIT_NAMESPACE={self.namespace}", *CAPABILITY_FLAGS[capability]]

    @property
    def ldflags(self) -> list[str]:
        return ["-fopenmp"]

    def fingerprint(self) -> str:
        """SHA-256 of what decides whether torch's cached build is still valid: the source and its path (ninja's
        build command names it), the flags, the compiler, the Python and the PyTorch build (its version and its
        headers' modification time, which a reinstall changes and ninja compares)."""
        headers = Path(torch.__file__).parent / "include" / "torch" / "extension.h"
        parts = [
            self.source.read_text(),
            str(self.source),
            *self.cflags,
            *self.ldflags,
            os.environ.get("CXX", "c++"),
            sys.version,
            torch.__version__,
            str(torch.version.git_version),
            str(headers.stat().st_mtime_ns) if headers.is_file() else "no headers",
        ]
        return hashlib.sha256("\0".join(parts).encode()).hexdigest()

    def build_directory(self, cpp_extension) -> Path | None:
        """Where torch builds and caches the extension (`TORCH_EXTENSIONS_DIR`, else under `~/.cache`), or None if
        this PyTorch does not say."""
        try:
            return Path(cpp_extension._get_build_directory(self.extension_name, verbose=False))
        except (AttributeError, OSError, TypeError):
            return None

    def is_cached(self, build_directory: Path | None) -> bool:
        """Whether torch will load the library from its cache without compiling: the library is there and was built
        from these very inputs (the stamp `mark_cached` wrote after that build loaded)."""
        if build_directory is None:
            return False
        stamp = build_directory / BUILD_STAMP
        library = build_directory / f"{self.extension_name}.so"
        return library.is_file() and stamp.is_file() and stamp.read_text().strip() == self.fingerprint()

    def mark_cached(self, build_directory: Path | None) -> None:
        """Record that the library in `build_directory` is the build of these inputs (best effort: a read-only cache
        only means the next load announces a build again)."""
        if build_directory is None:
            return
        try:
            (build_directory / BUILD_STAMP).write_text(self.fingerprint() + "\n")
        except OSError:
            pass


def _build_and_load(build: KernelBuild) -> None:
    """Compile the kernel (or load torch's cached build of it) and load its operators into `torch.ops`. The build
    takes about 30 s and is announced; a cached load takes well under a second and is silent."""
    cpp_extension = _import_cpp_extension()
    build_directory = build.build_directory(cpp_extension)
    compiles = not build.is_cached(build_directory)
    if compiles:
        logger.info(
            "Compiling LocAtViT's fused CPU attention kernel for %s with the C++ compiler and ninja into %s (about 30 "
            "s, once per machine and PyTorch version; later runs load it from there).",
            build.capability,
            build_directory or "torch's extension cache",
        )
    start = time.perf_counter()
    cpp_extension.load(
        build.extension_name,
        sources=[str(build.source)],
        extra_cflags=build.cflags,
        extra_ldflags=build.ldflags,
        is_python_module=False,
    )
    if compiles:
        logger.info("Built LocAtViT's fused CPU attention kernel in %.0f s.", time.perf_counter() - start)
        build.mark_cached(build_directory)


@functools.cache
def _load(capability: str | None = None) -> object | None:
    """The kernel's operators (`torch.ops.locatvit_cpu_<instruction set>`), built for `capability` (default: this
    CPU's, as PyTorch reports it) and loaded once; None where they are unavailable."""
    capability = capability or torch.backends.cpu.get_cpu_capability()
    if os.environ.get("LOCATVIT_CPU_KERNEL", "1") == "0" or capability not in CAPABILITY_FLAGS:
        return None
    if not KERNEL_SOURCE.is_file():  # informational only: the expected case for remote code
        logger.info(
            "LocAtViT's fused CPU attention kernel is unavailable: its source %s is not there (this module was "
            "copied without its package); using sdpa with a mask.",
            KERNEL_SOURCE,
        )
        return None
    build = KernelBuild(capability, KERNEL_SOURCE)
    try:
        _build_and_load(build)
    except Exception as error:  # no compiler, no ninja, a failed build: the stock path serves
        logger.warning("LocAtViT's fused CPU attention kernel is unavailable (%s); using sdpa with a mask.", error)
        return None
    operators = getattr(torch.ops, build.namespace)
    if not operators.has_blas():
        logger.warning("LocAtViT's fused CPU attention kernel found no BLAS in this PyTorch; using sdpa with a mask.")
        return None
    return operators


def _loaded() -> object | None:
    """`_load()` for this CPU, serialized: concurrent first calls build the kernel once."""
    with _build_lock:
        return _load()


def _kernel():
    """The kernel's operators for this CPU, for the custom operators' implementations; a clear error where they are
    unavailable (the model checks `kernel_available()` first and never gets here then)."""
    operators = _loaded()
    if operators is None:
        raise RuntimeError(UNAVAILABLE)
    return operators


# The custom operators' implementations, fake (shape-only) implementations and autograd formulas. The kernel returns
# the attention output token-major, (batch, N, heads, dim), and the query, key and value gradients as (batch, heads,
# N, dim) views of token-major tensors: the fake implementations give the same layouts.


def _token_major(query: torch.Tensor) -> torch.Tensor:
    """A new (batch, N, heads, dim) tensor for a (batch, heads, N, dim) query."""
    batch, heads, seq_len, dim = query.shape
    return query.new_empty(batch, seq_len, heads, dim)


def _attention_kernel(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    row: torch.Tensor,
    col: torch.Tensor,
    scale: float,
    num_prefix: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    return _kernel().gaussian_attention(query, key, value, row, col, scale, num_prefix)


def _attention_fake(query, key, value, row, col, scale, num_prefix):
    batch, heads, seq_len, _ = query.shape
    return _token_major(query), query.new_empty(batch, heads, seq_len)


def _attention_setup_context(ctx, inputs, output) -> None:
    """Keeps only the inputs, the output and one log-sum-exp per query: the backward recomputes the probabilities
    block by block (nothing N x N is kept). The log-sum-exp is an auxiliary output, without a gradient."""
    query, key, value, row, col, scale, num_prefix = inputs
    attended, logsumexp = output
    ctx.mark_non_differentiable(logsumexp)
    ctx.save_for_backward(query, key, value, row, col, attended, logsumexp)
    ctx.scale, ctx.num_prefix = scale, num_prefix


def _attention_backward(ctx, grad_output, _grad_logsumexp):
    """The gradients of the inputs that need one, by the kernel's backward operator (a traced call under
    `torch.compile`)."""
    grads = _OPERATORS.attention_backward(grad_output, *ctx.saved_tensors, ctx.scale, ctx.num_prefix)
    return *(grad if needed else None for grad, needed in zip(grads, ctx.needs_input_grad)), None, None


def _attention_backward_kernel(
    grad_output: torch.Tensor,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    row: torch.Tensor,
    col: torch.Tensor,
    output: torch.Tensor,
    logsumexp: torch.Tensor,
    scale: float,
    num_prefix: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The kernel reads the gradient, the output and the log-sum-exp contiguous (no copy for those that are), and
    autograd may hand it a strided gradient."""
    saved = output.contiguous(), logsumexp.contiguous()
    grad_output = grad_output.contiguous()
    return _kernel().gaussian_attention_backward(grad_output, query, key, value, row, col, *saved, scale, num_prefix)


def _attention_backward_fake(grad_output, query, key, value, row, col, output, logsumexp, scale, num_prefix):
    grad_query, grad_key, grad_value = (_token_major(query).transpose(1, 2) for _ in range(3))
    return grad_query, grad_key, grad_value, row.new_empty(row.shape), col.new_empty(col.shape)


def _profiles_kernel(
    statistics: torch.Tensor,
    distances: torch.Tensor,
    eps: float,
    floor: float,
    clamp: float,
    height: int,
    width: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    row, col = _profiles_fake(statistics, distances, eps, floor, clamp, height, width)
    _kernel().gaussian_profiles_(row, col, statistics, distances, eps, floor, clamp)
    return row, col


def _profiles_fake(statistics, distances, eps, floor, clamp, height, width):
    batch, heads, _, queries = statistics.shape
    return statistics.new_empty(batch, heads, queries, height), statistics.new_empty(batch, heads, queries, width)


def _profiles_setup_context(ctx, inputs, output) -> None:
    """Keeps the statistics and the profiles: the backward is one pass, where autograd through the formula allocates
    and keeps a dozen (batch, heads, 2, S, Q) tensors per layer (training step 1.11x -> 1.06x of the ViT's time,
    measured at 224 px batch 16 and 512 px batch 4)."""
    statistics, distances, eps, floor, _clamp, _height, _width = inputs
    ctx.save_for_backward(statistics, distances, *output)
    ctx.eps, ctx.floor = eps, floor


def _profiles_backward(ctx, grad_row, grad_col):
    """The statistics' gradient, by the kernel's backward operator; the table and the constants get none."""
    statistics, distances, row, col = ctx.saved_tensors
    grad = _OPERATORS.profiles_backward(grad_row, grad_col, statistics, row, col, distances, ctx.eps, ctx.floor)
    return grad, None, None, None, None, None, None


def _write_profiles_kernel(
    row: torch.Tensor,
    col: torch.Tensor,
    statistics: torch.Tensor,
    distances: torch.Tensor,
    eps: float,
    floor: float,
    clamp: float,
) -> None:
    _kernel().gaussian_profiles_(row, col, statistics, distances, eps, floor, clamp)


def _write_profiles_fake(row, col, statistics, distances, eps, floor, clamp) -> None:
    return None


def _profiles_backward_kernel(
    grad_row: torch.Tensor,
    grad_col: torch.Tensor,
    statistics: torch.Tensor,
    row: torch.Tensor,
    col: torch.Tensor,
    distances: torch.Tensor,
    eps: float,
    floor: float,
) -> torch.Tensor:
    """The kernel reads the gradients, the profiles and the table contiguous (no copy for those that are)."""
    grad_row, grad_col, row, col, distances = (t.contiguous() for t in (grad_row, grad_col, row, col, distances))
    return _kernel().gaussian_profiles_backward(grad_row, grad_col, statistics, row, col, distances, eps, floor)


def _profiles_backward_fake(grad_row, grad_col, statistics, row, col, distances, eps, floor):
    batch, heads, _, queries = statistics.shape
    return row.new_empty(batch, heads, 3, queries)


def _refuse_double_backward(ctx, *grads):
    """The backward operators have no derivative of their own: a gradient of gradients raises instead of being
    wrong."""
    raise RuntimeError(
        "LocAtViT's fused CPU kernel is differentiable once: its backward has no derivative, so a double backward "
        "(a gradient of its gradients, e.g. through `create_graph=True`) is not supported."
    )


@dataclass(frozen=True)
class Operators:
    """The custom operators `torch.ops.locatvit.*`, resolved once (each call is then one dispatcher call)."""

    attention: Callable
    attention_backward: Callable
    profiles: Callable
    write_profiles: Callable
    profiles_backward: Callable


def _define(name: str, kernel: Callable, fake: Callable, mutates_args: tuple[str, ...] = ()) -> Callable:
    """Defines `torch.ops.locatvit.<name>` for CPU tensors, its schema read from `kernel`'s annotations; returns
    its overload. Defining it again (a reloaded module) replaces the previous definition."""
    op = torch.library.custom_op(f"locatvit::{name}", kernel, mutates_args=mutates_args, device_types="cpu")
    op.register_fake(fake)
    return getattr(torch.ops.locatvit, name).default


def _define_operators() -> Operators:
    """Defines the custom operators and their autograd formulas (the backward operators refuse a second
    derivative, as `once_differentiable` does)."""
    operators = Operators(
        attention=_define("gaussian_attention", _attention_kernel, _attention_fake),
        attention_backward=_define(
            "gaussian_attention_backward", _attention_backward_kernel, _attention_backward_fake
        ),
        profiles=_define("gaussian_profiles", _profiles_kernel, _profiles_fake),
        write_profiles=_define("gaussian_profiles_", _write_profiles_kernel, _write_profiles_fake, ("row", "col")),
        profiles_backward=_define("gaussian_profiles_backward", _profiles_backward_kernel, _profiles_backward_fake),
    )
    register = torch.library.register_autograd
    register(operators.attention, _attention_backward, setup_context=_attention_setup_context)
    register(operators.profiles, _profiles_backward, setup_context=_profiles_setup_context)
    register(operators.attention_backward, _refuse_double_backward)
    register(operators.profiles_backward, _refuse_double_backward)
    return operators


# Only where the source is: a copy of this module without it (remote code) must not replace the operators that the
# installed package defined in the same process with implementations that cannot run.
_OPERATORS: Operators | None = _define_operators() if KERNEL_SOURCE.is_file() else None


@torch.compiler.assume_constant_result  # traced code asks too (a forced backend): a constant, not a graph break
def kernel_available() -> bool:
    """Whether the fused kernel's operators run here: its source is there, and it is built for this CPU (compiled, or
    loaded from torch's cache, on the first call)."""
    return _loaded() is not None and _OPERATORS is not None


def gaussian_attention(query, key, value, row, col, scale: float, num_prefix: int) -> torch.Tensor:
    """softmax(q k^T * scale + B) v with the separable bias B of the (batch, heads, P, H) row and (batch, heads, P,
    W) column profiles (`LocAtViTGaussianBias`'s output), for float32 (or float64) CPU tensors: (batch, N,
    heads, dim), with its gradient where one is recorded. One call of `torch.ops.locatvit.gaussian_attention`, whose
    second output (one log-sum-exp per query, kept for the backward) it drops."""
    if _OPERATORS is None:
        raise RuntimeError(UNAVAILABLE)
    return _OPERATORS.attention(query, key, value, row, col, scale, num_prefix)[0]


def fused_cpu_attention() -> Callable | None:
    """`gaussian_attention`, or None where the kernel is unavailable (built on the first call)."""
    return gaussian_attention if kernel_available() else None


def gaussian_profiles(statistics, distances, eps: float, floor: float, clamp: float, height: int, width: int):
    """Row (batch, heads, Q, H) and column (batch, heads, Q, W) profiles from the statistics (batch, heads, 3, Q), by
    `torch.ops.locatvit.gaussian_profiles` (float32 CPU tensors), with their gradient where one is recorded."""
    if _OPERATORS is None:
        raise RuntimeError(UNAVAILABLE)
    return _OPERATORS.profiles(statistics, distances, eps, floor, clamp, height, width)


def fused_cpu_profiles() -> Callable | None:
    """`torch.ops.locatvit.gaussian_profiles_(row, col, statistics, distances, eps, floor, clamp)`: the Gaussian's
    profiles without a gradient, written into `row` and `col` in one pass (float32 CPU tensors; for the encoder's
    reused buffers); None where the kernel is unavailable."""
    return _OPERATORS.write_profiles if kernel_available() else None
