// LocAtViT's fused CPU attention kernel: attention with the separable Gaussian bias added inside it, its backward, and
// the Gaussian's profiles with their backward (`locatvit_hf/cpu_attention_locatvit.py` says what each does and why).
// That module builds this file once per instruction set, with -DCPU_CAPABILITY=<AVX2|AVX512> (ATen's vectorized
// types pick their implementation from it) and -DLOCATVIT_NAMESPACE=locatvit_cpu_<avx2|avx512>, the namespace of
// the operators registered at the end, so that both builds can load in one process; its custom operators
// `torch.ops.locatvit.*` call them. Formatted with clang-format (Google style, 119 columns: .clang-format).

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <dlfcn.h>
#include <torch/library.h>
#if defined(CPU_CAPABILITY_AVX512)
#include <immintrin.h>
#endif

#include <algorithm>
#include <cmath>
#include <limits>
#include <tuple>
#include <type_traits>
#include <vector>

namespace {

// The attention runs in float32 (the model's kernel) and float64 (for gradient checks); `scalar_t` is either.
template <typename scalar_t>
using Vec = at::vec::Vectorized<scalar_t>;
template <typename scalar_t>
using Gemm = void (*)(const char*, const char*, const int*, const int*, const int*, const scalar_t*, const scalar_t*,
                      const int*, const scalar_t*, const int*, const scalar_t*, scalar_t*, const int*);

// The BLAS PyTorch is linked with (MKL or OpenBLAS export the Fortran symbols sgemm_ and dgemm_), looked up at run
// time.
template <typename scalar_t>
Gemm<scalar_t> blas_gemm() {
  static const auto gemm =
      reinterpret_cast<Gemm<scalar_t>>(dlsym(RTLD_DEFAULT, std::is_same_v<scalar_t, float> ? "sgemm_" : "dgemm_"));
  return gemm;
}

bool has_blas() { return blas_gemm<float>() != nullptr && blas_gemm<double>() != nullptr; }

// Row-major c (m x n, ldc) = alpha * op(a) * op(b) + beta * c, op(a) (m x k) and op(b) (k x n) being a and b
// or, if transposed, the transposes of the stored a (k x m) and b (n x k). BLAS is column-major: it computes
// c^T = op(b)^T op(a)^T from the same memory.
template <typename scalar_t>
void gemm(bool transpose_a, bool transpose_b, int64_t m, int64_t n, int64_t k, std::type_identity_t<scalar_t> alpha,
          const scalar_t* a, int64_t lda, const scalar_t* b, int64_t ldb, std::type_identity_t<scalar_t> beta,
          scalar_t* c, int64_t ldc) {
  const int cm = n, cn = m, ck = k, clda = ldb, cldb = lda, cldc = ldc;
  blas_gemm<scalar_t>()(transpose_b ? "T" : "N", transpose_a ? "T" : "N", &cm, &cn, &ck, &alpha, b, &clda, a, &cldb,
                        &beta, c, &cldc);
}

// A work buffer of at least `size` floats, one per slot and thread, kept for the thread's lifetime (the thread pool's
// threads persist): fresh buffers of this size would be mapped, faulted in and zeroed on every call (glibc maps
// blocks above 128 KB afresh), which cost the 224 px forward a few percent.
template <typename scalar_t>
scalar_t* thread_buffer(int slot, int64_t size) {
  thread_local std::vector<scalar_t> buffers[4];
  if (static_cast<int64_t>(buffers[slot].size()) < size) buffers[slot].resize(size);
  return buffers[slot].data();
}

// Where one (batch, head)'s tensors start, and their row strides.
template <typename scalar_t>
struct Slice {
  const scalar_t* data;
  int64_t stride;
};

template <typename scalar_t>
Slice<scalar_t> slice(const at::Tensor& t, int64_t b, int64_t h) {
  return {t.data_ptr<scalar_t>() + b * t.stride(0) + h * t.stride(1), t.stride(2)};
}

// The grid position of every patch key, for adding the bias a vector of 16 keys at a time on grids at most 16
// patches wide (AVX-512 builds): per vector, each lane's grid row (relative to the vector's first key's row) and
// column. The bias of 16 keys is then two register permutes of the query's row and column profiles and a product.
// Adding it one grid row at a time instead takes a short, masked segment per row (14 keys at 224 px), whose
// overlapping masked stores and loads stall: measured 3x slower per key.
struct KeyLanes {
  std::vector<int32_t> rows, cols;
};

KeyLanes key_lanes(int64_t height, int64_t width) {
  KeyLanes lanes;
#if defined(CPU_CAPABILITY_AVX512)
  if (width <= 16) {
    const int64_t patches = height * width, padded = (patches + 15) / 16 * 16;
    for (int64_t j = 0; j < padded; ++j) {
      const int64_t key = std::min(j, patches - 1);
      lanes.rows.push_back(static_cast<int32_t>(key / width - j / 16 * 16 / width));
      lanes.cols.push_back(static_cast<int32_t>(key % width));
    }
  }
#endif
  return lanes;
}

// One patch query's profiles, copied to contiguous memory: the row profile (height values) at `row`, the column
// profile (width values) at `col`, each followed by 16 spare floats for vector loads past its end. The profiles
// given to the kernel may be strided views: inference reads them queries-last, as they are computed, without a copy.
template <typename scalar_t>
struct QueryProfiles {
  scalar_t* row;
  scalar_t* col;
};

template <typename scalar_t>
QueryProfiles<scalar_t> gather_profiles(const at::Tensor& row, const at::Tensor& col, int64_t b, int64_t h,
                                        int64_t patch, scalar_t* scratch) {
  const int64_t height = row.size(3), width = col.size(3);
  const scalar_t* row_values =
      row.data_ptr<scalar_t>() + b * row.stride(0) + h * row.stride(1) + patch * row.stride(2);
  const scalar_t* col_values =
      col.data_ptr<scalar_t>() + b * col.stride(0) + h * col.stride(1) + patch * col.stride(2);
  QueryProfiles<scalar_t> profiles{scratch, scratch + height + 16};
  for (int64_t r = 0; r < height; ++r) profiles.row[r] = row_values[r * row.stride(3)];
  for (int64_t c = 0; c < width; ++c) profiles.col[c] = col_values[c * col.stride(3)];
  return profiles;
}

// Adds the Gaussian bias row[r] * col[c] to one query's scores of the patch keys (those after the prefix, at grid
// row r, column c) and returns their largest biased score (the softmax's shift, found while they are in registers
// rather than in another pass).
template <typename scalar_t>
scalar_t add_bias(scalar_t* scores, int64_t prefix, const QueryProfiles<scalar_t>& profiles, int64_t height,
                  int64_t width, const KeyLanes& lanes) {
  using VecT = Vec<scalar_t>;
  constexpr scalar_t lowest = -std::numeric_limits<scalar_t>::infinity();
  const scalar_t* row = profiles.row;
  const scalar_t* col = profiles.col;
#if defined(CPU_CAPABILITY_AVX512)
  if constexpr (std::is_same_v<scalar_t, float>) {
    if (!lanes.rows.empty()) {
      const __m512 col_values = _mm512_maskz_loadu_ps(static_cast<__mmask16>((1u << width) - 1), col);
      const int64_t patches = height * width;
      scalar_t* patch_scores = scores + prefix;
      __m512 peak = _mm512_set1_ps(lowest);
      for (int64_t j = 0; j < patches; j += 16) {
        const __mmask16 mask = patches - j >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << (patches - j)) - 1);
        const __m512 row_values = _mm512_loadu_ps(row + j / width);
        const __m512 bias =
            _mm512_mul_ps(_mm512_permutexvar_ps(_mm512_loadu_si512(lanes.rows.data() + j), row_values),
                          _mm512_permutexvar_ps(_mm512_loadu_si512(lanes.cols.data() + j), col_values));
        const __m512 biased = _mm512_add_ps(_mm512_maskz_loadu_ps(mask, patch_scores + j), bias);
        _mm512_mask_storeu_ps(patch_scores + j, mask, biased);
        peak = _mm512_mask_max_ps(peak, mask, peak, biased);
      }
      return _mm512_reduce_max_ps(peak);
    }
  }
