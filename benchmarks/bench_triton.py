"""The Triton kernel (`triton_attention_locatvit`) against `scaled_dot_product_attention`, on CUDA: time and peak memory.

    python benchmarks/bench_triton.py [--repeats 20] [--only REGEX] [--sweep] [--json PATH]
    python benchmarks/bench_triton.py --compile-only [--arch 90 80] [--dtype bfloat16 float16 float32] [--width 14 100]

For each shape (ViT-Tiny at 224 px batch 256, 512 px batch 32, 1024 px batch 8, and ViT-Base at 224 px batch 64; head
size 64, bfloat16, one CLS token), forward (without a gradient) and forward + backward are timed for:

- `triton`: the kernel, the bias computed inside it from the profiles;
- `sdpa`: no bias at all, what a plain ViT's attention costs (flash attention);
- `sdpa_mask`: the project's `sdpa` backend, the bias written as a bfloat16 float mask (memory-efficient attention;
  with a gradient, `SeparableBiasWriter` reduces the mask's gradient to the profiles);
- `cuda_chunked` (forward + backward only): the project's CUDA training backend, the memory-efficient kernel in chunks.

It prints the median time, the ratios to `sdpa` (the cost of the bias over a ViT) and to `sdpa_mask`, and the peak
memory of one call above what was allocated before it. First, each shape is checked at batch 2 against float32 eager
attention: the kernel's output and gradients must be within twice the error of eager attention in bfloat16 (plus a
small floor; the mask path's error is printed beside), else the run ends with status 1 after printing the table.

`--sweep` times the kernel for several block sizes, warps and stages per pass, to choose `_config`. `--compile-only`
needs no GPU: it compiles every kernel for the given architectures, dtypes and grid widths and prints registers and
spilled bytes per thread and shared memory per block (tests/test_triton_attention.py checks the released models'
grid this way).
On a machine without CUDA (and without `--compile-only`) the script says so and exits with status 1.
"""

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

# (name, heads, grid side, batch)
CASES = [
    ("tiny-224-b256", 3, 14, 256),
    ("tiny-512-b32", 3, 32, 32),
    ("tiny-1024-b8", 3, 64, 8),
    ("base-224-b64", 12, 14, 64),
]
DEVICE = "cuda"
HEAD_DIM = 64
NUM_PREFIX = 1
DTYPE = torch.bfloat16

# (queries per block, keys per block, warps, stages) tried by --sweep, per pass
SWEEP_FORWARD = [(64, 64, 8, 2), (64, 64, 4, 2), (64, 64, 8, 3), (128, 64, 8, 2), (64, 32, 4, 2), (32, 64, 4, 2)]
SWEEP_BACKWARD = [(32, 64, 8, 2), (32, 64, 4, 2), (64, 64, 8, 2), (32, 32, 4, 2), (64, 32, 8, 2), (16, 64, 4, 2)]


def make_inputs(heads: int, side: int, batch: int, requires_grad: bool, seed: int = 0):
    """Query, key and value as the model passes them ((batch, heads, N, D) views of token-major projections) and
    Gaussian row and column profiles like a trained model's: centred near each query, widths of 1 to 4 patches."""
    generator = torch.Generator(device=DEVICE).manual_seed(seed)
    seq_len = NUM_PREFIX + side * side
    projections = [
        torch.randn(batch, seq_len, heads * HEAD_DIM, device=DEVICE, generator=generator, dtype=DTYPE)
        for _ in range(3)
    ]
    query, key, value = (t.view(batch, seq_len, heads, HEAD_DIM).transpose(1, 2) for t in projections)
    patches = side * side
    lines = torch.arange(side, device=DEVICE, dtype=torch.float32)
    own = torch.stack(torch.meshgrid(lines, lines, indexing="ij"), -1).reshape(patches, 2)  # (row, col) per query
    shape = (batch, heads, patches, 1)
    centre_row = own[:, 0, None] + torch.randn(shape, device=DEVICE, generator=generator)
    centre_col = own[:, 1, None] + torch.randn(shape, device=DEVICE, generator=generator)
    width = 1 + 3 * torch.rand(shape, device=DEVICE, generator=generator)
    strength = (2 * torch.rand(shape, device=DEVICE, generator=generator)).sqrt()
    row = strength * torch.exp(-0.5 * ((lines - centre_row) / width) ** 2)
    col = strength * torch.exp(-0.5 * ((lines - centre_col) / width) ** 2)
    tensors = [query, key, value, row.contiguous(), col.contiguous()]
    return [t.detach().requires_grad_(requires_grad) for t in tensors]


