"""A fused CPU kernel for inference: attention with the separable Gaussian bias evaluated inside it.

With stock kernels, the bias is written as a (batch, heads, N, N) float mask that `sdpa` then reads: at 512 px that is
25 MB a layer for ViT-Tiny, written and read once each, and it costs a third more than the attention itself. Here each
block of queries gets its scores from one matrix product, the bias is added from the (H + W) profile values of each
query while the scores are in the core's cache, the softmax follows in the same pass, and a second product writes the
output straight into the token-major layout the output projection reads. Nothing of size N x N leaves the cache.

Compiled on first use with `torch.utils.cpp_extension` (needs a C++ compiler and ninja, about 30 s, cached per
machine) for x86 CPUs with AVX2 or AVX-512; elsewhere, or if the build fails, or with `LOCATVIT_CPU_KERNEL=0` in the
environment, the model writes the mask for `sdpa` instead (same results within float32 rounding).
"""

import functools
import logging
import os
import threading

import torch

logger = logging.getLogger(__name__)

KERNEL_SOURCE = r"""
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <dlfcn.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

namespace {

using Vec = at::vec::Vectorized<float>;
using Sgemm = void (*)(const char*, const char*, const int*, const int*, const int*, const float*, const float*,
                       const int*, const float*, const int*, const float*, float*, const int*);

// The BLAS PyTorch is linked with (MKL or OpenBLAS export the Fortran symbol), looked up at run time.
Sgemm blas_sgemm() {
  static const Sgemm sgemm = reinterpret_cast<Sgemm>(dlsym(RTLD_DEFAULT, "sgemm_"));
  return sgemm;
}

bool has_blas() { return blas_sgemm() != nullptr; }

// Row-major c (m x n, ldc) = alpha * a (m x k, lda) * op(b): op(b) = b^T for b (n x k, ldb) if b_transposed, else
// b (k x n, ldb). BLAS is column-major, so it computes c^T = op(b)^T a^T.
void gemm(int64_t m, int64_t n, int64_t k, float alpha, const float* a, int64_t lda, const float* b, int64_t ldb,
          bool b_transposed, float* c, int64_t ldc) {
  const int cm = n, cn = m, ck = k, clda = ldb, cldb = lda, cldc = ldc;
  const float zero = 0.f;
  blas_sgemm()(b_transposed ? "T" : "N", "N", &cm, &cn, &ck, &alpha, b, &clda, a, &cldb, &zero, c, &cldc);
}

// One query's scores over all n keys, in place: adds the Gaussian bias row[r] * col[c] to the patch keys (those
// after the prefix, grid row r, column c; `row` null for prefix queries), then exponentiates against the row's
// maximum. Returns the sum of the exponentials (the softmax's denominator).
float add_bias_and_exponentiate(float* scores, int64_t n, int64_t prefix, const float* row, int64_t row_stride,
                                const float* col, int64_t height, int64_t width) {
  if (row != nullptr) {
    for (int64_t r = 0; r < height; ++r) {  // grid rows are short (14 at 224 px): partial vectors for the rest
      float* segment = scores + prefix + r * width;
      const Vec row_value(row[r * row_stride]);
      for (int64_t c = 0; c < width; c += Vec::size()) {
        const int64_t count = std::min<int64_t>(Vec::size(), width - c);
        at::vec::fmadd(row_value, Vec::loadu(col + c, count), Vec::loadu(segment + c, count)).store(segment + c, count);
      }
    }
  }
  const float max = at::vec::reduce_all<float>([](Vec& x, Vec& y) { return at::vec::maximum(x, y); }, scores, n);
  const Vec shift(max);
  Vec sum(0.f);
  for (int64_t j = 0; j < n; j += Vec::size()) {
    const int64_t count = std::min<int64_t>(Vec::size(), n - j);
    const Vec e = (Vec::loadu(scores + j, count) - shift).exp_u20();
    e.store(scores + j, count);
    sum += count == Vec::size() ? e : Vec::set(Vec(0.f), e, count);
  }
  return at::vec::vec_reduce_all<float>([](Vec& x, Vec& y) { return x + y; }, sum);
}

// softmax(q k^T * scale + B) v for query, key, value (batch, heads, N, dim), with the bias of patch query i and
// patch key (r, c) B = row[i, r] * col[i, c] (row: (batch, heads, P, H), col: (batch, heads, P, W), P = H * W =
// N - prefix) and 0 for the prefix tokens. Returns (batch, N, heads, dim).
at::Tensor gaussian_attention(const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
                              const at::Tensor& row, const at::Tensor& col, double scale, int64_t prefix) {
  for (const auto* t : {&query, &key, &value, &row, &col}) {
    TORCH_CHECK(t->dim() == 4 && t->scalar_type() == at::kFloat && t->device().is_cpu(), "float32 CPU tensors");
  }
  TORCH_CHECK(query.stride(3) == 1 && key.stride(3) == 1 && value.stride(3) == 1 && col.stride(3) == 1,
              "query, key, value and col need a unit stride in their last dimension");
  const int64_t batch = query.size(0), heads = query.size(1), seq = query.size(2), dim = query.size(3);
  const int64_t height = row.size(3), width = col.size(3);
  TORCH_CHECK(height * width + prefix == seq && row.size(2) == seq - prefix && col.size(2) == seq - prefix,
              "the profiles do not match the sequence");
  auto output = at::empty({batch, seq, heads, dim}, query.options());
  // Blocks of queries whose scores (block x N floats) stay in the core's cache (512 KB), but of at least 128
  // queries, below which the products lose their efficiency (measured at 1024 px); and at least four tasks a
  // thread, so that small batches still use every thread.
  const int64_t cached_rows = std::max<int64_t>(131072 / seq, 128);
  const int64_t tasks_wanted = 4 * at::get_num_threads();
  int64_t blocks = std::max<int64_t>((seq + cached_rows - 1) / cached_rows,
                                     (tasks_wanted + batch * heads - 1) / (batch * heads));
  blocks = std::min(blocks, seq);
  const int64_t block = (seq + blocks - 1) / blocks;
  blocks = (seq + block - 1) / block;
  const float* q = query.data_ptr<float>();
  const float* k = key.data_ptr<float>();
  const float* v = value.data_ptr<float>();
  const float* rows = row.data_ptr<float>();
  const float* cols = col.data_ptr<float>();
  float* out = output.data_ptr<float>();
  const int64_t ld = (seq + 15) / 16 * 16;  // rows of scores on whole cache lines
  at::parallel_for(0, batch * heads * blocks, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scores(block * ld);
    std::vector<float> sums(block);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / (heads * blocks), h = task / blocks % heads, start = task % blocks * block;
      const int64_t len = std::min(block, seq - start);
      const float* qb = q + b * query.stride(0) + h * query.stride(1) + start * query.stride(2);
      const float* kb = k + b * key.stride(0) + h * key.stride(1);
      const float* vb = v + b * value.stride(0) + h * value.stride(1);
      gemm(len, seq, dim, static_cast<float>(scale), qb, query.stride(2), kb, key.stride(2), true, scores.data(), ld);
      for (int64_t i = 0; i < len; ++i) {
        const int64_t patch = start + i - prefix;  // negative for prefix queries
        const float* r = patch < 0 ? nullptr : rows + b * row.stride(0) + h * row.stride(1) + patch * row.stride(2);
        const float* c = patch < 0 ? nullptr : cols + b * col.stride(0) + h * col.stride(1) + patch * col.stride(2);
        sums[i] = add_bias_and_exponentiate(scores.data() + i * ld, seq, prefix, r, row.stride(3), c, height, width);
      }
      float* ob = out + (b * seq + start) * heads * dim + h * dim;
      gemm(len, dim, seq, 1.f, scores.data(), ld, vb, value.stride(2), false, ob, heads * dim);
      for (int64_t i = 0; i < len; ++i) {  // the softmax's division, on the output's dim values instead of N
        const Vec inverse(1.f / sums[i]);
        float* o = ob + i * heads * dim;
        int64_t d = 0;
        for (; d + Vec::size() <= dim; d += Vec::size()) (Vec::loadu(o + d) * inverse).store(o + d);
        for (; d < dim; ++d) o[d] /= sums[i];
      }
    }
  });
  return output;
}

}  // namespace

TORCH_LIBRARY(locatvit_cpu, m) {
  m.def("has_blas() -> bool");
  m.impl("has_blas", c10::DispatchKey::CompositeExplicitAutograd, TORCH_FN(has_blas));
  m.def("gaussian_attention(Tensor query, Tensor key, Tensor value, Tensor row, Tensor col, float scale, "
        "int prefix) -> Tensor");
  m.impl("gaussian_attention", c10::DispatchKey::CPU, TORCH_FN(gaussian_attention));
}
"""

