// CPU residual add + LayerNorm, float32 or bfloat16: out = (s - mean(s)) / sqrt(var(s) + eps) * w + b
// with s = x + residual, row by row. out may be x or residual itself (each row is
// read whole before it is written), so the encoder normalizes in place with no
// temporary: torch's native_layer_norm.out allocates a fresh [rows, H] result and
// copies it, which on CPU means page faults and heap churn on every layer.
//
// bfloat16 (x, residual, weight, bias, out): s is kept in fp32 (thread-local row scratch, since out
// may be x), the statistics are fp32, and only the final value is rounded to bf16, as torch's
// layer_norm on bf16 does (it upcasts per row). torch's CPU bf16 LayerNorm needs x + residual
// materialized as a bf16 tensor first (rounded once more) plus a fresh output.
#include <algorithm>
#include <cmath>
#include <type_traits>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "cpu_vec.h"
#include "kernels.h"

namespace postembed {
namespace {

// One row; inlined into a baseline build and, on x86-64, an AVX2+FMA build picked at run time.
// E = float or bf16_t; s: H fp32 scratch (for float: y itself, as the sum can live in the output).
// The sums run in explicit 8-lane vectors (then the tail), not a compiler-chosen reduction, so both
// storage types add in the same order: a bf16 row is its float32 row rounded once, bit for bit.
template <typename E>
inline __attribute__((always_inline)) void layernorm_row(const E* x, const E* res, E* y, const E* __restrict w,
                                                         const E* __restrict b, int64_t H, float eps, float* s) {
  using vec::load8;
  using vec::splat;
  using vec::store8;
  using vec::to_float;
  using vec::v8;
  v8 acc = {};
  int64_t j = 0;
  for (; j + 8 <= H; j += 8) {
    const v8 v = load8(x + j) + load8(res + j);
    store8(s + j, v);
    acc += v;
  }
  float sum = vec::hsum(acc);
  for (int64_t t = j; t < H; ++t) {
    const float v = to_float(x[t]) + to_float(res[t]);
    s[t] = v;
    sum += v;
  }
  const float mean = sum / static_cast<float>(H);
  const v8 m = splat(mean);
  v8 acc2 = {};
  for (j = 0; j + 8 <= H; j += 8) {
    const v8 d = load8(s + j) - m;
    acc2 += d * d;
  }
  float ss = vec::hsum(acc2);
  for (int64_t t = j; t < H; ++t) {
    const float d = s[t] - mean;
    ss += d * d;
  }
  const float rstd = 1.0f / std::sqrt(ss / static_cast<float>(H) + eps);
  const v8 r = splat(rstd);
  for (j = 0; j + 8 <= H; j += 8) store8(y + j, (load8(s + j) - m) * r * load8(w + j) + load8(b + j));
  for (int64_t t = j; t < H; ++t) vec::store1(y + t, (s[t] - mean) * rstd * to_float(w[t]) + to_float(b[t]));
}

template <typename E>
inline __attribute__((always_inline)) void rows_of(const LayerNormArgs& a, int64_t r0, int64_t r1, float* scratch) {
  const E* x = static_cast<const E*>(a.x);
  const E* res = static_cast<const E*>(a.residual);
  const E* w = static_cast<const E*>(a.weight);
  const E* b = static_cast<const E*>(a.bias);
  E* out = static_cast<E*>(a.out);
  for (int64_t r = r0; r < r1; ++r) {
    E* y = out + r * a.ldo;
    float* s = std::is_same<E, float>::value ? reinterpret_cast<float*>(y) : scratch;
    layernorm_row<E>(x + r * a.ldx, res + r * a.ldr, y, w, b, a.H, a.eps, s);
  }
}

using RowsFn = void (*)(const LayerNormArgs&, int64_t, int64_t, float*);

template <typename E>
void rows_baseline(const LayerNormArgs& a, int64_t r0, int64_t r1, float* scratch) {
  rows_of<E>(a, r0, r1, scratch);
}

// No AVX-512 build: three passes over a row that sits in L1 (H = 384-1024) are bound by loads and
// stores, which AVX2 already issues at full width; a wider build would only add a clock penalty.
#if defined(__x86_64__) && defined(__GNUC__)
template <typename E>
__attribute__((target("avx2,fma"))) void rows_avx2(const LayerNormArgs& a, int64_t r0, int64_t r1, float* scratch) {
  rows_of<E>(a, r0, r1, scratch);
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

void add_layernorm_cpu(const LayerNormArgs& a) {
  const RowsFn rows = a.dtype == kBF16 ? pick_rows<bf16_t>() : pick_rows<float>();
  int nthreads = 1;
#ifdef _OPENMP
  // a fork/join costs more than it saves on a few rows
  if (a.rows * a.H >= (int64_t{1} << 16))
    nthreads = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(a.num_threads, a.rows)));
#endif
#pragma omp parallel num_threads(nthreads)
  {
    static thread_local std::vector<float> scratch;
    if (a.dtype == kBF16 && scratch.size() < static_cast<size_t>(a.H)) scratch.resize(a.H);
    int64_t r0 = 0, r1 = a.rows;
#ifdef _OPENMP
    // static schedule by hand: one contiguous block of rows per thread
    const int64_t n = omp_get_num_threads(), t = omp_get_thread_num();
    r0 = a.rows * t / n, r1 = a.rows * (t + 1) / n;
#endif
    rows(a, r0, r1, scratch.data());
  }
}

}  // namespace postembed
