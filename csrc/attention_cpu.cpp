// CPU varlen attention, float32 or bfloat16: out = softmax(q k^T * scale) v per (sequence, head),
// read straight from packed, possibly strided q/k/v (views of the fused QKV
// projection) and written to out [T, H, D]. No padding grid, no scatter/gather.
//
// Why not torch's SDPA: on the padded grid of a length-sorted batch it reaches
// 11-80 GFLOP/s on the 2-core AVX2 dev machine (worst for short posts, where its
// per-(batch, head) overhead dominates), and the scatter into the grid and the
// gather back cost ~2.5 ms more per batch of 4096 tokens.
//
// One OpenMP task per (sequence, head). A task packs K^T once into thread-local
// scratch [D][Lp] (and V into [L][D], six Q rows at a time into [kRows][D]), converting bf16 to fp32
// on the way, so that a 6x16 block of scores is a register-blocked outer
// product; each score row's softmax is taken over the whole row (rows are short
// on CPU, so no online rescaling is needed); P V accumulates six query rows at a
// time in registers. All math and accumulation is fp32 for either storage type; a bf16 output is
// the fp32 result rounded to nearest even once. The vector code uses GCC/Clang vector extensions
// (cpu_vec.h): one source, compiled for the baseline ISA (SSE2 / NEON) and, on x86-64, again for
// AVX2+FMA, picked at run time (cpu_isa()).
#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "cpu_vec.h"
#include "kernels.h"

