// CPU residual add + LayerNorm, float32: out = (s - mean(s)) / sqrt(var(s) + eps) * w + b
// with s = x + residual, row by row. out may be x or residual itself (each row is
// read whole before it is written), so the encoder normalizes in place with no
// temporary: torch's native_layer_norm.out allocates a fresh [rows, H] result and
// copies it, which on CPU means page faults and heap churn on every layer.
#include <algorithm>
#include <cmath>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "kernels.h"

namespace postembed {
namespace {

// One row; inlined into a baseline build and, on x86-64, an AVX2+FMA build picked at run time.
inline __attribute__((always_inline)) void layernorm_row(const float* __restrict x, const float* res, float* y,
                                                         const float* __restrict w, const float* __restrict b,
                                                         int64_t H, float eps) {
  float sum = 0.f;
#pragma omp simd reduction(+ : sum)
  for (int64_t j = 0; j < H; ++j) {
    const float s = x[j] + res[j];
    y[j] = s;
    sum += s;
  }
  const float mean = sum / static_cast<float>(H);
  float ss = 0.f;
#pragma omp simd reduction(+ : ss)
  for (int64_t j = 0; j < H; ++j) {
    const float d = y[j] - mean;
    ss += d * d;
  }
  const float rstd = 1.0f / std::sqrt(ss / static_cast<float>(H) + eps);
#pragma omp simd
  for (int64_t j = 0; j < H; ++j) y[j] = (y[j] - mean) * rstd * w[j] + b[j];
}

using RowFn = void (*)(const float*, const float*, float*, const float*, const float*, int64_t, float);

void row_baseline(const float* x, const float* res, float* y, const float* w, const float* b, int64_t H, float eps) {
  layernorm_row(x, res, y, w, b, H, eps);
}

#if defined(__x86_64__) && defined(__GNUC__)
__attribute__((target("avx2,fma"))) void row_avx2(const float* x, const float* res, float* y, const float* w,
                                                  const float* b, int64_t H, float eps) {
  layernorm_row(x, res, y, w, b, H, eps);
}
#endif

RowFn pick_row() {
#if defined(__x86_64__) && defined(__GNUC__)
  if (avx2_enabled()) return row_avx2;
#endif
  return row_baseline;
}

}  // namespace

void add_layernorm_cpu(const LayerNormArgs& a) {
  const RowFn row = pick_row();
  int nthreads = 1;
#ifdef _OPENMP
  // a fork/join costs more than it saves on a few rows
  if (a.rows * a.H >= (int64_t{1} << 16))
    nthreads = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(a.num_threads, a.rows)));
#endif
#pragma omp parallel for schedule(static) num_threads(nthreads)
  for (int64_t r = 0; r < a.rows; ++r)
    row(a.x + r * a.ldx, a.residual + r * a.ldr, a.out + r * a.ldo, a.weight, a.bias, a.H, a.eps);
}

}  // namespace postembed