#endif
  VecT peak(lowest);
  for (int64_t r = 0; r < height; ++r) {  // one grid row at a time, partial vectors for the rest of a row
    scalar_t* segment = scores + prefix + r * width;
    const VecT row_value(row[r]);
    for (int64_t c = 0; c < width; c += VecT::size()) {
      const int64_t count = std::min<int64_t>(VecT::size(), width - c);
      const VecT biased = at::vec::fmadd(row_value, VecT::loadu(col + c, count), VecT::loadu(segment + c, count));
      biased.store(segment + c, count);
      peak = at::vec::maximum(peak, count == VecT::size() ? biased : VecT::set(VecT(lowest), biased, count));
    }
  }
  return at::vec::vec_reduce_all<scalar_t>([](VecT& x, VecT& y) { return at::vec::maximum(x, y); }, peak);
}

template <typename scalar_t>
scalar_t largest(const scalar_t* scores, int64_t n) {
  using VecT = Vec<scalar_t>;
  return at::vec::reduce_all<scalar_t>([](VecT& x, VecT& y) { return at::vec::maximum(x, y); }, scores, n);
}

// exp(scores - shift) in place; returns the sum of the exponentials.
template <typename scalar_t>
scalar_t exponentiate(scalar_t* scores, int64_t n, scalar_t shift) {
  using VecT = Vec<scalar_t>;
  const VecT vshift(shift);
  VecT sum(0.f);
  for (int64_t j = 0; j < n; j += VecT::size()) {
    const int64_t count = std::min<int64_t>(VecT::size(), n - j);
    const VecT e = (VecT::loadu(scores + j, count) - vshift).exp_u20();
    e.store(scores + j, count);
    sum += count == VecT::size() ? e : VecT::set(VecT(0.f), e, count);
  }
  return at::vec::vec_reduce_all<scalar_t>([](VecT& x, VecT& y) { return x + y; }, sum);
}