def methods():
    """name -> fn(query, key, value, row, col) returning (batch, N, heads, D)."""
    from torch.nn import functional as F

    from locatvit_hf.attention_locatvit import BiasWorkspace, cuda_chunked_attention, sdpa_attention
    from locatvit_hf.triton_attention_locatvit import triton_gaussian_attention

    scale = HEAD_DIM**-0.5
    workspace = BiasWorkspace()

    def triton(q, k, v, row, col):
        return triton_gaussian_attention(q, k, v, row, col, scale, NUM_PREFIX)

    def sdpa(q, k, v, row, col):
        return F.scaled_dot_product_attention(q, k, v, scale=scale).transpose(1, 2)

    def sdpa_mask(q, k, v, row, col):
        return sdpa_attention(q, k, v, (row, col), scale=scale, dropout=0.0, num_prefix=NUM_PREFIX)[0]

    def cuda_chunked(q, k, v, row, col):
        kwargs = dict(scale=scale, dropout=0.0, num_prefix=NUM_PREFIX, workspace=workspace)
        return cuda_chunked_attention(q, k, v, (row, col), **kwargs)[0]

    return {"triton": triton, "sdpa": sdpa, "sdpa_mask": sdpa_mask, "cuda_chunked": cuda_chunked}


def step(fn, inputs, grad_output, training: bool):
    """One call: the forward without a gradient, or forward and backward (gradients of all inputs that have one)."""
    if not training:
        with torch.no_grad():
            return fn(*inputs)
    output = fn(*inputs)
    return torch.autograd.grad(output, [t for t in inputs if t.requires_grad], grad_output, allow_unused=True)


