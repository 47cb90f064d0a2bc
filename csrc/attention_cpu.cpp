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
#include <atomic>
#include <cmath>
#include <cstring>
#include <type_traits>
#include <vector>

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#endif

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


// ---- bfloat16 pair dot products (AVX512-BF16 vdpbf16ps) ---------------------------------------
// vdpbf16ps adds, to each of 16 fp32 lanes, the dot product of one pair of bf16 values from each
// operand. For bf16 inputs that halves the multiply-add instructions of both products and the scratch
// they stream, with nothing converted: Q K^T takes the pairs (d, d + 1) exactly as they lie in memory;
// P V pairs two tokens, with the probabilities rounded once to bf16 (as FlashAttention does on GPUs),
// so this build is within two bf16 roundings of the float64 result instead of one. Layouts:
//   kp [D/2][Lp]   uint32 K^T pairs: kp[i][j] = (k[j][2i] low, k[j][2i+1] high)
//   vq [L/2][D]    uint32 V token pairs: vq[m][c] = (v[2m][c] low, v[2m+1][c] high; 0 past the end)
//   s  [kRows][Lp] fp32 scores, then probabilities;  pb [kRows][Lp] the probabilities in bf16
// A pair-dot policy supplies the instruction: PairDotAvx512 (the production build) and PairDotEmulated
// (portable vectors, the same fp32 operation order; reachable only through the test hook, so the layout
// code is tested on CPUs without AVX512-BF16).
constexpr int kPairCols = 32;  // key columns per score block: two 16-lane vectors

PE_INLINE uint32_t load_pair(const bf16_t* p) {
  uint32_t u;
  std::memcpy(&u, p, sizeof u);
  return u;
}

inline size_t pair_scratch_floats(int64_t L, int64_t D) {
  const int64_t Lp = (L + kPairCols - 1) / kPairCols * kPairCols;
  const int64_t Lh = (L + 1) / 2;
  return static_cast<size_t>(D / 2 * Lp + Lh * D + kRows * Lp + kRows * Lp / 2 + 32);
}

struct PairDotEmulated {
  struct A {
    v8 lo, hi;  // lanes 0-7, 8-15
  };
  static PE_INLINE A zero() { return A{v8{}, v8{}}; }
  static PE_INLINE v8 low_halves(vec::v8u u) {
    const vec::v8u x = u << 16;
    v8 f;
    std::memcpy(&f, &x, sizeof f);
    return f;
  }
  static PE_INLINE v8 high_halves(vec::v8u u) {
    const vec::v8u x = u & 0xffff0000u;
    v8 f;
    std::memcpy(&f, &x, sizeof f);
    return f;
  }
  // acc[i] += a.high * b[i].high + a.low * b[i].low (vdpbf16ps's order: the odd element first)
  static PE_INLINE A dot(A acc, uint32_t a, const uint32_t* b) {
    const v8 alo = splat(bf16_to_float(static_cast<uint16_t>(a & 0xffffu)));
    const v8 ahi = splat(bf16_to_float(static_cast<uint16_t>(a >> 16)));
    vec::v8u b0, b1;
    std::memcpy(&b0, b, sizeof b0);
    std::memcpy(&b1, b + 8, sizeof b1);
    acc.lo = (acc.lo + ahi * high_halves(b0)) + alo * low_halves(b0);
    acc.hi = (acc.hi + ahi * high_halves(b1)) + alo * low_halves(b1);
    return acc;
  }
  static PE_INLINE void store(float* p, A a) {
    store8(p, a.lo);
    store8(p + 8, a.hi);
  }
};

#if defined(__x86_64__) && defined(__GNUC__)
#define PE_AVX512_BF16 __attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16,fma")))
struct PairDotAvx512 {
  using A = __m512;
  static inline PE_AVX512_BF16 A zero() { return _mm512_setzero_ps(); }
  static inline PE_AVX512_BF16 A dot(A acc, uint32_t a, const uint32_t* b) {
    const __m512i av = _mm512_set1_epi32(static_cast<int>(a));
    const __m512i bv = _mm512_loadu_si512(static_cast<const void*>(b));
    __m512bh ab, bb;  // the same 64 bytes seen as 32 bf16 (memcpy: no aliasing questions, no instruction)
    std::memcpy(&ab, &av, sizeof ab);
    std::memcpy(&bb, &bv, sizeof bb);
    return _mm512_dpbf16_ps(acc, ab, bb);
  }
  static inline PE_AVX512_BF16 void store(float* p, A a) { _mm512_storeu_ps(p, a); }
};
#endif