// x *= factor, for one row of `n` values.
template <typename scalar_t>
void scale_row(scalar_t* x, int64_t n, scalar_t factor) {
  using VecT = Vec<scalar_t>;
  const VecT vfactor(factor);
  for (int64_t j = 0; j < n; j += VecT::size()) {
    const int64_t count = std::min<int64_t>(VecT::size(), n - j);
    (VecT::loadu(x + j, count) * vfactor).store(x + j, count);
  }
}

template <typename scalar_t>
scalar_t dot(const scalar_t* x, const scalar_t* y, int64_t n) {
  using VecT = Vec<scalar_t>;
  VecT sum(0.f);
  for (int64_t j = 0; j < n; j += VecT::size()) {
    const int64_t count = std::min<int64_t>(VecT::size(), n - j);
    sum = at::vec::fmadd(VecT::loadu(x + j, count), VecT::loadu(y + j, count), sum);
  }
  return at::vec::vec_reduce_all<scalar_t>([](VecT& a, VecT& b) { return a + b; }, sum);
}

// The shape every entry point shares: query, key, value (batch, heads, N, dim) and the profiles of the P = N -
// prefix patch queries, row (batch, heads, P, H) and col (batch, heads, P, W), P = H * W.
struct Shape {
  int64_t batch, heads, seq, dim, height, width, prefix, block, blocks, ld;
};

Shape check_shape(const at::Tensor& query, const at::Tensor& key, const at::Tensor& value, const at::Tensor& row,
                  const at::Tensor& col, int64_t prefix) {
  TORCH_CHECK(query.scalar_type() == at::kFloat || query.scalar_type() == at::kDouble,
              "float32 CPU tensors (float64 for gradient checks)");
  for (const auto* t : {&query, &key, &value, &row, &col}) {
    TORCH_CHECK(t->dim() == 4 && t->scalar_type() == query.scalar_type() && t->device().is_cpu(),
                "float32 CPU tensors (float64 for gradient checks), all of one dtype");
  }
  TORCH_CHECK(query.stride(3) == 1 && key.stride(3) == 1 && value.stride(3) == 1,
              "query, key and value need a unit stride in their last dimension");
  Shape s{query.size(0), query.size(1), query.size(2), query.size(3), row.size(3), col.size(3), prefix, 0, 0, 0};
  TORCH_CHECK(s.height * s.width + prefix == s.seq && row.size(2) == s.seq - prefix && col.size(2) == s.seq - prefix,
              "the profiles do not match the sequence");
  // Blocks of queries whose scores (block x N floats) take at most 1 MB, half the core's 2 MB L2 (against 0.5, 1.5
  // and 2 MB: 1-6% faster forward at 512 and 1024 px, the backward as fast; each block repacks the keys and values
  // for its products), but at least 128 queries, below which the products lose their efficiency (measured at
  // 1024 px); and at least four tasks a thread, so that small batches still use every thread.
  const int64_t cached_rows = std::max<int64_t>(262144 / s.seq, 128);
  const int64_t tasks_wanted = 4 * at::get_num_threads();
  int64_t blocks = std::max<int64_t>((s.seq + cached_rows - 1) / cached_rows,
                                     (tasks_wanted + s.batch * s.heads - 1) / (s.batch * s.heads));
  blocks = std::min(blocks, s.seq);
  s.block = (s.seq + blocks - 1) / blocks;
  s.blocks = (s.seq + s.block - 1) / s.block;
  s.ld = (s.seq + 15) / 16 * 16;  // rows of scores on whole cache lines
  return s;
}