def cuda_time(call, repeats: int, warmup: int = 3) -> float:
    """Median milliseconds of `call()`, by CUDA events."""
    for _ in range(warmup):
        call()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        call()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def peak_mb(call) -> float:
    """Peak memory of one `call()` above what was allocated before it, in MiB."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    call()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - before) / 2**20


def check(case, table) -> list[str]:
    """The kernel's output and gradients against float32 eager attention at batch 2, beside the errors of eager
    attention in bfloat16 (the yardstick, as in tests/test_triton_attention.py) and of the mask path; returns the
    failures."""
    from locatvit_hf.attention_locatvit import eager_attention

    name, heads, side, _ = case
    inputs = make_inputs(heads, side, 2, requires_grad=True, seed=1)
    grad_output = torch.randn(2, NUM_PREFIX + side * side, heads, HEAD_DIM, device=DEVICE, dtype=DTYPE)
    reference_inputs = [t.detach().float().requires_grad_() for t in inputs]

    def eager(q, k, v, row, col):
        kwargs = dict(scale=HEAD_DIM**-0.5, dropout=0.0, num_prefix=NUM_PREFIX)
        return eager_attention(q, k, v, (row, col), **kwargs)[0]

    def run(fn, tensors):
        output = fn(*tensors)
        return [output, *torch.autograd.grad(output, tensors, grad_output.to(output.dtype))]

    reference = run(eager, reference_inputs)
    results = {method: run(table[method], inputs) for method in ("triton", "sdpa_mask")}
    results["eager"] = run(eager, inputs)
    failures = []
    for index, label in enumerate(("output", "grad q", "grad k", "grad v", "grad row", "grad col")):
        expected = reference[index].double()
        errors = {m: (results[m][index].double() - expected).abs().max().item() for m in results}
        floor = 2**-8 * 0.1 * expected.abs().max().item()
        ok = errors["triton"] <= 2 * errors["eager"] + floor
        print(f"  check {name:14s} {label:8s} triton {errors['triton']:.2e}  eager bf16 {errors['eager']:.2e}  "
              f"sdpa_mask {errors['sdpa_mask']:.2e}  {'ok' if ok else 'TOO LARGE'}")  # fmt: skip
        if not ok:
            failures.append(f"{name} {label}")
    return failures


def measure(case, table, repeats: int) -> list[dict]:
    name, heads, side, batch = case
    rows = []
    for training in (False, True):
        inputs = make_inputs(heads, side, batch, requires_grad=training)
        grad_output = torch.randn(batch, NUM_PREFIX + side * side, heads, HEAD_DIM, device=DEVICE, dtype=DTYPE)
        names = [m for m in table if training or m != "cuda_chunked"]
        times, memory = {}, {}
        for method in names:
            call = lambda fn=table[method], args=(inputs, grad_output, training): step(fn, *args)  # noqa: E731
            memory[method] = peak_mb(call)
            times[method] = cuda_time(call, repeats)
        mode = "forward+backward" if training else "forward"
        for method in names:
            rows.append(
                dict(
                    case=name, mode=mode, method=method, ms=times[method], peak_mb=memory[method],
                    vs_sdpa=times[method] / times["sdpa"], vs_mask=times[method] / times["sdpa_mask"],
                )
            )  # fmt: skip
    return rows


def sweep(case, repeats: int) -> list[dict]:
    """Times the kernel for each configuration of SWEEP_FORWARD (forward) and SWEEP_BACKWARD (forward+backward, the
    forward at its default)."""
    import locatvit_hf.triton_attention_locatvit as kernel_module

    default = kernel_module._config
    name, heads, side, batch = case
    fn = methods()["triton"]
    rows = []
    for training, configs in ((False, SWEEP_FORWARD), (True, SWEEP_BACKWARD)):
        inputs = make_inputs(heads, side, batch, requires_grad=training)
        grad_output = torch.randn(batch, NUM_PREFIX + side * side, heads, HEAD_DIM, device=DEVICE, dtype=DTYPE)
        for config in configs:

            def chosen(dim, backward, dtype, config=config, training=training):
                return config if backward == training else default(dim, backward, dtype)

            kernel_module._config = chosen
            try:
                ms = cuda_time(lambda args=(inputs, grad_output, training): step(fn, *args), repeats)
            except Exception as error:  # a configuration that does not compile or fit: reported, not fatal
                ms = float("nan")
                print(f"  {name} {config}: {type(error).__name__}: {str(error)[:200]}")
            finally:
                kernel_module._config = default
            mode = "forward+backward" if training else "forward"
            rows.append(dict(case=name, mode=mode, config=list(config), ms=ms))
            print(f"  sweep {name:14s} {mode:16s} {config}: {ms:.3f} ms")
    return rows


# --compile-only: registers, spills and shared memory per kernel, without a GPU

KERNELS = ("forward_kernel", "delta_kernel", "key_value_grad_kernel", "query_grad_kernel")
PROFILE_KERNELS = ("profiles_kernel", "profiles_grad_kernel")  # `_profiles_kernel` forward, and with GRADIENT
POINTERS_F32 = {
    "ROW",
    "COL",
    "LSE",
    "DELTA",
    "GROW",
    "GCOL",
    "PREFIX_GK",
    "PREFIX_GV",
    "WEIGHT",
    "BIAS",
    "TABLE",
    "GW",
}
POINTERS = POINTERS_F32 | {"Q", "K", "V", "OUT", "RESIDUAL", "GO", "GK", "GV", "GQ"}  # RESIDUAL: int8
TRITON_TYPES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
# Shared memory one block may use (bytes, opt-in), as the devices report it: A100, A10/RTX 3090, L4/RTX 4090, H100/H200.
SHARED_LIMITS = {80: 166912, 86: 101376, 89: 101376, 90: 232448}


def compile_kernel(kernel_name: str, arch: int, dtype: torch.dtype, width: int) -> dict:
    """Compiles one kernel for one architecture as a call with a square grid of side `width` (head size 64, one CLS
    token) would, with `_config`'s blocks for `dtype`, and reads registers and spilled bytes per thread from the cubin
    and shared memory per block from the compiler."""
    import triton
    from triton.backends.compiler import GPUTarget

    import locatvit_hf.triton_attention_locatvit as kernel_module

    if kernel_name in PROFILE_KERNELS:
        (block_m, block_n), warps, stages = kernel_module.PROFILE_BLOCKS, *kernel_module.PROFILE_LAUNCH
        rows_per_block = splits = None
    else:
        backward = kernel_name != "forward_kernel"
        block_m, block_n, warps, stages = kernel_module._config(HEAD_DIM, backward, dtype)
        rows_per_block, splits, _, _ = kernel_module._layout(width, width, block_n)
    constants = dict(
        D=HEAD_DIM, NUM_PREFIX=NUM_PREFIX, ROWS=rows_per_block, SEGMENTED=(splits or 1) > 1,
        IEEE=dtype == torch.float32, STORE_RESIDUAL=dtype != torch.float32, HAS_RESIDUAL=dtype != torch.float32,
        INTERPRET=False, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=HEAD_DIM, BLOCK_Q=block_m, BLOCK_S=block_n,
        GRADIENT=kernel_name == "profiles_grad_kernel",
    )  # fmt: skip
    fn = getattr(kernel_module._kernels(), "profiles_kernel" if kernel_name in PROFILE_KERNELS else kernel_name)
    signature, used = {}, {}
    for arg in fn.arg_names:
        if arg in constants:
            signature[arg], used[arg] = "constexpr", constants[arg]
        elif re.fullmatch(r"s\w*_d", arg):  # innermost strides: 1, as Triton specializes them
            signature[arg], used[arg] = "constexpr", 1
        elif arg in POINTERS:
            signature[arg] = (
                "*fp32" if arg in POINTERS_F32 else "*i8" if arg == "RESIDUAL" else f"*{TRITON_TYPES[dtype]}"
            )
        else:
            signature[arg] = "fp32" if arg in ("qk_scale", "scale", "eps", "floor", "clamp") else "i32"
    source = triton.compiler.ASTSource(fn=fn, signature=signature, constexprs=used)
    compiled = triton.compile(
        source, target=GPUTarget("cuda", arch, 32), options=dict(num_warps=warps, num_stages=stages)
    )
    cuobjdump = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.TemporaryDirectory() as directory:
        cubin = Path(directory) / "kernel.cubin"
        cubin.write_bytes(compiled.asm["cubin"])
        usage = subprocess.run([str(cuobjdump), "-res-usage", str(cubin)], capture_output=True, text=True).stdout
    registers, stack = re.search(r"REG:(\d+)", usage), re.search(r"STACK:(\d+)", usage)
    return dict(
        arch=arch, dtype=str(dtype).removeprefix("torch."), width=width, kernel=kernel_name,
        rows_per_block=rows_per_block, segments=splits, blocks=[block_m, block_n], warps=warps, stages=stages,
        registers=int(registers.group(1)) if registers else None, spilled_bytes=int(stack.group(1)) if stack else None,
        shared_bytes=compiled.metadata.shared, shared_limit=SHARED_LIMITS.get(arch),
    )  # fmt: skip


def compile_report(architectures: list[int], dtypes: list[torch.dtype], widths: list[int]) -> list[dict]:
    """`compile_kernel` for every kernel, architecture, dtype and grid width (14: 4 grid rows per key block at 64
    keys; 32: 2; 64: 1; 100: rows cut into segments), printed as it goes."""
    os.environ.pop("TRITON_INTERPRET", None)  # compile, whatever the environment asked for
    rows = []
    cases = [(arch, dtype, width, kernel) for arch in architectures for dtype in dtypes for width in widths
             for kernel in KERNELS + PROFILE_KERNELS]  # fmt: skip
    for arch, dtype, width, kernel_name in cases:
        row = compile_kernel(kernel_name, arch, dtype, width)
        rows.append(row)
        print(
            f"sm_{arch} {row['dtype']:8s} W={width:3d} {kernel_name:22s} blocks {row['blocks']} "
            f"rows/block {row['rows_per_block']} segments {row['segments']}: {row['registers']} "
            f"registers, {row['spilled_bytes']} bytes spilled, {row['shared_bytes']} bytes shared"
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--only", help="only the shapes whose name matches this regular expression")
    parser.add_argument("--sweep", action="store_true", help="also time the kernel's block sizes, warps and stages")
    parser.add_argument("--compile-only", action="store_true", help="registers and spills per kernel; no GPU needed")
    parser.add_argument("--arch", type=int, nargs="+", default=[90, 80], help="architectures for --compile-only")
    parser.add_argument(
        "--dtype",
        nargs="+",
        default=["bfloat16"],
        choices=["bfloat16", "float16", "float32"],
        help="for --compile-only",
    )
    parser.add_argument("--width", type=int, nargs="+", default=[14, 32, 64, 100], help="grid widths, --compile-only")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()
    results: dict = {"torch": torch.__version__}
    torch.manual_seed(0)
    if args.compile_only:
        results["compile"] = compile_report(args.arch, [getattr(torch, name) for name in args.dtype], args.width)
    else:
        if not torch.cuda.is_available():
            sys.exit("bench_triton.py measures CUDA kernels and found no CUDA device; nothing was measured.")
        from locatvit_hf.triton_attention_locatvit import triton_available

        if not triton_available():
            sys.exit("bench_triton.py needs the `triton` package; nothing was measured.")
        results["device"] = torch.cuda.get_device_name()
        cases = [case for case in CASES if not args.only or re.search(args.only, case[0])]
        table = methods()
        start = time.perf_counter()
        make_inputs(3, 4, 1, requires_grad=False)  # CUDA context
        step(
            table["triton"], make_inputs(3, 14, 1, True), torch.randn(1, 197, 3, 64, device=DEVICE, dtype=DTYPE), True
        )
        print(f"first call of the kernel (compilation): {time.perf_counter() - start:.1f} s")
        failures = [failure for case in cases for failure in check(case, table)]
        rows = [row for case in cases for row in measure(case, table, args.repeats)]
        print(f"\n{'case':15s} {'mode':17s} {'method':13s} {'ms':>9s} {'x sdpa':>7s} {'x mask':>7s} {'peak MiB':>9s}")
        for row in rows:
            print(
                f"{row['case']:15s} {row['mode']:17s} {row['method']:13s} {row['ms']:9.3f} {row['vs_sdpa']:7.2f} "
                f"{row['vs_mask']:7.2f} {row['peak_mb']:9.1f}"
            )
        results.update(results=rows, check_failures=failures)
        if args.sweep:
            results["sweep"] = [row for case in cases for row in sweep(case, args.repeats)]
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    if results.get("check_failures"):
        sys.exit(f"the kernel's errors exceed twice eager attention's in bfloat16: {results['check_failures']}")


if __name__ == "__main__":
    main()