# The instruction sets the kernel is built for, with PyTorch's own compiler flags for each (ATen's vectorized types
# pick their implementation from CPU_CAPABILITY).
CAPABILITY_FLAGS = {
    "AVX512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma", "-mavx2"],
    "AVX2": ["-mavx2", "-mfma"],
}

_build_lock = threading.Lock()


@functools.cache
def _load() -> object | None:
    capability = torch.backends.cpu.get_cpu_capability()
    if os.environ.get("LOCATVIT_CPU_KERNEL", "1") == "0" or capability not in CAPABILITY_FLAGS:
        return None
    try:
        from torch.utils import cpp_extension

        logger.info("Building LocAtViT's fused CPU attention kernel (once per machine, about 30 s).")
        flags = ["-O3", "-fopenmp", f"-DCPU_CAPABILITY={capability}", f"-DCPU_CAPABILITY_{capability}"]
        cpp_extension.load_inline(
            f"locatvit_cpu_attention_{capability.lower()}",
            cpp_sources=KERNEL_SOURCE,
            extra_cflags=flags + CAPABILITY_FLAGS[capability],
            extra_ldflags=["-fopenmp"],
            is_python_module=False,
        )
    except Exception as error:  # no compiler, no ninja, a failed build: the stock path serves
        logger.warning("LocAtViT's fused CPU attention kernel is unavailable (%s); using sdpa with a mask.", error)
        return None
    operators = torch.ops.locatvit_cpu
    if not operators.has_blas():
        logger.warning("LocAtViT's fused CPU attention kernel found no BLAS in this PyTorch; using sdpa with a mask.")
        return None
    return operators.gaussian_attention


def fused_cpu_attention() -> object | None:
    """The kernel as `(query, key, value, row, col, scale, prefix) -> (batch, N, heads, dim)`, or None where it is
    unavailable (built on the first call)."""
    with _build_lock:
        return _load()