// Grid rows of keys per chunk of the forward: all of them while a block of queries' scores for every key fit in the
// core's 2 MB L2; beyond (above about 4,000 tokens) chunks whose scores take about 1 MB, with an online softmax
// across them. Whole rows of scores for 16,000 tokens (2048 px) are 8 MB a block, streamed from memory four times
// (product, bias, exponentials, product): 1.4-1.8x the cost of stock sdpa, which tiles its keys.
int64_t rows_per_chunk(const Shape& s) {
  if (s.block * s.ld <= 524288) return s.height;
  return std::clamp<int64_t>(262144 / (s.block * s.width), 1, s.height);
}

// softmax(q k^T * scale + B) v, with B[i, j] = row[i, r_j] * col[i, c_j] for patch query i and patch key j at grid
// row r_j, column c_j, and 0 for the prefix tokens. Returns the output (batch, N, heads, dim), in the token-major
// layout the output projection reads, and the log-sum-exp of every query's scores (batch, heads, N). The keys go in
// chunks of whole grid rows (`rows_per_chunk`; the prefix tokens with the first): each chunk's exponentials are
// taken against the running maximum of the query's scores, and the output and sum so far are rescaled when it grows.
template <typename scalar_t>
std::tuple<at::Tensor, at::Tensor> attention_forward(const at::Tensor& query, const at::Tensor& key,
                                                     const at::Tensor& value, const at::Tensor& row,
                                                     const at::Tensor& col, double scale, int64_t prefix) {
  using VecT = Vec<scalar_t>;
  const Shape s = check_shape(query, key, value, row, col, prefix);
  auto output = at::empty({s.batch, s.seq, s.heads, s.dim}, query.options());
  auto logsumexp = at::empty({s.batch, s.heads, s.seq}, query.options());
  const int64_t chunk_rows = rows_per_chunk(s);
  const int64_t ld = (s.prefix + chunk_rows * s.width + 15) / 16 * 16;  // rows of scores on whole cache lines
  const KeyLanes lanes = key_lanes(chunk_rows, s.width);
  at::parallel_for(0, s.batch * s.heads * s.blocks, 1, [&](int64_t begin, int64_t end) {
    scalar_t* scores = thread_buffer<scalar_t>(0, s.block * ld);
    scalar_t* sums = thread_buffer<scalar_t>(1, s.block);
    scalar_t* scratch = thread_buffer<scalar_t>(2, s.height + s.width + 32);
    scalar_t* maxima = thread_buffer<scalar_t>(3, s.block);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / (s.heads * s.blocks), h = task / s.blocks % s.heads, start = task % s.blocks * s.block;
      const int64_t len = std::min(s.block, s.seq - start);
      const Slice<scalar_t> q = slice<scalar_t>(query, b, h), k = slice<scalar_t>(key, b, h),
                            v = slice<scalar_t>(value, b, h);
      scalar_t* o = output.data_ptr<scalar_t>() + (b * s.seq + start) * s.heads * s.dim + h * s.dim;
      const int64_t ldo = s.heads * s.dim;
      for (int64_t first_row = 0; first_row < s.height; first_row += chunk_rows) {
        const int64_t rows = std::min(chunk_rows, s.height - first_row);
        const int64_t chunk_prefix = first_row == 0 ? s.prefix : 0;
        const int64_t first_key = first_row == 0 ? 0 : s.prefix + first_row * s.width;
        const int64_t n = chunk_prefix + rows * s.width;
        gemm(false, true, len, n, s.dim, scale, q.data + start * q.stride, q.stride, k.data + first_key * k.stride,
             k.stride, 0.f, scores, ld);
        for (int64_t i = 0; i < len; ++i) {
          scalar_t* scores_i = scores + i * ld;
          const int64_t patch = start + i - s.prefix;  // negative for prefix queries, whose bias is 0
          scalar_t peak;
          if (patch >= 0) {
            QueryProfiles<scalar_t> profiles = gather_profiles(row, col, b, h, patch, scratch);
            profiles.row += first_row;  // the chunk's grid rows
            peak = add_bias(scores_i, chunk_prefix, profiles, rows, s.width, lanes);
          } else {
            peak = largest(scores_i + chunk_prefix, n - chunk_prefix);
          }
          for (int64_t j = 0; j < chunk_prefix; ++j) peak = std::max(peak, scores_i[j]);
          const scalar_t shift = first_row == 0 ? peak : std::max(maxima[i], peak);
          const scalar_t sum = exponentiate(scores_i, n, shift);
          if (first_row == 0) {
            sums[i] = sum;
          } else {  // earlier chunks' exponentials were taken against a smaller maximum: rescale them
            const scalar_t correction = std::exp(maxima[i] - shift);
            sums[i] = sums[i] * correction + sum;
            scale_row(o + i * ldo, s.dim, correction);
          }
          maxima[i] = shift;
        }
        gemm(false, false, len, s.dim, n, 1.f, scores, ld, v.data + first_key * v.stride, v.stride,
             first_row == 0 ? 0.f : 1.f, o, ldo);
      }
      scalar_t* lse = logsumexp.data_ptr<scalar_t>() + (b * s.heads + h) * s.seq + start;
      for (int64_t i = 0; i < len; ++i) {  // the softmax's division, on the output's dim values instead of N
        lse[i] = maxima[i] + std::log(sums[i]);
        scale_row(o + i * ldo, s.dim, 1.f / sums[i]);
      }
    }
  });
  return {output, logsumexp};
}