// One (sequence, head) of bf16 q, k, v, out. D = 8 * ND.
template <int ND, typename P>
PE_INLINE void attend_pairs(const AttnArgs& a, int64_t t0, int64_t L, int64_t h, float* scratch) {
  constexpr int D = 8 * ND, DH = D / 2;
  constexpr int NV = D >= 32 ? 2 : 1;  // 16-lane vectors per output column block
  using A = typename P::A;
  const int64_t Lp = (L + kPairCols - 1) / kPairCols * kPairCols;
  const int64_t Lh = (L + 1) / 2;
  uint32_t* kp = reinterpret_cast<uint32_t*>(scratch);  // [DH][Lp]
  uint32_t* vq = kp + DH * Lp;                           // [Lh][D]
  float* s = reinterpret_cast<float*>(vq + Lh * D);      // [kRows][Lp]
  bf16_t* pb = reinterpret_cast<bf16_t*>(s + kRows * Lp);  // [kRows][Lp]
  const bf16_t* q = static_cast<const bf16_t*>(a.q) + t0 * a.sqt + h * a.sqh;
  const bf16_t* k = static_cast<const bf16_t*>(a.k) + t0 * a.skt + h * a.skh;
  const bf16_t* v = static_cast<const bf16_t*>(a.v) + t0 * a.svt + h * a.svh;
  bf16_t* o = static_cast<bf16_t*>(a.out) + t0 * a.sot + h * a.soh;

  for (int64_t j = 0; j < L; ++j)
    for (int i = 0; i < DH; ++i) kp[i * Lp + j] = load_pair(k + j * a.skt + 2 * i);
  for (int i = 0; i < DH; ++i)
    for (int64_t j = L; j < Lp; ++j) kp[i * Lp + j] = 0;
  for (int64_t m = 0; m < Lh; ++m) {
    const bf16_t* v0 = v + 2 * m * a.svt;
    const bool odd_end = 2 * m + 1 >= L;  // the last token of an odd-length sequence pairs with zeros
    for (int c = 0; c < D; ++c)
      vq[m * D + c] = static_cast<uint32_t>(v0[c].bits) |
                      (odd_end ? 0u : static_cast<uint32_t>(v0[a.svt + c].bits) << 16);
  }

  const v8 scale = splat(a.scale), neg_inf = splat(-INFINITY);
  v8i lane;
  for (int i = 0; i < 8; ++i) lane[i] = i;

  for (int64_t i0 = 0; i0 < L; i0 += kRows) {
    const int nr = static_cast<int>(std::min<int64_t>(kRows, L - i0));
    const bf16_t* qr[kRows];
    for (int r = 0; r < kRows; ++r) qr[r] = q + (i0 + std::min(r, nr - 1)) * a.sqt;  // spare rows repeat the last

    for (int64_t j0 = 0; j0 < Lp; j0 += kPairCols) {
      A acc[kRows][2];
      for (int r = 0; r < kRows; ++r) acc[r][0] = acc[r][1] = P::zero();
      for (int i = 0; i < DH; ++i) {
        const uint32_t* kb = kp + i * Lp + j0;
        for (int r = 0; r < kRows; ++r) {
          const uint32_t qp = load_pair(qr[r] + 2 * i);
          acc[r][0] = P::dot(acc[r][0], qp, kb);
          acc[r][1] = P::dot(acc[r][1], qp, kb + 16);
        }
      }
      for (int r = 0; r < nr; ++r) {
        P::store(s + r * Lp + j0, acc[r][0]);
        P::store(s + r * Lp + j0 + 16, acc[r][1]);
      }
    }

    float inv[kRows];
    for (int r = 0; r < nr; ++r) {
      float* sr = s + r * Lp;
      v8 rmax = neg_inf;
      for (int64_t j = 0; j < Lp; j += 8) {
        v8 x = load8(sr + j) * scale;
        if (j + 8 > L) x = (lane + static_cast<int32_t>(j) < static_cast<int32_t>(L)) ? x : neg_inf;
        store8(sr + j, x);
        rmax = vmax(rmax, x);
      }
      const v8 m = splat(hmax(rmax));
      v8 sum8 = {};
      for (int64_t j = 0; j < Lp; j += 8) {
        const v8 p = exp8(load8(sr + j) - m);
        store8(pb + r * Lp + j, p);  // padded columns: exp(-87) ~ 1e-38, against zero V pairs or unused
        sum8 += p;
      }
      inv[r] = 1.0f / hsum(sum8);  // the fp32 sum, as in the float32 kernel
    }

    const bf16_t* pr[kRows];
    for (int r = 0; r < kRows; ++r) pr[r] = pb + std::min(r, nr - 1) * Lp;
    for (int c0 = 0; c0 < D; c0 += 16 * NV) {
      A acc[kRows][NV];
      for (int r = 0; r < kRows; ++r)
        for (int w = 0; w < NV; ++w) acc[r][w] = P::zero();
      for (int64_t m = 0; m < Lh; ++m) {
        const uint32_t* vb = vq + m * D + c0;
        for (int r = 0; r < kRows; ++r) {
          const uint32_t pp = load_pair(pr[r] + 2 * m);
          for (int w = 0; w < NV; ++w) acc[r][w] = P::dot(acc[r][w], pp, vb + 16 * w);
        }
      }
      for (int r = 0; r < nr; ++r) {
        float t[16 * NV];
        for (int w = 0; w < NV; ++w) P::store(t + 16 * w, acc[r][w]);
        bf16_t* dst = o + (i0 + r) * a.sot + c0;
        for (int c = 0; c < 16 * NV; c += 8) store8(dst + c, load8(t + c) * splat(inv[r]));
      }
    }
  }
}

