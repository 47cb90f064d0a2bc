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

void add_layernorm_cpu(const LayerNormArgs& a) {
  const int64_t H = a.H;
  int nthreads = 1;
#ifdef _OPENMP
  // a fork/join costs more than it saves on a few rows
  if (a.rows * H >= (int64_t{1} << 16)) nthreads = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(a.num_threads, a.rows)));
#endif
#pragma omp parallel for schedule(static) num_threads(nthreads)
  for (int64_t r = 0; r < a.rows; ++r) {
    const float* x = a.x + r * a.ldx;
    const float* res = a.residual + r * a.ldr;
    float* y = a.out + r * a.ldo;
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
    const float rstd = 1.0f / std::sqrt(ss / static_cast<float>(H) + a.eps);
#pragma omp simd
    for (int64_t j = 0; j < H; ++j) y[j] = (y[j] - mean) * rstd * a.weight[j] + a.bias[j];
  }
}

}  // namespace postembed