// Gradients of `gaussian_attention` given the gradient of its output (batch, N, heads, dim): with respect to
// query, key and value, returned as (batch, heads, N, dim) views of token-major (batch, N, heads, dim) tensors (the
// projections' layout, so autograd copies nothing on the way back), and to the profiles row and col. Recomputes the
// probabilities from the log-sum-exp, a block of queries at a time, like the forward; each thread owns whole
// (batch, head) slices, so that it accumulates their key and value gradients alone.
template <typename scalar_t>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> attention_backward(
    const at::Tensor& grad_output, const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
    const at::Tensor& row, const at::Tensor& col, const at::Tensor& output, const at::Tensor& logsumexp, double scale,
    int64_t prefix) {
  using VecT = Vec<scalar_t>;
  const Shape s = check_shape(query, key, value, row, col, prefix);
  TORCH_CHECK(grad_output.is_contiguous() && output.is_contiguous() && logsumexp.is_contiguous(),
              "contiguous output, gradient and log-sum-exp");
  auto token_major = [&]() { return at::empty({s.batch, s.seq, s.heads, s.dim}, query.options()).transpose(1, 2); };
  at::Tensor grad_query = token_major(), grad_key = token_major(), grad_value = token_major();
  auto grad_row = at::empty(row.sizes(), row.options());
  auto grad_col = at::empty(col.sizes(), col.options());
  const int64_t ldo = s.heads * s.dim;
  const KeyLanes lanes = key_lanes(s.height, s.width);
  at::parallel_for(0, s.batch * s.heads, 1, [&](int64_t begin, int64_t end) {
    scalar_t* probabilities = thread_buffer<scalar_t>(0, s.block * s.ld);
    scalar_t* grad_scores = thread_buffer<scalar_t>(1, s.block * s.ld);
    scalar_t* scratch = thread_buffer<scalar_t>(2, s.height + s.width + 32);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / s.heads, h = task % s.heads;
      const Slice<scalar_t> q = slice<scalar_t>(query, b, h), k = slice<scalar_t>(key, b, h),
                            v = slice<scalar_t>(value, b, h);
      const scalar_t* lse = logsumexp.data_ptr<scalar_t>() + (b * s.heads + h) * s.seq;
      const scalar_t* dout = grad_output.data_ptr<scalar_t>() + b * s.seq * ldo + h * s.dim;
      const scalar_t* out = output.data_ptr<scalar_t>() + b * s.seq * ldo + h * s.dim;
      scalar_t* dq = grad_query.data_ptr<scalar_t>() + b * s.seq * ldo + h * s.dim;
      scalar_t* dk = grad_key.data_ptr<scalar_t>() + b * s.seq * ldo + h * s.dim;
      scalar_t* dv = grad_value.data_ptr<scalar_t>() + b * s.seq * ldo + h * s.dim;
      scalar_t* drow = grad_row.data_ptr<scalar_t>() + (b * s.heads + h) * (s.seq - prefix) * s.height;
      scalar_t* dcol = grad_col.data_ptr<scalar_t>() + (b * s.heads + h) * (s.seq - prefix) * s.width;
      for (int64_t start = 0; start < s.seq; start += s.block) {
        const int64_t len = std::min(s.block, s.seq - start);
        const scalar_t beta = start == 0 ? 0.f : 1.f;  // the first block writes dk and dv, later ones add to them
        gemm(false, true, len, s.seq, s.dim, scale, q.data + start * q.stride, q.stride, k.data, k.stride, 0.f,
             probabilities, s.ld);
        gemm(false, true, len, s.seq, s.dim, 1.f, dout + start * ldo, ldo, v.data, v.stride, 0.f, grad_scores, s.ld);
        for (int64_t i = 0; i < len; ++i) {
          const int64_t t = start + i, patch = t - prefix;
          scalar_t* p = probabilities + i * s.ld;
          scalar_t* ds = grad_scores + i * s.ld;
          const QueryProfiles<scalar_t> profiles =
              patch >= 0 ? gather_profiles(row, col, b, h, patch, scratch) : QueryProfiles<scalar_t>{};
          if (patch >= 0) add_bias(p, prefix, profiles, s.height, s.width, lanes);
          exponentiate(p, s.seq, lse[t]);
          // dS = P * (dP - D), D = dO . O: the softmax's backward, which is also the bias's gradient.
          const VecT delta(dot(dout + t * ldo, out + t * ldo, s.dim));
          for (int64_t j = 0; j < s.seq; j += VecT::size()) {
            const int64_t count = std::min<int64_t>(VecT::size(), s.seq - j);
            (VecT::loadu(p + j, count) * (VecT::loadu(ds + j, count) - delta)).store(ds + j, count);
          }
          if (patch < 0) continue;
          // The bias gradient reduced to the profiles at once: d row[r] = sum_c dS[r, c] col[c], d col[c] =
          // sum_r dS[r, c] row[r].
          scalar_t* drow_i = drow + patch * s.height;
          scalar_t* dcol_i = dcol + patch * s.width;
          std::fill(dcol_i, dcol_i + s.width, 0.f);
          for (int64_t r = 0; r < s.height; ++r) {
            const scalar_t* segment = ds + prefix + r * s.width;
            drow_i[r] = dot(segment, profiles.col, s.width);
            const VecT row_value(profiles.row[r]);
            for (int64_t c = 0; c < s.width; c += VecT::size()) {
              const int64_t count = std::min<int64_t>(VecT::size(), s.width - c);
              at::vec::fmadd(row_value, VecT::loadu(segment + c, count), VecT::loadu(dcol_i + c, count))
                  .store(dcol_i + c, count);
            }
          }
        }
        gemm(true, false, s.seq, s.dim, len, 1.f, probabilities, s.ld, dout + start * ldo, ldo, beta, dv, ldo);
        gemm(false, false, len, s.dim, s.seq, scale, grad_scores, s.ld, k.data, k.stride, 0.f, dq + start * ldo, ldo);
        gemm(true, false, s.seq, s.dim, len, scale, grad_scores, s.ld, q.data + start * q.stride, q.stride, beta, dk,
             ldo);
      }
    }
  });
  return {grad_query, grad_key, grad_value, grad_row, grad_col};
}