namespace postembed {
namespace {

#define PE_INLINE inline __attribute__((always_inline))

using vec::at_least;
using vec::hmax;
using vec::hsum;
using vec::load8;
using vec::splat;
using vec::store8;
using vec::v8;
using vec::v8i;
using vec::vmax;

// expf for x <= 0 (softmax arguments), Cephes-style: exp(x) = 2^n exp(r), |r| <= ln2/2,
// degree-6 polynomial; ~1 ulp. Clamped at -87 (exp = 1.6e-38, still a normal float);
// NaN propagates (a NaN score makes its row NaN, as in torch).
PE_INLINE v8 exp8(v8 x) {
  x = at_least(x, splat(-87.0f));
  const v8 magic = splat(12582912.0f);  // 1.5 * 2^23: adding and subtracting rounds to an integer
  const v8 n = (x * splat(1.44269504088896341f) + magic) - magic;
  const v8 r = x - n * splat(0.693359375f) - n * splat(-2.12194440e-4f);
  v8 p = splat(1.9875691500e-4f);
  p = p * r + splat(1.3981999507e-3f);
  p = p * r + splat(8.3334519073e-3f);
  p = p * r + splat(4.1665795894e-2f);
  p = p * r + splat(1.6666665459e-1f);
  p = p * r + splat(5.0000001201e-1f);
  const v8 y = p * r * r + r + splat(1.0f);
  const v8i bits = (__builtin_convertvector(n, v8i) + 127) << 23;
  v8 two_n;
  std::memcpy(&two_n, &bits, sizeof two_n);
  return y * two_n;
}

// Register blocking: 6 rows x 2 vectors = 12 independent accumulators, enough to
// cover the FMA latency (4-5 cycles x 2 pipes), plus 2 loads and 1 broadcast: 15 of
// the 16 AVX2 registers.
constexpr int kRows = 6;   // query rows per block
constexpr int kCols = 16;  // key columns per score block (two vectors)

// Scratch floats one task needs for a sequence of L tokens: K^T [D][Lp], V [L][D] (Lp rows reserved),
// scores [kRows][Lp], Q rows [kRows][D].
inline size_t scratch_floats(int64_t L, int64_t D) {
  const int64_t Lp = (L + kCols - 1) / kCols * kCols;
  return static_cast<size_t>((2 * D + kRows) * Lp + kRows * D);
}

// One (sequence, head). D = 8 * ND; E = float or bf16_t (q, k, v and out).
template <int ND, typename E>
PE_INLINE void attend(const AttnArgs& a, int64_t t0, int64_t L, int64_t h, float* scratch) {
  using vec::to_float;
  constexpr int D = 8 * ND;
  const int64_t Lp = (L + kCols - 1) / kCols * kCols;
  float* kt = scratch;      // [D][Lp]  K^T of this (sequence, head), zero-padded columns
  float* vp = kt + D * Lp;  // [L][D]   V rows, packed: in place they sit 3 * H * D elements apart,
                            //          which maps them onto a few L1 sets and evicts them
  float* s = vp + D * Lp;   // [kRows][Lp] scores, then probabilities
  float* qb = s + kRows * Lp;  // [kRows][D] this block's query rows in fp32
  const E* q = static_cast<const E*>(a.q) + t0 * a.sqt + h * a.sqh;
  const E* k = static_cast<const E*>(a.k) + t0 * a.skt + h * a.skh;
  const E* v = static_cast<const E*>(a.v) + t0 * a.svt + h * a.svh;
  E* o = static_cast<E*>(a.out) + t0 * a.sot + h * a.soh;

  for (int64_t j = 0; j < L; ++j)
    for (int d = 0; d < D; ++d) kt[d * Lp + j] = to_float(k[j * a.skt + d]);
  for (int d = 0; d < D; ++d)
    for (int64_t j = L; j < Lp; ++j) kt[d * Lp + j] = 0.f;
  for (int64_t j = 0; j < L; ++j)
    for (int d = 0; d < D; d += 8) store8(vp + j * D + d, load8(v + j * a.svt + d));

  const v8 scale = splat(a.scale), neg_inf = splat(-INFINITY);
  v8i lane;
  for (int i = 0; i < 8; ++i) lane[i] = i;

  for (int64_t i0 = 0; i0 < L; i0 += kRows) {
    const int nr = static_cast<int>(std::min<int64_t>(kRows, L - i0));
    const float* qr[kRows];
    for (int r = 0; r < nr; ++r)
      for (int d = 0; d < D; d += 8) store8(qb + r * D + d, load8(q + (i0 + r) * a.sqt + d));
    for (int r = 0; r < kRows; ++r) qr[r] = qb + std::min(r, nr - 1) * D;  // spare rows repeat the last

    // scores * scale, padded columns -inf, and each row's running max
    v8 rmax[kRows];
    for (int r = 0; r < kRows; ++r) rmax[r] = neg_inf;
    for (int64_t j0 = 0; j0 < Lp; j0 += kCols) {
      v8 acc[kRows][2] = {};
      for (int d = 0; d < D; ++d) {
        const v8 k0 = load8(kt + d * Lp + j0), k1 = load8(kt + d * Lp + j0 + 8);
        for (int r = 0; r < kRows; ++r) {
          const v8 qd = splat(qr[r][d]);
          acc[r][0] += qd * k0;
          acc[r][1] += qd * k1;
        }
      }
      const bool tail = j0 + kCols > L;
      const v8i valid0 = lane + static_cast<int32_t>(j0) < static_cast<int32_t>(L);
      const v8i valid1 = lane + static_cast<int32_t>(j0 + 8) < static_cast<int32_t>(L);
      for (int r = 0; r < kRows; ++r) {
        v8 x0 = acc[r][0] * scale, x1 = acc[r][1] * scale;
        if (tail) {
          x0 = valid0 ? x0 : neg_inf;
          x1 = valid1 ? x1 : neg_inf;
        }
        rmax[r] = vmax(rmax[r], vmax(x0, x1));
        store8(s + r * Lp + j0, x0);
        store8(s + r * Lp + j0 + 8, x1);
      }
    }

    float inv[kRows];
    for (int r = 0; r < nr; ++r) {
      float* sr = s + r * Lp;
      const v8 m = splat(hmax(rmax[r]));
      v8 sum8 = {};
      for (int64_t j = 0; j < Lp; j += 8) {
        const v8 p = exp8(load8(sr + j) - m);
        store8(sr + j, p);
        sum8 += p;
      }
      // Padded columns contributed exp(-87) each: < 1e-36 against a sum >= 1.
      inv[r] = 1.0f / hsum(sum8);
    }

    // out rows = P V / sum, 6 rows x 16 columns per pass
    const float* p[kRows];
    for (int r = 0; r < kRows; ++r) p[r] = s + std::min(r, nr - 1) * Lp;
    for (int c0 = 0; c0 < D; c0 += 16) {
      v8 acc[kRows][2] = {};
      for (int64_t j = 0; j < L; ++j) {
        const v8 x0 = load8(vp + j * D + c0), x1 = load8(vp + j * D + c0 + 8);
        for (int r = 0; r < kRows; ++r) {
          const v8 w = splat(p[r][j]);
          acc[r][0] += w * x0;
          acc[r][1] += w * x1;
        }
      }
      for (int r = 0; r < nr; ++r) {
        E* dst = o + (i0 + r) * a.sot + c0;
        store8(dst, acc[r][0] * splat(inv[r]));
        store8(dst + 8, acc[r][1] * splat(inv[r]));
      }
    }
  }
}

template <typename E>
PE_INLINE void attend_any(const AttnArgs& a, int64_t t0, int64_t L, int64_t h, float* scratch) {
  switch (a.D) {
    case 16: attend<2, E>(a, t0, L, h, scratch); break;
    case 32: attend<4, E>(a, t0, L, h, scratch); break;
    case 64: attend<8, E>(a, t0, L, h, scratch); break;
    default: attend<16, E>(a, t0, L, h, scratch); break;  // 128 (head_dim checked at the boundary)
  }
}

using TaskFn = void (*)(const AttnArgs&, int64_t, int64_t, int64_t, float*);

template <typename E>
void task_baseline(const AttnArgs& a, int64_t t0, int64_t L, int64_t h, float* scratch) {
  attend_any<E>(a, t0, L, h, scratch);
}

#if defined(__x86_64__) && defined(__GNUC__)
template <typename E>
__attribute__((target("avx2,fma"))) void task_avx2(const AttnArgs& a, int64_t t0, int64_t L, int64_t h,
                                                   float* scratch) {
  attend_any<E>(a, t0, L, h, scratch);
}
#endif

template <typename E>
TaskFn pick_task() {
#if defined(__x86_64__) && defined(__GNUC__)
  if (cpu_isa() >= Isa::kAvx2) return task_avx2<E>;
#endif
  return task_baseline<E>;
}

}  // namespace

void varlen_attention_cpu(const AttnArgs& a) {
  const TaskFn task = a.dtype == kBF16 ? pick_task<bf16_t>() : pick_task<float>();
  const int64_t tasks = a.B * a.H;
  int64_t work = 0;  // ~ multiply-adds, to keep tiny calls on one thread
  for (int64_t b = 0; b < a.B; ++b) {
    const int64_t L = a.cu[b + 1] - a.cu[b];
    work += L * L;
  }
  work *= a.H * a.D;
  int nthreads = 1;
#ifdef _OPENMP
  if (work >= (int64_t{1} << 20)) nthreads = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(a.num_threads, tasks)));
#endif
#pragma omp parallel num_threads(nthreads)
  {
    static thread_local std::vector<float> scratch;
#pragma omp for schedule(dynamic, 1)
    for (int64_t t = 0; t < tasks; ++t) {
      const int64_t b = t / a.H, h = t % a.H;
      const int64_t t0 = a.cu[b], L = a.cu[b + 1] - a.cu[b];
      const size_t need = scratch_floats(L, a.D);
      if (scratch.size() < need) scratch.resize(need);
      task(a, t0, L, h, scratch.data());
    }
  }
}

}  // namespace postembed
