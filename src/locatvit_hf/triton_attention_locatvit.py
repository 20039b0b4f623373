"""A FlashAttention-2-style Triton kernel: attention with LocAtViT's separable Gaussian bias, forward and backward.

softmax(q k^T * scale + B) v, where B[prefix + i, prefix + j] = row[i, r_j] * col[i, c_j] for patch query i and patch
key j at grid position (r_j, c_j) = divmod(j, W), and 0 in the rows and columns of the prefix (CLS) tokens. Stock
kernels need B written out as a (batch, heads, N, N) mask, and in training its whole gradient; here each program
keeps a block of queries' scores in registers, adds the bias from the (H + W) profile values of each query, and runs
the online softmax, so nothing N x N reaches memory. The backward recomputes the probabilities from one log-sum-exp
per query and reduces the bias gradient to the profiles in the same pass. In bfloat16 and float16 the forward also
keeps the output's rounding error, in one byte per element, so that the backward's delta = rowsum(dO * O) is exact to
float32 rounding and 1/127 of the output's last place (`_setup_context`).

Layout that makes the bias cheap: every block of keys covers whole grid rows (`ROWS` of them, when W fits in a block)
or one segment of one grid row (when it does not). Key lane `l` of every block then sits at the same grid column, so
a block of queries spreads its column-profile values onto the lanes once (a product with a 0/1 matrix, which leaves
them in the scores' register layout), and each key block adds only `ROWS` row-profile values per query, placed by
one select each. Lanes past `ROWS * W` are masked (W = 14: 56 of 64 lanes used). The prefix keys are not in these
blocks: they are rank-one terms added before the loop.

Backward: a key-block-major pass for dK and dV, and a query-block-major pass for dQ that also reduces
dS = P * (dP - delta) to the gradients of its own queries' profiles (no atomics: each query block owns them). The
prefix keys' dK and dV are per-query-block partial sums, added up afterwards (a few values per block).

The Gaussian's profiles themselves come from one more kernel (`triton_gaussian_profiles`), run once forward and once
backward: each block of queries computes its 3 statistics (the variance and strength maps, in float32) from the
queries and its (H + W) profile values in registers and writes them once; the backward computes them again, reduces
the profiles' gradients to the statistics' and those to the queries', the maps' weight and bias. Without it, a layer
takes a float32 copy of the queries, a matrix product and about a dozen elementwise passes over the profiles, each
way.

Registered as the custom operators `torch.ops.locatvit.triton_gaussian_attention` and `..._backward`, with fake
implementations and an autograd formula, so that `torch.compile` traces one operator and `torch.library.opcheck`
checks it. They run CUDA tensors, and CPU tensors under Triton's interpreter (`TRITON_INTERPRET=1` set before the
first call: slow, for tests). Triton is imported on the first call only, so this module imports where it is absent
(Hugging Face remote code); `triton_available()` says whether the kernel can run.
"""

# Annotations stay strings: the kernels' `tl.constexpr` is read by Triton, and `tl` exists only once Triton is imported.
from __future__ import annotations

import contextlib
import functools
import os
import threading
from types import SimpleNamespace

import torch

LOG2E = 1.4426950408889634  # the kernels use exp2: exp(x) = exp2(x * log2(e))
LN2 = 0.6931471805599453

# At most this many grid rows per key block: each row costs one select per score. Narrower grids (W < 8 at 64-lane
# blocks) leave lanes unused instead; they are small.
MAX_ROWS_PER_BLOCK = 8
MAX_HEAD_DIM = 128
MAX_PREFIX = 16  # prefix tokens are unrolled rank-one terms
MAX_SLICES = 65535  # one program per (batch, head) on the launch grid's second axis, which CUDA caps there
DTYPES = (torch.float32, torch.bfloat16, torch.float16)

# (block of queries, block of keys) for every kernel, instead of the tuned choice of `_config`: for tests, whose small
# grids need small blocks to cover several blocks, partial blocks and segmented grid rows.
FORCED_BLOCKS: tuple[int, int] | None = None

UNAVAILABLE = (
    "LocAtViT's Triton attention kernel needs the `triton` package and CUDA tensors (or CPU tensors with "
    "TRITON_INTERPRET=1 set before its first call, which runs Triton's slow interpreter, for tests). Check "
    "`triton_available()` first."
)

# Set by `_build()` when Triton is imported: the kernels below read them as globals when they are compiled or
# interpreted, never before (Triton kernels read only `tl.constexpr` globals and Triton functions). `_SUM` and `_MAX`
# are the reductions' combining functions.
tl = None
_LOG2E = _LN2 = _SUM = _MAX = None


@torch.compiler.assume_constant_result  # asked by traced code (a forced backend): a constant, not a graph break
def interpreting() -> bool:
    """Whether Triton runs its interpreter (`TRITON_INTERPRET`), as Triton itself reads the variable."""
    try:
        from triton import knobs

        return bool(knobs.runtime.interpret)
    except (ImportError, AttributeError):  # an older Triton without knobs
        return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


@functools.cache
def _triton_importable() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


@torch.compiler.assume_constant_result
def triton_available() -> bool:
    """Whether the kernel can run here: Triton is importable, and there is a CUDA device or the interpreter is on."""
    return _triton_importable() and (torch.cuda.is_available() or interpreting())


# The kernels. Plain functions here, turned into Triton functions by `_build()` on the first call: Triton decides
# between compiling and interpreting when it wraps a function, and is imported only then. Tensor arguments are
# pointers; q/k/v/grad strides are passed, so that the transposed (batch, heads, N, D) views of the token-major
# projection are read in place. Profiles and per-query statistics are contiguous. Register pressure decides much of
# the form: benchmarks/bench_triton.py --compile-only reports registers and spills without a GPU.


def _add(a, b):
    return a + b


def _larger(a, b):
    return tl.maximum(a, b)


def _sum(x, axis: tl.constexpr):
    """tl.sum without Triton's library function (`_build` says why)."""
    return tl.reduce(x, axis, _SUM)


def _max(x, axis: tl.constexpr):
    """tl.max without Triton's library function (`_build` says why)."""
    return tl.reduce(x, axis, _MAX)


def _dot(a, b, IEEE: tl.constexpr, INTERPRET: tl.constexpr):
    """tl.dot, exact in float32 (no TF32) where `IEEE`. Under the interpreter, operands go through float32, which is
    exact for bfloat16 and float16: its `tl.dot` multiplies bfloat16 bit patterns as integers (Triton issue
    #11584)."""
    if INTERPRET:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    if IEEE:
        return tl.dot(a, b, input_precision="ieee")
    return tl.dot(a, b)


def _head_mask(d, D: tl.constexpr, BLOCK_D: tl.constexpr):
    """Which of the BLOCK_D lanes are within the head size: a constant where they all are (no mask at all)."""
    if D == BLOCK_D:
        return tl.full((BLOCK_D,), 1, tl.int1)
    return d < D