std::tuple<at::Tensor, at::Tensor> gaussian_attention(const at::Tensor& query, const at::Tensor& key,
                                                      const at::Tensor& value, const at::Tensor& row,
                                                      const at::Tensor& col, double scale, int64_t prefix) {
  return query.scalar_type() == at::kDouble ? attention_forward<double>(query, key, value, row, col, scale, prefix)
                                            : attention_forward<float>(query, key, value, row, col, scale, prefix);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> gaussian_attention_backward(
    const at::Tensor& grad_output, const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
    const at::Tensor& row, const at::Tensor& col, const at::Tensor& output, const at::Tensor& logsumexp, double scale,
    int64_t prefix) {
  auto backward = query.scalar_type() == at::kDouble ? attention_backward<double> : attention_backward<float>;
  return backward(grad_output, query, key, value, row, col, output, logsumexp, scale, prefix);
}

// The Gaussian's profiles for inference, in one pass instead of a dozen elementwise operations (each a pass over
// memory and a dispatch), written query-major, as the attention reads them: for every (batch, head) and patch query
// q at grid row r_q, column c_q,
//   row[b, h, q, r] = flushed exp(distances[r_q, r] / (sigmoid(statistics[b, h, 0, q]) + eps) + log(alpha_q)),
//   col[b, h, q, c] = flushed exp(distances[c_q, c] / (sigmoid(statistics[b, h, 1, q]) + eps)),
// alpha_q = max(softplus(statistics[b, h, 2, q]), floor), the exponent clamped at `clamp` and values not above `floor`
// flushed to 0: `LocAtViTGaussianBias.profiles` without a gradient, with PyTorch's own vectorized functions.
// row (batch, heads, Q, H) and col (batch, heads, Q, W) contiguous, Q = H * W; statistics (batch, heads, 3, Q), any
// strides; distances (S, S) contiguous, S >= H, W: the clamped, scaled -0.5 * squared distance between grid lines
// (`grid_distance_table`), whose row r_q holds a query's distances to all lines.
void gaussian_profiles_(const at::Tensor& row, const at::Tensor& col, const at::Tensor& statistics,
                        const at::Tensor& distances, double eps, double floor, double clamp) {
  using VecF = Vec<float>;
  for (const auto* t : {&row, &col, &statistics, &distances}) {
    TORCH_CHECK(t->scalar_type() == at::kFloat && t->device().is_cpu(), "float32 CPU tensors");
  }
  TORCH_CHECK(row.dim() == 4 && col.dim() == 4 && statistics.dim() == 4 && distances.dim() == 2 &&
                  row.is_contiguous() && col.is_contiguous() && distances.is_contiguous(),
              "contiguous row (batch, heads, Q, H), col (batch, heads, Q, W) and distances (S, S)");
  const int64_t batch = row.size(0), heads = row.size(1), queries = row.size(2), side = distances.size(0);
  const int64_t height = row.size(3), width = col.size(3);
  TORCH_CHECK(col.size(0) == batch && col.size(1) == heads && col.size(2) == queries && queries == height * width &&
                  statistics.size(0) == batch && statistics.size(1) == heads && statistics.size(2) == 3 &&
                  statistics.size(3) == queries && distances.size(1) == side && height <= side && width <= side,
              "row, col, statistics and distances do not match");
  const VecF one(1.f), zero(0.f), vfloor(static_cast<float>(floor)), vclamp(static_cast<float>(clamp));
  const float* table = distances.data_ptr<float>();
  // exp(max(distance / denominator + offset, clamp)) over n lines, flushed (NaN stays NaN).
  auto profile = [&](const float* distance, float denominator, float offset, float* out, int64_t n) {
    for (int64_t line = 0; line < n; line += VecF::size()) {
      const int64_t count = std::min<int64_t>(VecF::size(), n - line);
      const VecF exponent = VecF::loadu(distance + line, count) / VecF(denominator) + VecF(offset);
      const VecF value = at::vec::maximum(exponent, vclamp).exp();
      VecF::blendv(value, zero, value <= vfloor).store(out + line, count);
    }
  };
  at::parallel_for(0, batch * heads, 1, [&](int64_t begin, int64_t end) {
    float* terms = thread_buffer<float>(3, 3 * queries);  // per query: row and column denominators, log(alpha)
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / heads, h = task % heads;
      const float* stats = statistics.data_ptr<float>() + b * statistics.stride(0) + h * statistics.stride(1);
      for (int64_t k = 0; k < 3; ++k) {
        for (int64_t q = 0; q < queries; ++q)
          terms[k * queries + q] = stats[k * statistics.stride(2) + q * statistics.stride(3)];
      }
      for (int64_t q = 0; q < queries; q += VecF::size()) {  // the per-query terms, vectorized over queries
        const int64_t count = std::min<int64_t>(VecF::size(), queries - q);
        for (int64_t k = 0; k < 2; ++k) {  // sigmoid(x) + eps
          float* term = terms + k * queries + q;
          ((one + (zero - VecF::loadu(term, count)).exp()).reciprocal() + VecF(static_cast<float>(eps)))
              .store(term, count);
        }
        float* term = terms + 2 * queries + q;
        const VecF x = VecF::loadu(term, count);
        const VecF softplus = VecF::blendv(x.exp().log1p(), x, x > VecF(20.f));
        at::vec::maximum(softplus, vfloor).log().store(term, count);
      }
      float* row_out = row.data_ptr<float>() + task * queries * height;
      float* col_out = col.data_ptr<float>() + task * queries * width;
      for (int64_t q = 0; q < queries; ++q) {  // the profiles, vectorized over grid lines
        const float* row_distances = table + q / width * side;
        const float* col_distances = table + q % width * side;
        profile(row_distances, terms[q], terms[2 * queries + q], row_out + q * height, height);
        profile(col_distances, terms[queries + q], 0.f, col_out + q * width, width);
      }
    }
  });
}