template <typename P>
PE_INLINE void attend_pairs_any(const AttnArgs& a, int64_t t0, int64_t L, int64_t h, float* scratch) {
  switch (a.D) {
    case 16: attend_pairs<2, P>(a, t0, L, h, scratch); break;
    case 32: attend_pairs<4, P>(a, t0, L, h, scratch); break;
    case 64: attend_pairs<8, P>(a, t0, L, h, scratch); break;
    default: attend_pairs<16, P>(a, t0, L, h, scratch); break;
  }
}

void task_pairs_emulated(const AttnArgs& a, int64_t t0, int64_t L, int64_t h, float* scratch) {
  attend_pairs_any<PairDotEmulated>(a, t0, L, h, scratch);
}

#if defined(__x86_64__) && defined(__GNUC__)
// flatten: the policy's intrinsics (AVX-512 targets) may only inline into an AVX-512 function, so
// they are plain inline and this task pulls the whole kernel, them included, into itself.
PE_AVX512_BF16 __attribute__((flatten)) void task_avx512_bf16(
    const AttnArgs& a, int64_t t0, int64_t L, int64_t h, float* scratch) {
  attend_pairs_any<PairDotAvx512>(a, t0, L, h, scratch);
}
#endif

std::atomic<bool> g_pair_dot_emulated{false};

// bf16 takes the pair-dot build where the CPU has AVX512-BF16 at the current level (or the emulated
// one under the test hook); everything else the fp32 code of the best build.
template <typename E>
TaskFn pick_task() {
  if (std::is_same<E, bf16_t>::value) {
    if (g_pair_dot_emulated.load()) return task_pairs_emulated;
#if defined(__x86_64__) && defined(__GNUC__)
    if (cpu_has_avx512_bf16()) return task_avx512_bf16;
#endif
  }
#if defined(__x86_64__) && defined(__GNUC__)
  if (cpu_isa() >= Isa::kAvx2) return task_avx2<E>;
#endif
  return task_baseline<E>;
}

bool uses_pair_dot(const AttnArgs& a) { return a.dtype == kBF16 && (g_pair_dot_emulated.load() || cpu_has_avx512_bf16()); }

}  // namespace

bool set_attention_pair_dot_emulated(bool on) { return g_pair_dot_emulated.exchange(on); }

void varlen_attention_cpu(const AttnArgs& a) {
  const TaskFn task = a.dtype == kBF16 ? pick_task<bf16_t>() : pick_task<float>();
  const bool pairs = uses_pair_dot(a);
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
      const size_t need = pairs ? pair_scratch_floats(L, a.D) : scratch_floats(L, a.D);
      if (scratch.size() < need) scratch.resize(need);
      task(a, t0, L, h, scratch.data());
    }
  }
}

}  // namespace postembed