def _query_block(
    Q, b, h, sq_b, sq_h, sq_n, sq_d, pid_m, N,
    D: tl.constexpr, NUM_PREFIX: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """Block `pid_m` of queries of one (batch, head): their tokens, which are in the sequence, their patch indices and
    which are on the grid, the head lanes and their mask, the (query, lane) mask, and the queries themselves."""
    q_tok = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    q_ok = q_tok < N
    q_patch = q_tok - NUM_PREFIX
    q_in_grid = q_ok & (q_tok >= NUM_PREFIX)
    d = tl.arange(0, BLOCK_D)
    d_ok = _head_mask(d, D, BLOCK_D)
    q_mask = q_ok[:, None] & d_ok[None, :]
    q = tl.load(Q + b * sq_b + h * sq_h + q_tok[:, None] * sq_n + d[None, :] * sq_d, mask=q_mask, other=0.0)
    return q_tok, q_ok, q_patch, q_in_grid, d, d_ok, q_mask, q


def _key_block(s, g, lane_row, lane_col, H, W, ROWS: tl.constexpr, BLOCK_N: tl.constexpr):
    """Key block (segment s, row group g): the patch index of its lane 0 (lane l is patch start + l: whole rows,
    or a run of one row) and which lanes are keys (grid row g * ROWS + lane_row < H, column s * BLOCK_N + lane_col
    < W, lane_row < ROWS)."""
    valid = (lane_row < ROWS) & (g * ROWS + lane_row < H) & (s * BLOCK_N + lane_col < W)
    return g * ROWS * W + s * BLOCK_N, valid


def _row_tile(row_ptrs, q_in_grid, g, lane_row, H, ROWS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """row[i, r_j] for the queries (`row_ptrs`: each one's row profile) and the keys of row group g: ROWS values
    per query, placed on their lanes by one select each."""
    tile = tl.full((BLOCK_M, BLOCK_N), 0.0, tl.float32)
    for t in tl.static_range(ROWS):
        r = g * ROWS + t
        values = tl.load(row_ptrs + r, mask=q_in_grid & (r < H), other=0.0)
        tile = tl.where(lane_row[None, :] == t, values[:, None], tile)
    return tile


def _select_dot(x, one_hot, INTERPRET: tl.constexpr):
    """x @ one_hot for float32 x and a 0/1 matrix, to float32 precision, on tensor cores: x split into three
    bfloat16 parts of 8 significant bits each, whose products with 0 and 1 are exact. (A float32 `tl.dot` without
    TF32 runs on CUDA cores and holds whole operand rows per thread: registers spill.)"""
    high = x.to(tl.bfloat16)
    rest = x - high.to(tl.float32)
    middle = rest.to(tl.bfloat16)
    low = (rest - middle.to(tl.float32)).to(tl.bfloat16)
    one_hot = one_hot.to(tl.float32).to(tl.bfloat16)  # via float32: the interpreter casts booleans to bit patterns
    total = _dot(high, one_hot, False, INTERPRET) + _dot(middle, one_hot, False, INTERPRET)
    return total + _dot(low, one_hot, False, INTERPRET)


def _spread_cols(
    col_base, q_patch, q_in_grid, s, lane_row, lane_col, W, ROWS: tl.constexpr, INTERPRET: tl.constexpr,
    BLOCK_N: tl.constexpr,
):  # fmt: skip
    """col[i, c_j] on every lane j of the key blocks of segment s, from the queries' (BLOCK_M, BLOCK_N) slice of the
    column profiles by a product with a 0/1 matrix: the tile comes out in the layout of the scores (a gather would
    need a conversion through shared memory at every key block)."""
    c = tl.arange(0, BLOCK_N)
    cols = s * BLOCK_N + c
    mask = q_in_grid[:, None] & (cols < W)[None, :]
    profile = tl.load(col_base + q_patch[:, None] * W + cols[None, :], mask=mask, other=0.0)
    one_hot = (c[:, None] == lane_col[None, :]) & (lane_row < ROWS)[None, :]
    return _select_dot(profile, one_hot, INTERPRET)


def _forward_block(
    q, k_ptr, v_ptr, row_ptrs, col_tile, q_in_grid, s, g, lanes, lane_row, lane_col, d, d_ok, m, l_sum, acc,
    sk_n, sk_d, sv_n, sv_d, H, W, qk_scale,
    ROWS: tl.constexpr, IEEE: tl.constexpr, INTERPRET: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    """One step of the online softmax: key block (s, g) with its bias (`col_tile` in log2 units)."""
    start, k_ok = _key_block(s, g, lane_row, lane_col, H, W, ROWS, BLOCK_N)
    k_tok = start + lanes
    k_t = tl.load(k_ptr + k_tok[None, :] * sk_n + d[:, None] * sk_d, mask=k_ok[None, :] & d_ok[:, None], other=0.0)
    v = tl.load(v_ptr + k_tok[:, None] * sv_n + d[None, :] * sv_d, mask=k_ok[:, None] & d_ok[None, :], other=0.0)
    bias = _row_tile(row_ptrs, q_in_grid, g, lane_row, H, ROWS, BLOCK_M, BLOCK_N) * col_tile
    scores = _dot(q, k_t, IEEE, INTERPRET) * qk_scale + bias
    scores = tl.where(k_ok[None, :], scores, float("-inf"))
    m_new = tl.maximum(m, _max(scores, axis=1))
    alpha = tl.exp2(m - m_new)
    probs = tl.exp2(scores - m_new[:, None])
    l_sum = l_sum * alpha + _sum(probs, axis=1)
    acc = acc * alpha[:, None] + _dot(probs.to(v.dtype), v, IEEE, INTERPRET)
    return m_new, l_sum, acc


def _forward_kernel(
    Q, K, V, ROW, COL, OUT, LSE, RESIDUAL,
    sq_b, sq_h, sq_n, sq_d, sk_b, sk_h, sk_n, sk_d, sv_b, sv_h, sv_n, sv_d, so_b, so_n, so_h, so_d,
    heads, N, H, W, WSEG, GROUPS, SPLITS, qk_scale,
    D: tl.constexpr, NUM_PREFIX: tl.constexpr, ROWS: tl.constexpr, SEGMENTED: tl.constexpr, IEEE: tl.constexpr,
    STORE_RESIDUAL: tl.constexpr, INTERPRET: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """One block of queries of one (batch, head): output and log-sum-exp, by the online softmax over the prefix keys,
    then the key blocks of each segment and row group. With `STORE_RESIDUAL`, also the output's rounding error
    (`_rounding_error_code`; RESIDUAL, int8, strided like OUT)."""
    pid_m = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)  # 64-bit offsets: batch * N * heads * D may pass 2**31
    b = bh // heads
    h = bh % heads
    P = H * W
    q_tok, q_ok, q_patch, q_in_grid, d, d_ok, q_mask, q = _query_block(
        Q, b, h, sq_b, sq_h, sq_n, sq_d, pid_m, N, D, NUM_PREFIX, BLOCK_M, BLOCK_D
    )
    k_ptr = K + b * sk_b + h * sk_h
    v_ptr = V + b * sv_b + h * sv_h

    m = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    l_sum = tl.full((BLOCK_M,), 0.0, tl.float32)
    acc = tl.full((BLOCK_M, BLOCK_D), 0.0, tl.float32)
    for p in tl.static_range(NUM_PREFIX):  # rank-one terms, bias 0
        k_p = tl.load(k_ptr + p * sk_n + d * sk_d, mask=d_ok, other=0.0).to(tl.float32)
        v_p = tl.load(v_ptr + p * sv_n + d * sv_d, mask=d_ok, other=0.0).to(tl.float32)
        s_p = _sum(q.to(tl.float32) * k_p[None, :], axis=1) * qk_scale
        m_new = tl.maximum(m, s_p)
        alpha = tl.exp2(m - m_new)
        e_p = tl.exp2(s_p - m_new)
        l_sum = l_sum * alpha + e_p
        acc = acc * alpha[:, None] + e_p[:, None] * v_p[None, :]
        m = m_new

    lanes = tl.arange(0, BLOCK_N)
    lane_row = lanes // WSEG
    lane_col = lanes % WSEG
    k_ptr += NUM_PREFIX * sk_n
    v_ptr += NUM_PREFIX * sv_n
    row_ptrs = ROW + bh * P * H + q_patch * H
    col_base = COL + bh * P * W
    if SEGMENTED:
        for s in range(SPLITS):
            col_tile = _spread_cols(col_base, q_patch, q_in_grid, s, lane_row, lane_col, W, ROWS, INTERPRET, BLOCK_N)
            for g in range(GROUPS):
                m, l_sum, acc = _forward_block(
                    q, k_ptr, v_ptr, row_ptrs, col_tile * _LOG2E, q_in_grid, s, g, lanes, lane_row, lane_col, d, d_ok,
                    m, l_sum, acc, sk_n, sk_d, sv_n, sv_d, H, W, qk_scale, ROWS, IEEE, INTERPRET, BLOCK_M, BLOCK_N,
                )  # fmt: skip
    else:  # every key block has the same columns: one tile for all (and one loop: nested ones take registers)
        col_tile = (
            _spread_cols(col_base, q_patch, q_in_grid, 0, lane_row, lane_col, W, ROWS, INTERPRET, BLOCK_N) * _LOG2E
        )
        for g in range(GROUPS):
            m, l_sum, acc = _forward_block(
                q, k_ptr, v_ptr, row_ptrs, col_tile, q_in_grid, 0, g, lanes, lane_row, lane_col, d, d_ok,
                m, l_sum, acc, sk_n, sk_d, sv_n, sv_d, H, W, qk_scale, ROWS, IEEE, INTERPRET, BLOCK_M, BLOCK_N,
            )  # fmt: skip

    out = acc / l_sum[:, None]
    rounded = out.to(OUT.dtype.element_ty)
    offsets = b * so_b + h * so_h + q_tok[:, None] * so_n + d[None, :] * so_d
    tl.store(OUT + offsets, rounded, mask=q_mask)
    if STORE_RESIDUAL:
        tl.store(RESIDUAL + offsets, _rounding_error_code(out, rounded), mask=q_mask)
    tl.store(LSE + bh * N + q_tok, (m + tl.log2(l_sum)) * _LN2, mask=q_ok)


def _unit_in_last_place(rounded):
    """The spacing of bfloat16 or float16 numbers at each value of `rounded`, a power of two built as a float32 from
    their exponent bits (at least float32's smallest normal number, 2**-126: values that small are all but 0 here)."""
    bits = rounded.to(tl.int16, bitcast=True)
    if rounded.dtype == tl.bfloat16:  # float32's exponent bits and bias, 7 stored significand bits
        exponent = ((bits >> 7) & 0xFF).to(tl.int32) - 7
    else:  # float16: 5 exponent bits, bias 15, 10 stored bits; subnormals are spaced as the smallest normals
        exponent = tl.maximum(((bits >> 10) & 0x1F).to(tl.int32), 1) + (127 - 15 - 10)
    return (tl.maximum(exponent, 1) << 23).to(tl.float32, bitcast=True)


def _rounding_error_code(out, rounded):
    """out - rounded (float32 minus its rounding to bfloat16 or float16) in units of 1/127 of `rounded`'s last place,
    truncated to an int8: less than one place whichever way the output was rounded (to nearest on GPUs, towards zero
    under Triton's interpreter)."""
    return ((out - rounded.to(tl.float32)) / _unit_in_last_place(rounded) * 127.0).to(tl.int8)


def _restore_rounded(rounded, code):
    """The float32 value that `_rounding_error_code` encoded, to 1/127 of `rounded`'s last place."""
    return rounded.to(tl.float32) + code.to(tl.float32) * (_unit_in_last_place(rounded) / 127.0)


def _delta_kernel(
    GO, OUT, RESIDUAL, DELTA, sg_b, sg_n, sg_h, sg_d, so_b, so_n, so_h, so_d, heads, N,
    D: tl.constexpr, HAS_RESIDUAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """delta = rowsum(dO * O) per query, in float32, for both backward passes; O is the rounded output plus its
    rounding error where that was kept (RESIDUAL: `_rounding_error_code`, strided like OUT)."""
    pid_m = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    b = bh // heads
    h = bh % heads
    q_tok = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    d = tl.arange(0, BLOCK_D)
    mask = (q_tok < N)[:, None] & _head_mask(d, D, BLOCK_D)[None, :]
    grad = tl.load(GO + b * sg_b + h * sg_h + q_tok[:, None] * sg_n + d[None, :] * sg_d, mask=mask, other=0.0)
    out_offsets = b * so_b + h * so_h + q_tok[:, None] * so_n + d[None, :] * so_d
    out = tl.load(OUT + out_offsets, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        out = _restore_rounded(out, tl.load(RESIDUAL + out_offsets, mask=mask, other=0))
    else:
        out = out.to(tl.float32)
    delta = _sum(grad.to(tl.float32) * out, axis=1)
    tl.store(DELTA + bh * N + q_tok, delta, mask=q_tok < N)


def _key_value_grad_kernel(
    Q, K, V, GO, ROW, COL, LSE, DELTA, GK, GV,
    sq_b, sq_h, sq_n, sq_d, sk_b, sk_h, sk_n, sk_d, sv_b, sv_h, sv_n, sv_d, sg_b, sg_n, sg_h, sg_d,
    sgk_b, sgk_h, sgk_n, sgk_d, sgv_b, sgv_h, sgv_n, sgv_d,
    heads, N, H, W, WSEG, GROUPS, qk_scale, scale,
    D: tl.constexpr, NUM_PREFIX: tl.constexpr, ROWS: tl.constexpr, IEEE: tl.constexpr, INTERPRET: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """dK and dV of one block of patch keys, over all blocks of queries (the prefix keys' are in the dQ pass)."""
    kb = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    b = bh // heads
    h = bh % heads
    P = H * W
    s = kb // GROUPS
    g = kb % GROUPS
    lanes = tl.arange(0, BLOCK_N)
    lane_row = lanes // WSEG
    lane_col = lanes % WSEG
    start, k_ok = _key_block(s, g, lane_row, lane_col, H, W, ROWS, BLOCK_N)
    k_tok = NUM_PREFIX + start + lanes
    d = tl.arange(0, BLOCK_D)
    d_ok = _head_mask(d, D, BLOCK_D)
    kv_mask = k_ok[:, None] & d_ok[None, :]
    key = tl.load(K + b * sk_b + h * sk_h + k_tok[:, None] * sk_n + d[None, :] * sk_d, mask=kv_mask, other=0.0)
    value = tl.load(V + b * sv_b + h * sv_h + k_tok[:, None] * sv_n + d[None, :] * sv_d, mask=kv_mask, other=0.0)
    key_cols = s * BLOCK_N + lane_col
    col_ok = key_cols < W
    rows_m = tl.arange(0, BLOCK_M)
    q_offsets = rows_m[:, None] * sq_n + d[None, :] * sq_d
    g_offsets = rows_m[:, None] * sg_n + d[None, :] * sg_d
    col_offsets = rows_m[:, None] * W + key_cols[None, :]
    q_ptr = Q + b * sq_b + h * sq_h
    go_ptr = GO + b * sg_b + h * sg_h
    row_base = ROW + bh * P * H
    col_base = COL + bh * P * W
    grad_key = tl.full((BLOCK_N, BLOCK_D), 0.0, tl.float32)
    grad_value = tl.full((BLOCK_N, BLOCK_D), 0.0, tl.float32)
    for first in range(0, N, BLOCK_M):
        q_tok = first + rows_m
        q_ok = q_tok < N
        q_patch = q_tok - NUM_PREFIX
        q_in_grid = q_ok & (q_tok >= NUM_PREFIX)
        q_mask = q_ok[:, None] & d_ok[None, :]
        q = tl.load(q_ptr + first * sq_n + q_offsets, mask=q_mask, other=0.0)
        grad_out = tl.load(go_ptr + first * sg_n + g_offsets, mask=q_mask, other=0.0)
        lse = tl.load(LSE + bh * N + q_tok, mask=q_ok, other=0.0) * _LOG2E
        delta = tl.load(DELTA + bh * N + q_tok, mask=q_ok, other=0.0)
        col_mask = q_in_grid[:, None] & col_ok[None, :]
        col_tile = tl.load(col_base + (first - NUM_PREFIX) * W + col_offsets, mask=col_mask, other=0.0)
        row_tile = _row_tile(row_base + q_patch * H, q_in_grid, g, lane_row, H, ROWS, BLOCK_M, BLOCK_N)
        scores = _dot(q, tl.trans(key), IEEE, INTERPRET) * qk_scale + row_tile * col_tile * _LOG2E
        probs = tl.exp2(scores - lse[:, None])
        probs = tl.where(q_ok[:, None] & k_ok[None, :], probs, 0.0)
        grad_value += _dot(tl.trans(probs).to(grad_out.dtype), grad_out, IEEE, INTERPRET)
        grad_probs = _dot(grad_out, tl.trans(value), IEEE, INTERPRET)
        grad_scores = probs * (grad_probs - delta[:, None])
        grad_key += _dot(tl.trans(grad_scores).to(q.dtype), q, IEEE, INTERPRET)
    grad_key = grad_key * scale
    gk_ptr = GK + b * sgk_b + h * sgk_h + k_tok[:, None] * sgk_n + d[None, :] * sgk_d
    gv_ptr = GV + b * sgv_b + h * sgv_h + k_tok[:, None] * sgv_n + d[None, :] * sgv_d
    tl.store(gk_ptr, grad_key.to(GK.dtype.element_ty), mask=kv_mask)
    tl.store(gv_ptr, grad_value.to(GV.dtype.element_ty), mask=kv_mask)


def _query_grad_segment(
    q, grad_out, lse, delta, grad_query, k_ptr, v_ptr, row_ptrs, col_base, grow_ptrs, gcol_base,
    q_ok, q_patch, q_in_grid, s, lanes, lane_row, lane_col, d, d_ok, sk_n, sk_d, sv_n, sv_d,
    H, W, GROUPS, grow_segment_stride, qk_scale,
    ROWS: tl.constexpr, IEEE: tl.constexpr, INTERPRET: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    """The dQ pass over the key blocks of segment s: returns dQ so far (unscaled), writes the row profiles'
    gradients (per segment) and the column profiles' of the segment's columns."""
    col_tile = _spread_cols(col_base, q_patch, q_in_grid, s, lane_row, lane_col, W, ROWS, INTERPRET, BLOCK_N)
    grad_col = tl.full((BLOCK_M, BLOCK_N), 0.0, tl.float32)  # per lane; lanes of one column are summed below
    for g in range(GROUPS):
        start, k_ok = _key_block(s, g, lane_row, lane_col, H, W, ROWS, BLOCK_N)
        k_tok = start + lanes
        kv_mask = k_ok[:, None] & d_ok[None, :]
        key = tl.load(k_ptr + k_tok[:, None] * sk_n + d[None, :] * sk_d, mask=kv_mask, other=0.0)
        value = tl.load(v_ptr + k_tok[:, None] * sv_n + d[None, :] * sv_d, mask=kv_mask, other=0.0)
        row_tile = _row_tile(row_ptrs, q_in_grid, g, lane_row, H, ROWS, BLOCK_M, BLOCK_N)
        scores = _dot(q, tl.trans(key), IEEE, INTERPRET) * qk_scale + row_tile * col_tile * _LOG2E
        probs = tl.exp2(scores - lse[:, None])
        probs = tl.where(q_ok[:, None] & k_ok[None, :], probs, 0.0)
        grad_probs = _dot(grad_out, tl.trans(value), IEEE, INTERPRET)
        grad_scores = probs * (grad_probs - delta[:, None])
        grad_query += _dot(grad_scores.to(key.dtype), key, IEEE, INTERPRET)
        by_row = grad_scores * col_tile
        for t in tl.static_range(ROWS):  # each grid row of this block: written once per segment
            r = g * ROWS + t
            grad_row = _sum(tl.where(lane_row[None, :] == t, by_row, 0.0), axis=1)
            tl.store(grow_ptrs + s * grow_segment_stride + r, grad_row, mask=q_in_grid & (r < H))
        grad_col += grad_scores * row_tile
    if ROWS == 1:  # lane l is column s * BLOCK_N + l
        cols = s * BLOCK_N + lane_col
        col_ok = (lane_row == 0) & (cols < W)
    else:  # the ROWS lanes of each column, summed by a product with a 0/1 matrix (exact in float32)
        one_hot = (lane_col[:, None] == lanes[None, :]) & (lane_row[:, None] < ROWS)
        grad_col = _select_dot(grad_col, one_hot, INTERPRET)
        cols = lanes
        col_ok = lanes < W
    tl.store(gcol_base + q_patch[:, None] * W + cols[None, :], grad_col, mask=q_in_grid[:, None] & col_ok[None, :])
    return grad_query


def _query_grad_kernel(
    Q, K, V, GO, ROW, COL, LSE, DELTA, GQ, GROW, GCOL, PREFIX_GK, PREFIX_GV,
    sq_b, sq_h, sq_n, sq_d, sk_b, sk_h, sk_n, sk_d, sv_b, sv_h, sv_n, sv_d, sg_b, sg_n, sg_h, sg_d,
    sgq_b, sgq_h, sgq_n, sgq_d,
    heads, N, H, W, WSEG, GROUPS, SPLITS, qk_scale, scale,
    D: tl.constexpr, NUM_PREFIX: tl.constexpr, ROWS: tl.constexpr, SEGMENTED: tl.constexpr, IEEE: tl.constexpr,
    INTERPRET: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """dQ of one block of queries, its queries' row and column profile gradients, and its share of the prefix keys'
    dK and dV.

    GROW is (SPLITS, batch * heads, P, H): segment s of a grid row writes its own partial sum (one segment: the
    gradient itself). GCOL is (batch * heads, P, W); each column is written once. PREFIX_GK and PREFIX_GV are
    (batch * heads, query blocks, NUM_PREFIX, D)."""
    pid_m = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    b = bh // heads
    h = bh % heads
    P = H * W
    q_tok, q_ok, q_patch, q_in_grid, d, d_ok, q_mask, q = _query_block(
        Q, b, h, sq_b, sq_h, sq_n, sq_d, pid_m, N, D, NUM_PREFIX, BLOCK_M, BLOCK_D
    )
    k_ptr = K + b * sk_b + h * sk_h
    v_ptr = V + b * sv_b + h * sv_h
    grad_out = tl.load(GO + b * sg_b + h * sg_h + q_tok[:, None] * sg_n + d[None, :] * sg_d, mask=q_mask, other=0.0)
    lse = tl.load(LSE + bh * N + q_tok, mask=q_ok, other=0.0) * _LOG2E
    delta = tl.load(DELTA + bh * N + q_tok, mask=q_ok, other=0.0)
    grad_query = tl.full((BLOCK_M, BLOCK_D), 0.0, tl.float32)

    prefix_base = (bh * tl.num_programs(0) + pid_m) * NUM_PREFIX * D
    for p in tl.static_range(NUM_PREFIX):  # rank-one terms, bias 0
        k_p = tl.load(k_ptr + p * sk_n + d * sk_d, mask=d_ok, other=0.0).to(tl.float32)
        v_p = tl.load(v_ptr + p * sv_n + d * sv_d, mask=d_ok, other=0.0).to(tl.float32)
        probs_p = tl.exp2(_sum(q.to(tl.float32) * k_p[None, :], axis=1) * qk_scale - lse)
        probs_p = tl.where(q_ok, probs_p, 0.0)
        grad_scores_p = probs_p * (_sum(grad_out.to(tl.float32) * v_p[None, :], axis=1) - delta)
        grad_query += grad_scores_p[:, None] * k_p[None, :]
        partial_gk = _sum(grad_scores_p[:, None] * q.to(tl.float32), axis=0) * scale
        partial_gv = _sum(probs_p[:, None] * grad_out.to(tl.float32), axis=0)
        tl.store(PREFIX_GK + prefix_base + p * D + d, partial_gk, mask=d_ok)
        tl.store(PREFIX_GV + prefix_base + p * D + d, partial_gv, mask=d_ok)

    lanes = tl.arange(0, BLOCK_N)
    lane_row = lanes // WSEG
    lane_col = lanes % WSEG
    k_ptr += NUM_PREFIX * sk_n
    v_ptr += NUM_PREFIX * sv_n
    row_ptrs = ROW + bh * P * H + q_patch * H
    col_base = COL + bh * P * W
    grow_ptrs = GROW + bh * P * H + q_patch * H
    gcol_base = GCOL + bh * P * W
    if SEGMENTED:
        for s in range(SPLITS):
            grad_query = _query_grad_segment(
                q, grad_out, lse, delta, grad_query, k_ptr, v_ptr, row_ptrs, col_base, grow_ptrs, gcol_base,
                q_ok, q_patch, q_in_grid, s, lanes, lane_row, lane_col, d, d_ok, sk_n, sk_d, sv_n, sv_d,
                H, W, GROUPS, tl.num_programs(1).to(tl.int64) * P * H, qk_scale, ROWS, IEEE, INTERPRET, BLOCK_M, BLOCK_N,
            )  # fmt: skip
    else:  # one loop: nested ones take registers
        grad_query = _query_grad_segment(
            q, grad_out, lse, delta, grad_query, k_ptr, v_ptr, row_ptrs, col_base, grow_ptrs, gcol_base,
            q_ok, q_patch, q_in_grid, 0, lanes, lane_row, lane_col, d, d_ok, sk_n, sk_d, sv_n, sv_d,
            H, W, GROUPS, 0, qk_scale, ROWS, IEEE, INTERPRET, BLOCK_M, BLOCK_N,
        )  # fmt: skip

    grad_query = grad_query * scale
    gq_ptrs = GQ + b * sgq_b + h * sgq_h + q_tok[:, None] * sgq_n + d[None, :] * sgq_d
    tl.store(gq_ptrs, grad_query.to(GQ.dtype.element_ty), mask=q_mask)


# The Gaussian's profiles


def _softplus_and_slope(x):
    """softplus(x) = log(1 + e^x) and its derivative sigmoid(x), in float32 as torch computes them (x itself above
    20). log1p is written out (log(u) * t / (u - 1) with u = 1 + t rounded) so that it stays exact for small t."""
    t = tl.exp(tl.minimum(x, 20.0))
    u = 1.0 + t
    exact = u == 1.0
    log1p = tl.where(exact, t, tl.log(u) * (t / tl.where(exact, 1.0, u - 1.0)))
    softplus = tl.where(x > 20.0, x, log1p)
    slope = tl.where(x > 20.0, 1.0, t / u)
    return softplus, slope


def _profile_terms(x_row, x_col, x_strength):
    """From a block of queries' statistics (the row and column variance maps and the strength map, before their
    activations): the sigmoids of the variance maps, softplus of the strength map and its slope."""
    softplus, slope = _softplus_and_slope(x_strength)
    return 1.0 / (1.0 + tl.exp(-x_row)), 1.0 / (1.0 + tl.exp(-x_col)), softplus, slope


def _profile_tile(TABLE, position, lines, line_ok, q_ok, denominator, offset, S, floor, clamp):
    """exp(max(t / denominator + offset, clamp)) for a tile of queries x grid lines, t the distance table's entry
    between the query's line `position` and each line; values not above `floor` are 0 (NaN stays NaN)."""
    ok = q_ok[:, None] & line_ok[None, :]
    distance = tl.load(TABLE + position[:, None] * S + lines[None, :], mask=ok, other=0.0)
    exponent = distance / denominator[:, None] + offset[:, None]
    value = tl.exp(tl.maximum(exponent, clamp))
    return tl.where(value <= floor, 0.0, value), distance, ok


def _profiles_kernel(
    Q, WEIGHT, BIAS, TABLE, ROW, COL, GQ, GW,
    sq_b, sq_h, sq_n, sq_d, sgq_b, sgq_h, sgq_n, sgq_d, heads, P, H, W, S, eps, floor, clamp,
    D: tl.constexpr, NUM_PREFIX: tl.constexpr, GRADIENT: tl.constexpr,
    BLOCK_Q: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """One block of patch queries' profiles, from the queries (batch, heads, N, D; strided), the variance and
    strength maps' float32 WEIGHT (3, D) and BIAS (3) and the (S, S) distance table: the statistics x = WEIGHT q + BIAS
    in float32, then the profiles. Forward: writes them to ROW (batch * heads, P, H) and COL (batch * heads, P, W).

    With GRADIENT: reads the profiles' gradients from ROW and COL and reduces them to the statistics' gradient, for t
    the distances, s = sigmoid and den = s(x) + eps:
        d x_row = -s'(x_row) / den_row^2 * sum_r drow * row * t,   d x_col likewise over the columns,
        d x_strength = softplus'(x) / softplus(x) * sum_r drow * row   (0 where softplus(x) <= floor);
    then writes the queries' gradient WEIGHT^T dx to GQ (strided like Q; the prefix rows are left to the caller) and
    this block's share of the weight's and bias's gradients, dx q^T and dx, to GW (batch * heads, blocks, 3, D + 1)."""
    pid = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    b = bh // heads
    h = bh % heads
    q = pid * BLOCK_Q + tl.arange(0, BLOCK_Q)
    q_ok = q < P
    d = tl.arange(0, BLOCK_D)
    d_ok = _head_mask(d, D, BLOCK_D)
    q_mask = q_ok[:, None] & d_ok[None, :]
    queries = tl.load(
        Q + b * sq_b + h * sq_h + (NUM_PREFIX + q)[:, None] * sq_n + d[None, :] * sq_d, mask=q_mask, other=0.0
    )
    queries = queries.to(tl.float32)
    weight_row = tl.load(WEIGHT + d, mask=d_ok, other=0.0)
    weight_col = tl.load(WEIGHT + D + d, mask=d_ok, other=0.0)
    weight_strength = tl.load(WEIGHT + 2 * D + d, mask=d_ok, other=0.0)
    x_row = _sum(queries * weight_row[None, :], axis=1) + tl.load(BIAS)
    x_col = _sum(queries * weight_col[None, :], axis=1) + tl.load(BIAS + 1)
    x_strength = _sum(queries * weight_strength[None, :], axis=1) + tl.load(BIAS + 2)
    sigmoid_row, sigmoid_col, softplus, slope = _profile_terms(x_row, x_col, x_strength)
    row_denominator = sigmoid_row + eps
    col_denominator = sigmoid_col + eps
    log_strength = tl.log(tl.maximum(softplus, floor))  # alpha's share of the row profiles' exponent
    no_offset = tl.full((BLOCK_Q,), 0.0, tl.float32)
    row_sum = tl.full((BLOCK_Q,), 0.0, tl.float32)
    row_weighted = tl.full((BLOCK_Q,), 0.0, tl.float32)
    col_weighted = tl.full((BLOCK_Q,), 0.0, tl.float32)
    for start in range(0, H, BLOCK_S):
        lines = start + tl.arange(0, BLOCK_S)
        row, distance, ok = _profile_tile(
            TABLE, q // W, lines, lines < H, q_ok, row_denominator, log_strength, S, floor, clamp
        )
        row_ptrs = ROW + (bh * P + q[:, None]) * H + lines[None, :]
        if GRADIENT:
            grad = tl.load(row_ptrs, mask=ok, other=0.0) * row
            row_sum += _sum(grad, axis=1)
            row_weighted += _sum(grad * distance, axis=1)
        else:
            tl.store(row_ptrs, row, mask=ok)
    for start in range(0, W, BLOCK_S):
        lines = start + tl.arange(0, BLOCK_S)
        col, distance, ok = _profile_tile(
            TABLE, q % W, lines, lines < W, q_ok, col_denominator, no_offset, S, floor, clamp
        )
        col_ptrs = COL + (bh * P + q[:, None]) * W + lines[None, :]
        if GRADIENT:
            col_weighted += _sum(tl.load(col_ptrs, mask=ok, other=0.0) * col * distance, axis=1)
        else:
            tl.store(col_ptrs, col, mask=ok)
    if GRADIENT:  # rows past P have all-zero gradients: their loads were masked
        grad_row = -row_weighted * sigmoid_row * (1.0 - sigmoid_row) / (row_denominator * row_denominator)
        grad_col = -col_weighted * sigmoid_col * (1.0 - sigmoid_col) / (col_denominator * col_denominator)
        grad_strength = tl.where(softplus > floor, row_sum * slope / softplus, 0.0)
        grad_queries = grad_row[:, None] * weight_row[None, :] + grad_col[:, None] * weight_col[None, :]
        grad_queries += grad_strength[:, None] * weight_strength[None, :]
        gq_ptrs = GQ + b * sgq_b + h * sgq_h + (NUM_PREFIX + q)[:, None] * sgq_n + d[None, :] * sgq_d
        tl.store(gq_ptrs, grad_queries.to(GQ.dtype.element_ty), mask=q_mask)
        partial = GW + (bh * tl.num_programs(0) + pid) * 3 * (D + 1)
        tl.store(partial + d, _sum(grad_row[:, None] * queries, axis=0), mask=d_ok)
        tl.store(partial + (D + 1) + d, _sum(grad_col[:, None] * queries, axis=0), mask=d_ok)
        tl.store(partial + 2 * (D + 1) + d, _sum(grad_strength[:, None] * queries, axis=0), mask=d_ok)
        tl.store(partial + D, _sum(grad_row, axis=0))
        tl.store(partial + 2 * D + 1, _sum(grad_col, axis=0))
        tl.store(partial + 3 * D + 2, _sum(grad_strength, axis=0))


_HELPERS = (
    "_add",
    "_larger",
    "_sum",
    "_max",
    "_dot",
    "_head_mask",
    "_query_block",
    "_key_block",
    "_row_tile",
    "_select_dot",
    "_spread_cols",
    "_forward_block",
    "_query_grad_segment",
    "_unit_in_last_place",
    "_rounding_error_code",
    "_restore_rounded",
    "_softplus_and_slope",
    "_profile_terms",
    "_profile_tile",
)
_KERNELS = (
    "_forward_kernel",
    "_delta_kernel",
    "_key_value_grad_kernel",
    "_query_grad_kernel",
    "_profiles_kernel",
)
_build_lock = threading.Lock()


@functools.cache
def _build() -> SimpleNamespace:
    """Imports Triton and wraps the kernels, once. The helpers are replaced by their Triton functions in this
    module's namespace, where the kernels look them up by name (compiled or interpreted)."""
    import triton
    import triton.language as language

    global tl, _LOG2E, _LN2, _SUM, _MAX
    tl = language
    _LOG2E, _LN2 = language.constexpr(LOG2E), language.constexpr(LN2)
    namespace = globals()
    for name in _HELPERS:
        namespace[name] = triton.jit(namespace[name])
    # The kernels avoid Triton's library functions (tl.sum, tl.max, tl.zeros): those are wrapped once, when Triton
    # is imported, and cannot run under the interpreter if it was switched on later (torch._dynamo imports Triton,
    # so that is common in tests). Reductions combine with Triton's own functions where they exist, which the
    # interpreter recognizes and runs in NumPy; else with ours (correct, slow when interpreted).
    standard = language.standard
    _SUM = getattr(standard, "_sum_combine", namespace["_add"])
    _MAX = getattr(standard, "_elementwise_max", namespace["_larger"])
    kernels = {name.strip("_"): triton.jit(namespace[name]) for name in _KERNELS}
    return SimpleNamespace(**kernels, interpret=interpreting())


def _kernels() -> SimpleNamespace:
    with _build_lock:
        return _build()


# Launch configuration


def _config(dim: int, backward: bool, dtype: torch.dtype) -> tuple[int, int, int, int]:
    """(queries per block, keys per block, warps, pipeline stages). Chosen without a GPU to time them, from what
    compiles with the fewest register spills for sm_90 at head size 64 (`benchmarks/bench_triton.py --compile-only`;
    `--sweep` compares block sizes on a GPU): 8 warps, 64 x 64 blocks in bfloat16 and float16 forward, and 32 queries
    per block in their backward passes, which hold the most tiles. Float32, whose exact products run on CUDA cores
    with tiles twice the size, takes half the queries per block (at 64 / 32 it spills ~800 bytes a thread)."""
    if FORCED_BLOCKS is not None:
        block_m, block_n = FORCED_BLOCKS
    elif dtype == torch.float32:
        block_m, block_n = (16, 64) if backward else (32, 64)
    else:
        block_m, block_n = (32, 64) if backward else (64, 64)
    return block_m, block_n, 8, 2


def _layout(height: int, width: int, block_n: int) -> tuple[int, int, int, int]:
    """How key blocks cover the grid: (grid rows per block, segments per grid row, lanes per row segment, row
    groups). Whole rows when W fits in a block, else each row cut into segments of `block_n` columns."""
    if width > block_n:
        return 1, -(-width // block_n), block_n, height
    rows = min(block_n // width, MAX_ROWS_PER_BLOCK)
    return rows, 1, width, -(-height // rows)


def _check(query, key, value, row, col, num_prefix: int) -> None:
    """Clear errors for what the kernels do not handle (shapes, dtypes, devices)."""
    if query.dim() != 4 or key.shape != query.shape or value.shape != query.shape:
        raise ValueError(
            f"query, key and value must have one shape (batch, heads, N, head_dim), got {tuple(query.shape)}, "
            f"{tuple(key.shape)}, {tuple(value.shape)}"
        )
    if query.dtype not in DTYPES or key.dtype != query.dtype or value.dtype != query.dtype:
        raise ValueError(
            f"query, key and value must share one dtype of {DTYPES}, got {query.dtype}, {key.dtype}, {value.dtype}"
        )
    batch, heads, seq_len, dim = query.shape
    if not 1 <= dim <= MAX_HEAD_DIM:
        raise ValueError(f"head sizes up to {MAX_HEAD_DIM} are supported, got {dim}")
    if batch * heads > MAX_SLICES:
        raise ValueError(
            f"batch x heads = {batch * heads} exceeds the {MAX_SLICES} (batch, head) slices one call can launch: "
            "split the batch"
        )
    if not 0 <= num_prefix <= MAX_PREFIX:
        raise ValueError(f"num_prefix must be between 0 and {MAX_PREFIX}, got {num_prefix}")
    if row.dim() != 4 or col.dim() != 4 or row.dtype != torch.float32 or col.dtype != torch.float32:
        raise ValueError(
            "the row and column profiles must be float32 tensors (batch, heads, P, H) and (batch, heads, P, W)"
        )
    height, width = row.shape[-1], col.shape[-1]
    patches = seq_len - num_prefix
    expected_row, expected_col = (batch, heads, patches, height), (batch, heads, patches, width)
    if height * width != patches or tuple(row.shape) != expected_row or tuple(col.shape) != expected_col:
        raise ValueError(
            f"profiles {tuple(row.shape)} and {tuple(col.shape)} do not fit {seq_len} tokens with {num_prefix} prefix "
            f"tokens: expected (batch, heads, P, H) and (batch, heads, P, W) with H * W = P = N - num_prefix"
        )
    devices = {t.device for t in (query, key, value, row, col)}
    if len(devices) != 1:
        raise ValueError(f"all inputs must be on one device, got {sorted(map(str, devices))}")
    if query.device.type not in ("cuda", "cpu"):
        raise ValueError(f"LocAtViT's Triton kernel runs CUDA tensors, not {query.device.type}")


def _runnable(device: torch.device) -> SimpleNamespace:
    """The kernels, after checking that they can run tensors on `device`."""
    if not _triton_importable():
        raise RuntimeError(UNAVAILABLE)
    kernels = _kernels()
    if device.type == "cpu" and not kernels.interpret:
        raise RuntimeError(
            "LocAtViT's Triton kernel got CPU tensors, which only Triton's interpreter runs: set TRITON_INTERPRET=1 "
            "before the kernel's first call (slow; for tests), or use the 'cpu_fused' or 'sdpa' backend on CPU."
        )
    return kernels


def _device_guard(device: torch.device):
    """Kernels launch on the current CUDA device: make it the tensors' one."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def _common(query, row, col, num_prefix: int, backward: bool) -> SimpleNamespace:
    """Launch parameters shared by the kernels of one call."""
    batch, heads, seq_len, dim = query.shape
    height, width = row.shape[-1], col.shape[-1]
    block_m, block_n, warps, stages = _config(dim, backward, query.dtype)
    rows, splits, segment, groups = _layout(height, width, block_n)
    return SimpleNamespace(
        batch=batch, heads=heads, seq_len=seq_len, dim=dim, height=height, width=width,
        block_m=block_m, block_n=block_n, block_d=max(16, _next_power_of_2(dim)), warps=warps, stages=stages,
        rows=rows, splits=splits, segment=segment, groups=groups,
        ieee=query.dtype == torch.float32, query_blocks=-(-seq_len // block_m),
    )  # fmt: skip


def _next_power_of_2(value: int) -> int:
    return 1 << (value - 1).bit_length()


# The custom operators


def _attention_impl(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    row: torch.Tensor,
    col: torch.Tensor,
    scale: float,
    num_prefix: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(output (batch, N, heads, D), log-sum-exp (batch, heads, N) in float32, the output's rounding error)."""
    _check(query, key, value, row, col, num_prefix)
    kernels = _runnable(query.device)
    row, col = row.contiguous(), col.contiguous()
    c = _common(query, row, col, num_prefix, backward=False)
    output, logsumexp, residual = _attention_fake(query, key, value, row, col, scale, num_prefix)
    with _device_guard(query.device):
        kernels.forward_kernel[(c.query_blocks, c.batch * c.heads)](
            query, key, value, row, col, output, logsumexp, residual if residual.numel() else output,
            *query.stride(), *key.stride(), *value.stride(), *output.stride(),
            c.heads, c.seq_len, c.height, c.width, c.segment, c.groups, c.splits, scale * LOG2E,
            D=c.dim, NUM_PREFIX=num_prefix, ROWS=c.rows, SEGMENTED=c.splits > 1, IEEE=c.ieee,
            STORE_RESIDUAL=residual.numel() > 0, INTERPRET=kernels.interpret,
            BLOCK_M=c.block_m, BLOCK_N=c.block_n, BLOCK_D=c.block_d, num_warps=c.warps, num_stages=c.stages,
        )  # fmt: skip
    return output, logsumexp, residual


def _attention_fake(query, key, value, row, col, scale, num_prefix):
    """The outputs' layouts; the residual (the output's rounding error, int8 codes) is empty in float32, whose output
    is kept exactly."""
    batch, heads, seq_len, dim = query.shape
    output = _token_major(query)
    logsumexp = query.new_empty(batch, heads, seq_len, dtype=torch.float32)
    residual = query.new_empty(0) if query.dtype == torch.float32 else _token_major(query).to(torch.int8)
    return output, logsumexp, residual


def _attention_backward_impl(
    grad_output: torch.Tensor,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    row: torch.Tensor,
    col: torch.Tensor,
    output: torch.Tensor,
    logsumexp: torch.Tensor,
    residual: torch.Tensor,
    scale: float,
    num_prefix: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of query, key and value ((batch, heads, N, D) views of token-major tensors), row and column."""
    _check(query, key, value, row, col, num_prefix)
    kernels = _runnable(query.device)
    row, col, logsumexp = row.contiguous(), col.contiguous(), logsumexp.contiguous()
    has_residual = residual.numel() > 0
    if has_residual:  # the delta kernel reads both with one set of strides (no copies: both are contiguous)
        output, residual = output.contiguous(), residual.contiguous()
    c = _common(query, row, col, num_prefix, backward=True)
    slices = c.batch * c.heads
    grad_query, grad_key, grad_value = (_token_major(query).transpose(1, 2) for _ in range(3))
    grad_row = torch.empty_like(row)
    grad_col = torch.empty_like(col)
    # One segment: the kernel writes grad_row itself; several: one partial sum each, added below.
    row_parts = grad_row.unsqueeze(0) if c.splits == 1 else row.new_empty(c.splits, *row.shape)
    # The prefix keys' dK and dV, one partial sum per block of queries (at least one element: no null pointers).
    prefix_shape = (slices, c.query_blocks, max(num_prefix, 1), c.dim)
    prefix_parts = [torch.empty(prefix_shape, dtype=torch.float32, device=query.device) for _ in range(2)]
    delta = torch.empty(c.batch, c.heads, c.seq_len, dtype=torch.float32, device=query.device)
    meta = dict(D=c.dim, NUM_PREFIX=num_prefix, ROWS=c.rows, IEEE=c.ieee, INTERPRET=kernels.interpret)
    blocks = dict(BLOCK_M=c.block_m, BLOCK_N=c.block_n, BLOCK_D=c.block_d, num_warps=c.warps, num_stages=c.stages)
    inputs = (query, key, value, grad_output, row, col, logsumexp, delta)
    input_strides = (*query.stride(), *key.stride(), *value.stride(), *grad_output.stride())
    grid_args = (c.heads, c.seq_len, c.height, c.width, c.segment, c.groups)
    with _device_guard(query.device):
        kernels.delta_kernel[(c.query_blocks, slices)](
            grad_output, output, residual if has_residual else output, delta,
            *grad_output.stride(), *output.stride(), c.heads, c.seq_len,
            D=c.dim, HAS_RESIDUAL=has_residual, BLOCK_M=c.block_m, BLOCK_D=c.block_d, num_warps=c.warps,
        )  # fmt: skip
        kernels.key_value_grad_kernel[(c.groups * c.splits, slices)](
            *inputs, grad_key, grad_value, *input_strides, *grad_key.stride(), *grad_value.stride(),
            *grid_args, scale * LOG2E, scale, **meta, **blocks,
        )  # fmt: skip
        kernels.query_grad_kernel[(c.query_blocks, slices)](
            *inputs, grad_query, row_parts, grad_col, *prefix_parts, *input_strides, *grad_query.stride(),
            *grid_args, c.splits, scale * LOG2E, scale, SEGMENTED=c.splits > 1, **meta, **blocks,
        )  # fmt: skip
    if c.splits > 1:
        torch.sum(row_parts, dim=0, out=grad_row)
    if num_prefix:
        shape = (c.batch, c.heads, num_prefix, c.dim)
        grad_key[:, :, :num_prefix] = prefix_parts[0].sum(1).view(shape)
        grad_value[:, :, :num_prefix] = prefix_parts[1].sum(1).view(shape)
    return grad_query, grad_key, grad_value, grad_row, grad_col


def _token_major(query: torch.Tensor) -> torch.Tensor:
    """A new (batch, N, heads, dim) tensor for a (batch, heads, N, dim) query."""
    batch, heads, seq_len, dim = query.shape
    return query.new_empty(batch, seq_len, heads, dim)


def _attention_backward_fake(grad_output, query, key, value, row, col, output, logsumexp, residual, scale, num_prefix):
    grad_query, grad_key, grad_value = (_token_major(query).transpose(1, 2) for _ in range(3))
    return grad_query, grad_key, grad_value, torch.empty_like(row), torch.empty_like(col)


def _setup_context(ctx, inputs, output) -> None:
    """Keeps the inputs, the output, one log-sum-exp per query and the output's rounding error (auxiliary outputs
    without a gradient). That error makes delta = rowsum(dO * O) exact: from the rounded bfloat16 output, delta is off
    by one rounding shared by all keys of a query, which does not average out in the profiles' gradients (3x eager's
    error in bfloat16). It costs one byte per output element (`_rounding_error_code`: 1/127 of a last place is far
    finer than needed); recomputing O would cost a forward pass."""
    query, key, value, row, col, scale, num_prefix = inputs
    attended, logsumexp, residual = output
    ctx.mark_non_differentiable(logsumexp, residual)
    ctx.set_materialize_grads(False)  # no zero-filled gradients for the auxiliary outputs
    ctx.save_for_backward(query, key, value, row, col, attended, logsumexp, residual)
    ctx.scale, ctx.num_prefix = scale, num_prefix


def _backward(ctx, grad_output, _grad_logsumexp, _grad_residual):
    if grad_output is None:  # the output itself took no part in the loss
        return (None,) * 7
    grads = _OPERATORS.backward(grad_output, *ctx.saved_tensors, ctx.scale, ctx.num_prefix)
    return *(grad if needed else None for grad, needed in zip(grads, ctx.needs_input_grad)), None, None


def _refuse_double_backward(ctx, *grads):
    raise RuntimeError(
        "LocAtViT's Triton attention kernel is differentiable once: its backward has no derivative, so a double "
        "backward (a gradient of its gradients, e.g. through `create_graph=True`) is not supported."
    )


def _check_profiles(query, weight, bias, distances, height: int, width: int) -> None:
    """Clear errors for profile inputs the kernel does not handle."""
    if query.dim() != 4 or query.dtype not in DTYPES or not 1 <= query.shape[-1] <= MAX_HEAD_DIM:
        raise ValueError(
            f"query must be (batch, heads, N, head_dim) in one of {DTYPES} with a head size up to {MAX_HEAD_DIM}, "
            f"got {tuple(query.shape)} in {query.dtype}"
        )
    if not 0 <= query.shape[2] - height * width <= MAX_PREFIX:
        raise ValueError(
            f"{query.shape[2]} tokens do not fit a {height} x {width} grid with at most {MAX_PREFIX} prefix tokens"
        )
    if weight.shape != (3, query.shape[-1]) or bias.shape != (3,):
        raise ValueError(
            f"the variance and strength maps' weight and bias must be (3, {query.shape[-1]}) and (3,), got "
            f"{tuple(weight.shape)} and {tuple(bias.shape)}"
        )
    side = max(height, width)
    if distances.shape != (side, side):
        raise ValueError(f"the distance table must be ({side}, {side}), got {tuple(distances.shape)}")
    if {weight.dtype, bias.dtype, distances.dtype} != {torch.float32}:
        raise ValueError(
            f"weight, bias and distances must be float32, got {weight.dtype}, {bias.dtype} and {distances.dtype}"
        )
    devices = {t.device for t in (query, weight, bias, distances)}
    if len(devices) != 1 or query.device.type not in ("cuda", "cpu"):
        raise ValueError(f"all inputs must be on one CUDA device, got {sorted(map(str, devices))}")
    if query.shape[0] * query.shape[1] > MAX_SLICES:
        raise ValueError(
            f"batch x heads exceeds the {MAX_SLICES} (batch, head) slices one call can launch: split the batch"
        )


# The profile kernel's queries per program and grid lines per step, warps and pipeline stages: at most 110
# registers and no spills on sm_80 and sm_90 at head size 64 (`bench_triton.py --compile-only`; with 64 queries and
# 4 warps the gradient takes 255 and spills).
PROFILE_BLOCKS = (32, 16)
PROFILE_LAUNCH = (8, 1)


def _profiles_launch(kernel, query, distances, height: int, width: int, gradient: bool):
    """The kernel launcher for `query`, and its arguments after the strides and before the constants' keywords."""
    batch, heads, seq_len, dim = query.shape
    block_q, block_s = PROFILE_BLOCKS
    grid = (-(-(height * width) // block_q), batch * heads)
    meta = dict(
        D=dim, NUM_PREFIX=seq_len - height * width, GRADIENT=gradient, BLOCK_Q=block_q, BLOCK_S=block_s,
        BLOCK_D=max(16, _next_power_of_2(dim)), num_warps=PROFILE_LAUNCH[0], num_stages=PROFILE_LAUNCH[1],
    )  # fmt: skip
    return kernel[grid], (heads, height * width, height, width, distances.shape[0]), meta


def _profiles_impl(
    query: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, distances: torch.Tensor,
    eps: float, floor: float, clamp: float, height: int, width: int,
) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """Row (batch, heads, P, H) and column (batch, heads, P, W) profiles of the patch queries."""
    _check_profiles(query, weight, bias, distances, height, width)
    kernels = _runnable(query.device)
    weight, bias, distances = weight.contiguous(), bias.contiguous(), distances.contiguous()
    row, col = _profiles_fake(query, weight, bias, distances, eps, floor, clamp, height, width)
    launch, sizes, meta = _profiles_launch(kernels.profiles_kernel, query, distances, height, width, gradient=False)
    with _device_guard(query.device):  # GQ and GW unused: any pointers
        launch(
            query, weight, bias, distances, row, col, query, row, *query.stride(), *query.stride(), *sizes,
            eps, floor, clamp, **meta,
        )  # fmt: skip
    return row, col


def _profiles_fake(query, weight, bias, distances, eps, floor, clamp, height, width):
    batch, heads = query.shape[:2]
    shape = (batch, heads, height * width)
    return query.new_empty(*shape, height, dtype=torch.float32), query.new_empty(*shape, width, dtype=torch.float32)


def _profiles_backward_impl(
    grad_row: torch.Tensor, grad_col: torch.Tensor, query: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
    distances: torch.Tensor, eps: float, floor: float, clamp: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    """The gradients of the query (a (batch, heads, N, D) view of a token-major tensor, 0 at the prefix tokens), the
    weight and the bias, the profiles computed again."""
    height, width = grad_row.shape[-1], grad_col.shape[-1]
    _check_profiles(query, weight, bias, distances, height, width)
    kernels = _runnable(query.device)
    weight, bias, distances = weight.contiguous(), bias.contiguous(), distances.contiguous()
    grad_row, grad_col = grad_row.float().contiguous(), grad_col.float().contiguous()
    grad_query, grad_weight, grad_bias = _profiles_backward_fake(
        grad_row, grad_col, query, weight, bias, distances, eps, floor, clamp
    )
    launch, sizes, meta = _profiles_launch(kernels.profiles_kernel, query, distances, height, width, gradient=True)
    batch, heads, _, dim = query.shape
    blocks = -(-(height * width) // PROFILE_BLOCKS[0])
    partial = torch.empty(batch * heads * blocks, 3, dim + 1, dtype=torch.float32, device=query.device)
    with _device_guard(query.device):
        launch(
            query, weight, bias, distances, grad_row, grad_col, grad_query, partial, *query.stride(),
            *grad_query.stride(), *sizes, eps, floor, clamp, **meta,
        )  # fmt: skip
    grad_query[:, :, : meta["NUM_PREFIX"]] = 0
    totals = partial.sum(0)
    grad_weight.copy_(totals[:, :dim])
    grad_bias.copy_(totals[:, dim])
    return grad_query, grad_weight, grad_bias


def _profiles_backward_fake(grad_row, grad_col, query, weight, bias, distances, eps, floor, clamp):
    return _token_major(query).transpose(1, 2), torch.empty_like(weight), torch.empty_like(bias)


def _profiles_setup_context(ctx, inputs, output) -> None:
    """Keeps the inputs (the queries, which the attention keeps too): the backward computes the profiles again."""
    query, weight, bias, distances, eps, floor, clamp, height, width = inputs
    ctx.save_for_backward(query, weight, bias, distances)
    ctx.constants = (eps, floor, clamp)
    ctx.grid = (height, width)


def _profiles_backward(ctx, grad_row, grad_col):
    query, weight, bias, distances = ctx.saved_tensors
    batch, heads = query.shape[:2]
    patches = ctx.grid[0] * ctx.grid[1]
    grad_row, grad_col = (
        torch.zeros(batch, heads, patches, lines, device=query.device) if grad is None else grad
        for grad, lines in zip((grad_row, grad_col), ctx.grid)
    )
    grads = _OPERATORS.profiles_backward(grad_row, grad_col, query, weight, bias, distances, *ctx.constants)
    return *(grad if needed else None for grad, needed in zip(grads, ctx.needs_input_grad)), *([None] * 6)


def _define_operators() -> SimpleNamespace:
    """`torch.ops.locatvit.triton_gaussian_attention`, `...triton_gaussian_profiles` and their backward operators,
    for CUDA tensors and (for Triton's interpreter) CPU tensors; defining them again (a reloaded module, a remote-code
    copy) replaces them."""
    definitions = dict(
        forward=("triton_gaussian_attention", _attention_impl, _attention_fake),
        backward=("triton_gaussian_attention_backward", _attention_backward_impl, _attention_backward_fake),
        profiles=("triton_gaussian_profiles", _profiles_impl, _profiles_fake),
        profiles_backward=("triton_gaussian_profiles_backward", _profiles_backward_impl, _profiles_backward_fake),
    )
    operators = SimpleNamespace()
    for key, (name, implementation, fake) in definitions.items():
        operator = torch.library.custom_op(
            f"locatvit::{name}", implementation, mutates_args=(), device_types=("cuda", "cpu")
        )
        operator.register_fake(fake)
        setattr(operators, key, getattr(torch.ops.locatvit, name).default)
    torch.library.register_autograd(operators.forward, _backward, setup_context=_setup_context)
    torch.library.register_autograd(operators.backward, _refuse_double_backward)
    torch.library.register_autograd(operators.profiles, _profiles_backward, setup_context=_profiles_setup_context)
    torch.library.register_autograd(operators.profiles_backward, _refuse_double_backward)
    return operators


_OPERATORS = _define_operators()


def triton_gaussian_attention(query, key, value, row, col, scale: float, num_prefix: int) -> torch.Tensor:
    """softmax(q k^T * scale + B) v for (batch, heads, N, D) query, key and value (float32, bfloat16 or float16)
    and the separable bias B of the float32 row (batch, heads, P, H) and column (batch, heads, P, W) profiles:
    (batch, N, heads, D), the token-major layout the output projection reads, with gradients for all five inputs.
    Profiles in another dtype are converted to float32 (with their gradient)."""
    row = row.float().contiguous()
    col = col.float().contiguous()
    return _OPERATORS.forward(query, key, value, row, col, float(scale), int(num_prefix))[0]


def triton_gaussian_profiles(
    query, weight, bias, distances, eps: float, floor: float, clamp: float, height: int, width: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Row (batch, heads, P, H) and column (batch, heads, P, W) profiles of an H x W grid's P = H * W patch queries
    (the last P of `query`'s (batch, heads, N, D); float32, bfloat16 or float16) from the variance and strength maps'
    float32 `weight` (3, D) and `bias` (3) (statistics = weight q + bias, computed in float32 inside the kernel) and
    the (S, S) distance table, S = max(H, W) (`attention_locatvit.grid_distance_table`): the values of
    `LocAtViTGaussianBias.profiles`, in one kernel launch, and one more for the gradients of the queries, weight and
    bias (the profiles are computed again)."""
    return _OPERATORS.profiles(
        query, weight, bias, distances, float(eps), float(floor), float(clamp), int(height), int(width)
    )