// Gradient of `gaussian_profiles_` with respect to its statistics (batch, heads, 3, Q), from the gradients of the
// profiles it wrote (row, col) and those profiles: for query q, with s = sigmoid, den_k = s(x_k) + eps and
// t the distances,
//   d x_0 = -s'(x_0) / den_0^2 * sum_r drow[q, r] row[q, r] t[r_q, r],
//   d x_1 = -s'(x_1) / den_1^2 * sum_c dcol[q, c] col[q, c] t[c_q, c],
//   d x_2 = softplus'(x_2) / softplus(x_2) * sum_r drow[q, r] row[q, r] (0 where softplus(x_2) <= floor),
// flushed entries (0) contributing nothing, as in the formula's autograd.
at::Tensor gaussian_profiles_backward(const at::Tensor& grad_row, const at::Tensor& grad_col,
                                      const at::Tensor& statistics, const at::Tensor& row, const at::Tensor& col,
                                      const at::Tensor& distances, double eps, double floor) {
  for (const auto* t : {&grad_row, &grad_col, &row, &col, &distances}) {
    TORCH_CHECK(t->scalar_type() == at::kFloat && t->device().is_cpu() && t->is_contiguous(),
                "contiguous float32 CPU tensors");
  }
  const int64_t batch = row.size(0), heads = row.size(1), queries = row.size(2), side = distances.size(0);
  const int64_t height = row.size(3), width = col.size(3);
  TORCH_CHECK(grad_row.sizes() == row.sizes() && grad_col.sizes() == col.sizes() && queries == height * width &&
                  statistics.size(2) == 3 && statistics.size(3) == queries,
              "gradients, profiles and statistics do not match");
  auto grad = at::empty({batch, heads, 3, queries}, row.options());
  const float* table = distances.data_ptr<float>();
  at::parallel_for(0, batch * heads, 1, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / heads, h = task % heads;
      const float* stats = statistics.data_ptr<float>() + b * statistics.stride(0) + h * statistics.stride(1);
      float* out = grad.data_ptr<float>() + task * 3 * queries;
      for (int64_t q = 0; q < queries; ++q) {
        const float* drow = grad_row.data_ptr<float>() + (task * queries + q) * height;
        const float* dcol = grad_col.data_ptr<float>() + (task * queries + q) * width;
        const float* row_q = row.data_ptr<float>() + (task * queries + q) * height;
        const float* col_q = col.data_ptr<float>() + (task * queries + q) * width;
        const float* row_distances = table + q / width * side;
        const float* col_distances = table + q % width * side;
        float weighted_row = 0.f, row_sum = 0.f, weighted_col = 0.f;
        for (int64_t r = 0; r < height; ++r) {
          const float g = drow[r] * row_q[r];
          row_sum += g;
          weighted_row += g * row_distances[r];
        }
        for (int64_t c = 0; c < width; ++c) weighted_col += dcol[c] * col_q[c] * col_distances[c];
        const float x[3] = {stats[q * statistics.stride(3)], stats[statistics.stride(2) + q * statistics.stride(3)],
                            stats[2 * statistics.stride(2) + q * statistics.stride(3)]};
        const float weighted[2] = {weighted_row, weighted_col};
        for (int64_t k = 0; k < 2; ++k) {
          const float sig = 1.f / (1.f + std::exp(-x[k]));
          const float denominator = sig + static_cast<float>(eps);
          out[k * queries + q] = -weighted[k] * sig * (1.f - sig) / (denominator * denominator);
        }
        const float softplus = x[2] > 20.f ? x[2] : std::log1p(std::exp(x[2]));
        const float slope = x[2] > 20.f ? 1.f : 1.f / (1.f + std::exp(-x[2]));
        out[2 * queries + q] = softplus > static_cast<float>(floor) ? row_sum * slope / softplus : 0.f;
      }
    }
  });
  return grad;
}

}  // namespace

