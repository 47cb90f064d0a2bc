// CPU bias + GELU, float32 or bfloat16: out = GELU(x + bias) = 0.5 y (1 + erf(y / sqrt(2))), y = x + bias,
// the exact (erf) GELU of BERT's "gelu" (kernels/gelu.py's reference; not the tanh approximation).
// out may be x itself (elementwise). fp32 math for either storage type; a bf16 output is the fp32
// result rounded to nearest even once. torch's CPU gelu on bf16 does the same math, but the bias needs
// a separate pass (and, outside addmm, a rounded bf16 intermediate).
//
// erf: the rational approximation of Eigen / XLA (odd degree-13 numerator over even degree-8
// denominator on [-4, 4], +-1 beyond in float32): max abs error 3.7e-7 against erf in double (~3 ulp
// near 1), so GELU's max abs error is 6.4e-7 on |y| <= 6; NaN propagates (the clamps keep NaN).
#include <algorithm>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "cpu_vec.h"
#include "kernels.h"

namespace postembed {
namespace {

using vec::at_least;
using vec::at_most;
using vec::load8;
using vec::splat;
using vec::store8;
using vec::v8;

inline __attribute__((always_inline)) v8 gelu8(v8 y) {
  const v8 z = at_most(at_least(y * splat(0.70710678118654752f), splat(-4.0f)), splat(4.0f));
  const v8 z2 = z * z;
  v8 p = z2 * splat(-2.72614225801306e-10f) + splat(2.77068142495902e-08f);
  p = z2 * p + splat(-2.10102402082508e-06f);
  p = z2 * p + splat(-5.69250639462346e-05f);
  p = z2 * p + splat(-7.34990630326855e-04f);
  p = z2 * p + splat(-2.95459980854025e-03f);
  p = z2 * p + splat(-1.60960333262415e-02f);
  p = z * p;
  v8 q = z2 * splat(-1.45660718464996e-05f) + splat(-2.13374055278905e-04f);
  q = z2 * q + splat(-1.68282697438203e-03f);
  q = z2 * q + splat(-7.37332916720468e-03f);
  q = z2 * q + splat(-1.42647390514189e-02f);
  return splat(0.5f) * y * (splat(1.0f) + p / q);
}

// One row; E = float or bf16_t. The tail goes through the same vector math (via an 8-float staging
// block), so every element gets the same formula whatever its column.
template <typename E>
inline __attribute__((always_inline)) void gelu_row(const E* x, const E* bias, E* y, int64_t F) {
  int64_t j = 0;
  if (bias) {
    for (; j + 8 <= F; j += 8) store8(y + j, gelu8(load8(x + j) + load8(bias + j)));
  } else {
    for (; j + 8 <= F; j += 8) store8(y + j, gelu8(load8(x + j)));
  }
  if (j < F) {
    float t[8] = {};
    for (int64_t i = j; i < F; ++i) t[i - j] = vec::to_float(x[i]) + (bias ? vec::to_float(bias[i]) : 0.f);
    const v8 g = gelu8(load8(t));
    for (int64_t i = j; i < F; ++i) vec::store1(y + i, g[i - j]);
  }
}

template <typename E>
inline __attribute__((always_inline)) void rows_of(const BiasGeluArgs& a, int64_t r0, int64_t r1) {
  const E* x = static_cast<const E*>(a.x);
  const E* b = static_cast<const E*>(a.bias);
  E* out = static_cast<E*>(a.out);
  for (int64_t r = r0; r < r1; ++r) gelu_row<E>(x + r * a.ldx, b, out + r * a.ldo, a.F);
}

using RowsFn = void (*)(const BiasGeluArgs&, int64_t, int64_t);

template <typename E>
void rows_baseline(const BiasGeluArgs& a, int64_t r0, int64_t r1) {
  rows_of<E>(a, r0, r1);
}

// No AVX-512 build yet: at the encoder's sizes ([tokens, 1536] bf16, 12 MB per 4,096 tokens) the pass
// streams from L3/DRAM, so a wider build has little to gain (unmeasured: no AVX-512 CPU at hand).
#if defined(__x86_64__) && defined(__GNUC__)
template <typename E>
__attribute__((target("avx2,fma"))) void rows_avx2(const BiasGeluArgs& a, int64_t r0, int64_t r1) {
  rows_of<E>(a, r0, r1);
}
#endif

template <typename E>
RowsFn pick_rows() {
#if defined(__x86_64__) && defined(__GNUC__)
  if (cpu_isa() >= Isa::kAvx2) return rows_avx2<E>;
#endif
  return rows_baseline<E>;
}

}  // namespace

void bias_gelu_cpu(const BiasGeluArgs& a) {
  const RowsFn rows = a.dtype == kBF16 ? pick_rows<bf16_t>() : pick_rows<float>();
  int nthreads = 1;
#ifdef _OPENMP
  if (a.rows * a.F >= (int64_t{1} << 16))
    nthreads = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(a.num_threads, a.rows)));
#endif
#pragma omp parallel num_threads(nthreads)
  {
    int64_t r0 = 0, r1 = a.rows;
#ifdef _OPENMP
    const int64_t n = omp_get_num_threads(), t = omp_get_thread_num();
    r0 = a.rows * t / n, r1 = a.rows * (t + 1) / n;
#endif
    rows(a, r0, r1);
  }
}

}  // namespace postembed