TORCH_LIBRARY(LOCATVIT_NAMESPACE, m) {  // one per instruction set: locatvit_cpu_avx512, locatvit_cpu_avx2
  m.def("has_blas() -> bool");
  m.impl("has_blas", c10::DispatchKey::CompositeExplicitAutograd, TORCH_FN(has_blas));
  m.def(
      "gaussian_attention(Tensor query, Tensor key, Tensor value, Tensor row, Tensor col, float scale, "
      "int prefix) -> (Tensor, Tensor)");
  m.impl("gaussian_attention", c10::DispatchKey::CPU, TORCH_FN(gaussian_attention));
  m.def(
      "gaussian_attention_backward(Tensor grad_output, Tensor query, Tensor key, Tensor value, Tensor row, "
      "Tensor col, Tensor output, Tensor logsumexp, float scale, int prefix) -> (Tensor, Tensor, Tensor, Tensor, "
      "Tensor)");
  m.impl("gaussian_attention_backward", c10::DispatchKey::CPU, TORCH_FN(gaussian_attention_backward));
  m.def(
      "gaussian_profiles_(Tensor(a!) row, Tensor(b!) col, Tensor statistics, Tensor distances, float eps, "
      "float floor, float clamp) -> ()");
  m.impl("gaussian_profiles_", c10::DispatchKey::CPU, TORCH_FN(gaussian_profiles_));
  m.def(
      "gaussian_profiles_backward(Tensor grad_row, Tensor grad_col, Tensor statistics, Tensor row, Tensor col, "
      "Tensor distances, float eps, float floor) -> Tensor");
  m.impl("gaussian_profiles_backward", c10::DispatchKey::CPU, TORCH_FN(gaussian_profiles_backward));
}
