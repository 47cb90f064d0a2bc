// CPU exact top-k scans over a code database (EmbeddingIndex): for every query the k best rows by
//   binary:  8 * bytes - popcount(q XOR x)          (int32; packed sign bits, any byte count)
//   int8:    q . x + bias[row]                      (int32; raw integer dot + per-row correction)
//   float32: q . x                                  (float)
//   sign-dot: sum_d q_d * (bit_d ? +1 : -1)         (int32; int8 query [8 * bytes], packed-bit rows)
//   rabitq:  row_scale * (q_scale * sign-dot) + row_add + q_add   (float; csrc/rabitq_cpu.cpp)
//   gated sign-dot: sign-dot, for the rows whose binary score against the query's bits reaches its
//            gate only (the Hamming pre-filter of binary search, fused: the Hamming tile is scored
//            as binary's, and a row that passes is scored by the sign-dot right there, in cache)
// best first, ties broken by the lower row index; rows with allow[row] == 0 are skipped inside
// the scan; fewer than k candidates: the rest of the row is index -1 with the lowest score
// (INT32_MIN / -inf).
//
// The [nq, N] score matrix never exists: each OpenMP thread owns a contiguous range of database
// rows (std::thread, see topk_typed), scores it tile by tile (kRowTile rows x kQ queries, the rows stay in L1 while every query
// passes over them) and keeps the k best per query lazily (TopK: most rows are rejected by one
// compare against a threshold). The per-thread candidates are then merged per query.
//
// Sign-dot (asymmetric binary search: a float query quantized to int8 against sign codes) by bit
// planes: with u_d = q_d + 128 in [0, 255] and plane_p = the bits p of u packed like the codes,
//   sum_d u_d b_d = sum_p 2^p popcount(plane_p & b),   sum_d q_d b_d = that - 128 popcount(b),
//   score = 2 sum_d q_d b_d - sum_d q_d.
// 8 AND+popcounts per code word and query (Hamming: 1) plus one popcount(b) per row shared by
// the queries; integers all the way, so the score is exact.
//
// One source, three builds (as csrc/attention_cpu.cpp), picked at run time by topk_cpu_level():
// the baseline ISA; on x86-64 AVX2 + POPCNT (+FMA); and AVX-512 (F/BW/VL/DQ) with VPOPCNTDQ and
// VNNI (Ice Lake, Sapphire Rapids, Zen 4 and newer; a CPU with AVX-512 but without either runs the
// AVX2 build). The plain loops are vectorized by the compiler per build; the hot scorers are
// written with intrinsics per build: binary by vpshufb nibble counts (AVX2) or vpopcntq (AVX-512)
// on a transposed tile; int8 by vpmovsxbw + vpmaddwd (AVX2) or vpdpbusd (AVX-512 VNNI: unsigned
// query q + 128 against the signed codes, minus 128 sum(x)); sign-dot by byte expansion + vpmaddubsw
// (AVX2) or mask expansion + vpdpbusd (AVX-512). Every build is exact: the same integer scores.
#include <algorithm>
#include <climits>
#include <limits>
#include <cmath>
#include <cstring>
#include <vector>

#include <thread>
#include <type_traits>

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#endif

#include "kernels.h"

namespace postembed {
namespace {

#define PE_INLINE inline __attribute__((always_inline))

constexpr int kQ = 8;           // queries scored together against each database row (binary: two passes of 4)
constexpr int64_t kRowTile = 256;  // database rows per tile

template <typename S>
struct Cand {
  S s;
  int64_t i;
};

template <typename S>
PE_INLINE bool better(const Cand<S>& a, const Cand<S>& b) {
  return a.s > b.s || (a.s == b.s && a.i < b.i);
}

template <typename S>
struct Better {
  bool operator()(const Cand<S>& a, const Cand<S>& b) const { return better(a, b); }
};

// The k best candidates of one query in one thread. Small k: a bounded heap with the worst on top
// (Better as the heap's "less"). Large k (a rescore's first stage keeps hundreds): lazily, a
// candidate that beats the threshold is appended to a buffer of 2k; when it fills, nth_element
// keeps the k best and the k-th becomes the threshold: O(1) amortized per accepted candidate
// against the heap's O(log k) (measured, binary, 256 queries x 100k rows, 2 threads: k = 250 took
// 44 ms with the heap, 32 ms lazily; k = 1 takes 17 ms).
constexpr int64_t kLazyTopK = 32;  // k above this: the lazy buffer
PE_INLINE int64_t lazy_capacity(int64_t k) { return 2 * k; }  // (k + 128 .. k + 1024 measured no faster)
template <typename S>
struct TopK {
  Cand<S>* c;  // capacity lazy_capacity(k)
  int64_t n;
  S thr;  // once full: no candidate at or below it can enter
  bool full;
  // Rows arrive in increasing order within a thread, so a candidate tying the k-th best comes later
  // and loses: once full, only s > thr can enter.
  PE_INLINE bool rejects(S s) const { return full && !(s > thr); }
  PE_INLINE void offer(S s, int64_t i, int64_t k) {
    const Cand<S> x{s, i};
    if (k > kLazyTopK) {
      c[n++] = x;
      if (n == lazy_capacity(k)) {
        std::nth_element(c, c + (k - 1), c + n, Better<S>());
        n = k;
        thr = c[k - 1].s;
        full = true;
      }
      return;
    }
    if (n < k) {
      c[n++] = x;
      std::push_heap(c, c + n, Better<S>());
    } else if (better(x, c[0])) {
      std::pop_heap(c, c + n, Better<S>());
      c[n - 1] = x;
      std::push_heap(c, c + n, Better<S>());
    }
    if (n == k) {
      full = true;
      thr = c[0].s;
    }
  }
};

// Calls f with std::integral_constant<int, NQ> for the scorers' query-count builds: 1, 2, 4 or kQ
// (NQ >= nq; the unused accumulators of a build score copies of the last query and are not stored).
template <typename F>
PE_INLINE void by_query_count(int nq, F&& f) {
  if (nq == 1)
    f(std::integral_constant<int, 1>());
  else if (nq == 2)
    f(std::integral_constant<int, 2>());
  else if (nq <= 4)
    f(std::integral_constant<int, 4>());
  else
    f(std::integral_constant<int, kQ>());
}

typedef float v8 __attribute__((vector_size(32)));

PE_INLINE v8 load8(const float* p) {
  v8 v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

// ---- scorers: scores of nq (<= kQ) queries against rows [r0, r0 + nr) into out[q][r - r0] ----

// Binary: q and x as uint64 words, W per row (zero-padded past the last byte in both).
template <int W>
PE_INLINE void score_binary_w(const uint64_t* const* q, int nq, const uint64_t* x, int64_t nr, int64_t Wd,
                              int32_t total_bits, int32_t* out) {
  const int64_t words = W > 0 ? W : Wd;
  for (int j0 = 0; j0 < nq; j0 += 4) {
    const uint64_t *q0 = q[j0], *q1 = q[j0 + 1], *q2 = q[j0 + 2], *q3 = q[j0 + 3];
    const int nj = std::min(4, nq - j0);
    for (int64_t r = 0; r < nr; ++r) {
      const uint64_t* xr = x + r * words;
      int32_t a0 = 0, a1 = 0, a2 = 0, a3 = 0;
      for (int64_t w = 0; w < words; ++w) {
        const uint64_t xw = xr[w];
        a0 += __builtin_popcountll(q0[w] ^ xw);
        a1 += __builtin_popcountll(q1[w] ^ xw);
        a2 += __builtin_popcountll(q2[w] ^ xw);
        a3 += __builtin_popcountll(q3[w] ^ xw);
      }
      const int32_t acc[4] = {a0, a1, a2, a3};
      for (int j = 0; j < nj; ++j) out[(j0 + j) * kRowTile + r] = total_bits - acc[j];
    }
  }
}

PE_INLINE void score_binary(const uint64_t* const* q, int nq, const uint64_t* x, int64_t nr, int64_t W,
                            int32_t total_bits, int32_t* out) {
  switch (W) {
    case 1: score_binary_w<1>(q, nq, x, nr, W, total_bits, out); break;
    case 2: score_binary_w<2>(q, nq, x, nr, W, total_bits, out); break;
    case 4: score_binary_w<4>(q, nq, x, nr, W, total_bits, out); break;
    case 6: score_binary_w<6>(q, nq, x, nr, W, total_bits, out); break;
    case 8: score_binary_w<8>(q, nq, x, nr, W, total_bits, out); break;
    case 12: score_binary_w<12>(q, nq, x, nr, W, total_bits, out); break;
    case 16: score_binary_w<16>(q, nq, x, nr, W, total_bits, out); break;
    default: score_binary_w<0>(q, nq, x, nr, W, total_bits, out); break;
  }
}

// Sign-dot: q[j] is the query's prepared block: 8 planes of W words, then sum_d q_d (as one word).
template <int W>
PE_INLINE void score_signdot_w(const uint64_t* const* q, int nq, const uint64_t* x, int64_t nr, int64_t Wd,
                               int32_t* out) {
  const int64_t words = W > 0 ? W : Wd;
  for (int64_t r = 0; r < nr; ++r) {
    const uint64_t* xr = x + r * words;
    int32_t pb = 0;
    for (int64_t w = 0; w < words; ++w) pb += __builtin_popcountll(xr[w]);
    for (int j = 0; j < nq; ++j) {
      const uint64_t* qj = q[j];
      int32_t ub = 0;  // sum_d u_d b_d
      for (int p = 0; p < 8; ++p) {
        const uint64_t* plane = qj + p * words;
        int32_t c = 0;
        for (int64_t w = 0; w < words; ++w) c += __builtin_popcountll(plane[w] & xr[w]);
        ub += c << p;
      }
      const int32_t sumq = static_cast<int32_t>(static_cast<int64_t>(qj[8 * words]));
      out[j * kRowTile + r] = 2 * (ub - 128 * pb) - sumq;
    }
  }
}

PE_INLINE void score_signdot(const uint64_t* const* q, int nq, const uint64_t* x, int64_t nr, int64_t W,
                             int32_t* out) {
  switch (W) {
    case 1: score_signdot_w<1>(q, nq, x, nr, W, out); break;
    case 2: score_signdot_w<2>(q, nq, x, nr, W, out); break;
    case 4: score_signdot_w<4>(q, nq, x, nr, W, out); break;
    case 6: score_signdot_w<6>(q, nq, x, nr, W, out); break;
    case 8: score_signdot_w<8>(q, nq, x, nr, W, out); break;
    case 12: score_signdot_w<12>(q, nq, x, nr, W, out); break;
    case 16: score_signdot_w<16>(q, nq, x, nr, W, out); break;
    default: score_signdot_w<0>(q, nq, x, nr, W, out); break;
  }
}

// int8: q.x in int32 (products of int8 fit int16, their sums int32 for D < 2^17).
PE_INLINE void score_int8(const int8_t* const* q, int nq, const int8_t* x, int64_t ldx, int64_t nr, int64_t D,
                          const int32_t* bias, int32_t* out) {
  for (int64_t r = 0; r < nr; ++r) {
    const int8_t* xr = x + r * ldx;
    int32_t acc[kQ] = {};
    for (int j = 0; j < kQ; ++j) {
      const int8_t* qj = q[j];
      int32_t a = 0;
      for (int64_t d = 0; d < D; ++d) a += static_cast<int32_t>(qj[d]) * static_cast<int32_t>(xr[d]);
      acc[j] = a;
    }
    const int32_t b = bias ? bias[r] : 0;
    for (int j = 0; j < nq; ++j) out[j * kRowTile + r] = acc[j] + b;
  }
}

#if defined(__x86_64__) && defined(__GNUC__)
// AVX2 int8: queries pre-widened to int16 (zero-padded to a multiple of 16), each database row
// widened once (vpmovsxbw) and multiplied with every query by vpmaddwd: exact int32 sums.
template <int NQ>
__attribute__((target("avx2"))) void score_int8_avx2_n(const int16_t* const* q, int nq, const int8_t* x, int64_t ldx,
                                                       int64_t nr, int64_t D, const int32_t* bias, int32_t* out) {
  const int64_t D16 = D / 16 * 16;
  for (int64_t r = 0; r < nr; ++r) {
    const int8_t* xr = x + r * ldx;
    __m256i acc[NQ];
    for (int j = 0; j < NQ; ++j) acc[j] = _mm256_setzero_si256();
    for (int64_t d = 0; d < D16; d += 16) {
      const __m256i xv = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(xr + d)));
      for (int j = 0; j < NQ; ++j)
        acc[j] = _mm256_add_epi32(acc[j], _mm256_madd_epi16(
                                              _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q[j] + d)), xv));
    }
    if (D16 < D) {  // the tail through a zeroed copy: never read past the row
      alignas(16) int8_t tmp[16] = {};
      std::memcpy(tmp, xr + D16, static_cast<size_t>(D - D16));
      const __m256i xv = _mm256_cvtepi8_epi16(_mm_load_si128(reinterpret_cast<const __m128i*>(tmp)));
      for (int j = 0; j < NQ; ++j)
        acc[j] = _mm256_add_epi32(acc[j], _mm256_madd_epi16(
                                              _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q[j] + D16)), xv));
    }
    const int32_t b = bias ? bias[r] : 0;
    for (int j = 0; j < nq; ++j) {
      __m128i v = _mm_add_epi32(_mm256_castsi256_si128(acc[j]), _mm256_extracti128_si256(acc[j], 1));
      v = _mm_add_epi32(v, _mm_shuffle_epi32(v, 0x4E));
      v = _mm_add_epi32(v, _mm_shuffle_epi32(v, 0xB1));
      out[j * kRowTile + r] = _mm_cvtsi128_si32(v) + b;
    }
  }
}
void score_int8_avx2(const int16_t* const* q, int nq, const int8_t* x, int64_t ldx, int64_t nr, int64_t D,
                     const int32_t* bias, int32_t* out) {
  by_query_count(nq, [&](auto n) { score_int8_avx2_n<decltype(n)::value>(q, nq, x, ldx, nr, D, bias, out); });
}
#endif

#if defined(__x86_64__) && defined(__GNUC__)
// AVX2 binary on a transposed tile: xt[w * kRowTile + r] is word w of row r, so one ymm holds word w
// of 4 consecutive rows and a query word is broadcast against it. Popcount by nibble lookups
// (vpshufb), byte counts accumulated over up to 31 words (<= 248 per byte), then summed per row
// by vpsadbw: about 2 instructions per (query, row, word) against ~5 for scalar popcnt.
__attribute__((target("avx2"))) void score_binary_avx2(const uint64_t* const* q, int nq, const uint64_t* xt,
                                                       int64_t W, int32_t total_bits, int32_t* out) {
  const __m256i lut = _mm256_setr_epi8(0, 1, 1, 2, 1, 2, 2, 3, 1, 2, 2, 3, 2, 3, 3, 4, 0, 1, 1, 2, 1, 2, 2, 3, 1, 2,
                                       2, 3, 2, 3, 3, 4);
  const __m256i low4 = _mm256_set1_epi8(0x0f);
  const __m256i zero = _mm256_setzero_si256();
  const __m256i total = _mm256_set1_epi32(total_bits);
  const __m256i order = _mm256_setr_epi32(0, 2, 4, 6, 1, 3, 5, 7);
  for (int j = 0; j < nq; ++j) {
    const uint64_t* qj = q[j];
    for (int64_t r0 = 0; r0 < kRowTile; r0 += 16) {
      __m256i sum[4] = {zero, zero, zero, zero};
      for (int64_t w0 = 0; w0 < W; w0 += 31) {
        const int64_t w1 = std::min<int64_t>(W, w0 + 31);
        __m256i acc[4] = {zero, zero, zero, zero};
        for (int64_t w = w0; w < w1; ++w) {
          const __m256i qv = _mm256_set1_epi64x(static_cast<long long>(qj[w]));
          const uint64_t* xw = xt + w * kRowTile + r0;
          for (int i = 0; i < 4; ++i) {
            const __m256i v = _mm256_xor_si256(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(xw + 4 * i)), qv);
            const __m256i lo = _mm256_shuffle_epi8(lut, _mm256_and_si256(v, low4));
            const __m256i hi = _mm256_shuffle_epi8(lut, _mm256_and_si256(_mm256_srli_epi16(v, 4), low4));
            acc[i] = _mm256_add_epi8(acc[i], _mm256_add_epi8(lo, hi));
          }
        }
        for (int i = 0; i < 4; ++i) sum[i] = _mm256_add_epi64(sum[i], _mm256_sad_epu8(acc[i], zero));
      }
      // qword counts of rows (0..3), (4..7) -> 8 int32 in row order, then total - count
      for (int h = 0; h < 2; ++h) {
        const __m256i t = _mm256_or_si256(sum[2 * h], _mm256_slli_epi64(sum[2 * h + 1], 32));
        const __m256i c = _mm256_permutevar8x32_epi32(t, order);
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + j * kRowTile + r0 + 8 * h), _mm256_sub_epi32(total, c));
      }
    }
  }
}
#endif

#if defined(__x86_64__) && defined(__GNUC__)
// AVX2 sign-dot: q[j] is the query's prepared block: u_d = q_d + 128 as bytes (8 W words, zero past
// the last dimension), then sum_d q_d. Each database row's 32-bit chunks are expanded once to 32
// bytes (0xFF where the bit is set: broadcast, vpshufb, AND with the bit of each position, compare)
// and multiplied with every query by vpmaddubsw (u unsigned x {0, -1} signed: pair sums in
// [-510, 0], no saturation), summed in int16 over at most 64 chunks (>= -32640), then to int32.
template <int NQ>
__attribute__((target("avx2,popcnt"))) void score_signdot_avx2_n(const uint64_t* const* q, int nq,
                                                                  const uint64_t* x, int64_t nr, int64_t W,
                                                                  int32_t* out) {
  const __m256i spread = _mm256_setr_epi8(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 2, 2, 2, 2, 2, 2, 2, 2, 3,
                                          3, 3, 3, 3, 3, 3, 3);
  const __m256i bit = _mm256_set1_epi64x(static_cast<long long>(0x0102040810204080ULL));  // MSB first
  const __m256i ones16 = _mm256_set1_epi16(1);
  const int64_t chunks = 2 * W;  // 32 dimensions each
  for (int64_t r = 0; r < nr; ++r) {
    const uint64_t* xr = x + r * W;
    const uint8_t* xb = reinterpret_cast<const uint8_t*>(xr);
    int32_t pb = 0;
    for (int64_t w = 0; w < W; ++w) pb += static_cast<int32_t>(_mm_popcnt_u64(xr[w]));
    int32_t ub[NQ] = {};
    for (int64_t c0 = 0; c0 < chunks; c0 += 64) {
      const int64_t c1 = std::min<int64_t>(chunks, c0 + 64);
      __m256i acc[NQ];
      for (int j = 0; j < NQ; ++j) acc[j] = _mm256_setzero_si256();
      for (int64_t c = c0; c < c1; ++c) {
        uint32_t word;
        std::memcpy(&word, xb + 4 * c, 4);
        const __m256i rep = _mm256_shuffle_epi8(_mm256_set1_epi32(static_cast<int>(word)), spread);
        const __m256i b = _mm256_cmpeq_epi8(_mm256_and_si256(rep, bit), bit);  // -1 where set
        for (int j = 0; j < NQ; ++j) {
          const __m256i u = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(
              reinterpret_cast<const uint8_t*>(q[j]) + 32 * c));
          acc[j] = _mm256_add_epi16(acc[j], _mm256_maddubs_epi16(u, b));
        }
      }
      for (int j = 0; j < NQ; ++j) {
        const __m256i s32 = _mm256_madd_epi16(acc[j], ones16);
        __m128i v = _mm_add_epi32(_mm256_castsi256_si128(s32), _mm256_extracti128_si256(s32, 1));
        v = _mm_add_epi32(v, _mm_shuffle_epi32(v, 0x4E));
        v = _mm_add_epi32(v, _mm_shuffle_epi32(v, 0xB1));
        ub[j] -= _mm_cvtsi128_si32(v);
      }
    }
    for (int j = 0; j < nq; ++j) {
      const int32_t sumq = static_cast<int32_t>(static_cast<int64_t>(q[j][8 * W]));
      out[j * kRowTile + r] = 2 * (ub[j] - 128 * pb) - sumq;
    }
  }
}
void score_signdot_avx2(const uint64_t* const* q, int nq, const uint64_t* x, int64_t nr, int64_t W, int32_t* out) {
  by_query_count(nq, [&](auto n) { score_signdot_avx2_n<decltype(n)::value>(q, nq, x, nr, W, out); });
}
#endif

#if defined(__x86_64__) && defined(__GNUC__)
#define PE_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,avx512vpopcntdq,avx2,fma,popcnt")))

PE_AVX512 PE_INLINE int32_t hsum_epi32(__m512i v) {
  __m256i h = _mm256_add_epi32(_mm512_castsi512_si256(v), _mm512_extracti64x4_epi64(v, 1));
  __m128i x = _mm_add_epi32(_mm256_castsi256_si128(h), _mm256_extracti128_si256(h, 1));
  x = _mm_add_epi32(x, _mm_shuffle_epi32(x, 0x4E));
  x = _mm_add_epi32(x, _mm_shuffle_epi32(x, 0xB1));
  return _mm_cvtsi128_si32(x);
}

// AVX-512 binary on the transposed tile of score_binary_avx2: one zmm holds word w of 8
// consecutive rows; XOR with the broadcast query word, vpopcntq, add: 3 instructions per (query,
// 8 rows, word). 32 rows per pass (4 independent accumulator chains).
PE_AVX512 void score_binary_avx512(const uint64_t* const* q, int nq, const uint64_t* xt, int64_t W,
                                   int32_t total_bits, int32_t* out) {
  const __m512i total = _mm512_set1_epi32(total_bits);
  for (int j = 0; j < nq; ++j) {
    const uint64_t* qj = q[j];
    for (int64_t r0 = 0; r0 < kRowTile; r0 += 32) {
      __m512i acc[4] = {_mm512_setzero_si512(), _mm512_setzero_si512(), _mm512_setzero_si512(),
                        _mm512_setzero_si512()};
      for (int64_t w = 0; w < W; ++w) {
        const __m512i qv = _mm512_set1_epi64(static_cast<long long>(qj[w]));
        const uint64_t* xw = xt + w * kRowTile + r0;
        for (int i = 0; i < 4; ++i)
          acc[i] = _mm512_add_epi64(acc[i], _mm512_popcnt_epi64(_mm512_xor_si512(_mm512_loadu_si512(xw + 8 * i), qv)));
      }
      for (int h = 0; h < 2; ++h) {  // 16 int64 counts -> 16 int32 in row order
        const __m512i c = _mm512_inserti64x4(_mm512_castsi256_si512(_mm512_cvtepi64_epi32(acc[2 * h])),
                                             _mm512_cvtepi64_epi32(acc[2 * h + 1]), 1);
        _mm512_storeu_si512(out + j * kRowTile + r0 + 16 * h, _mm512_sub_epi32(total, c));
      }
    }
  }
}

// AVX-512 VNNI int8: q[j] is the query as unsigned bytes u = q + 128, zero-padded to a multiple of
// 64. vpdpbusd sums u * x (unsigned x signed, 4 products into each int32, no saturation); the
// row's own sum(x) comes from the same instruction against a vector of ones, so
// q . x = u . x - 128 sum(x) exactly. The last chunk of a row is a masked load (never read past it).
template <int NQ>
PE_AVX512 void score_int8_avx512_n(const uint8_t* const* q, int nq, const int8_t* x, int64_t ldx, int64_t nr,
                                   int64_t D, const int32_t* bias, int32_t* out) {
  const __m512i ones = _mm512_set1_epi8(1);
  const int64_t chunks = (D + 63) / 64;
  const __mmask64 tail = D % 64 ? (~__mmask64{0} >> (64 - D % 64)) : ~__mmask64{0};
  for (int64_t r = 0; r < nr; ++r) {
    const int8_t* xr = x + r * ldx;
    __m512i sx = _mm512_setzero_si512();
    __m512i acc[NQ];
    for (int j = 0; j < NQ; ++j) acc[j] = _mm512_setzero_si512();
    for (int64_t c = 0; c < chunks; ++c) {
      const __m512i xv = c + 1 < chunks ? _mm512_loadu_si512(xr + 64 * c) : _mm512_maskz_loadu_epi8(tail, xr + 64 * c);
      sx = _mm512_dpbusd_epi32(sx, ones, xv);
      for (int j = 0; j < NQ; ++j) acc[j] = _mm512_dpbusd_epi32(acc[j], _mm512_loadu_si512(q[j] + 64 * c), xv);
    }
    const __m512i s128 = _mm512_slli_epi32(sx, 7);
    const int32_t b = bias ? bias[r] : 0;
    for (int j = 0; j < nq; ++j) out[j * kRowTile + r] = hsum_epi32(_mm512_sub_epi32(acc[j], s128)) + b;
  }
}
void score_int8_avx512(const uint8_t* const* q, int nq, const int8_t* x, int64_t ldx, int64_t nr, int64_t D,
                       const int32_t* bias, int32_t* out) {
  by_query_count(nq, [&](auto n) { score_int8_avx512_n<decltype(n)::value>(q, nq, x, ldx, nr, D, bias, out); });
}

// AVX-512 sign-dot: q[j] is the query's prepared block: u_d = q_d + 128 as bytes in 8 W words, the
// 8 bytes of each code byte in reversed order (code byte i, bit b <-> dimension 8 i + 7 - b: byte
// 8 i + b of the block), so a code word read as a 64-bit mask selects exactly its set dimensions;
// then sum_d q_d. Per row and word: vmovdqu8 {k} expands the bits to bytes of 1 (shared by the
// queries), then one vpdpbusd per query sums u_d over the set bits.
template <int NQ>
PE_AVX512 void score_signdot_avx512_n(const uint64_t* const* q, int nq, const uint64_t* x, int64_t nr, int64_t W,
                                      int32_t* out) {
  const __m512i ones = _mm512_set1_epi8(1);
  for (int64_t r = 0; r < nr; ++r) {
    const uint64_t* xr = x + r * W;
    int32_t pb = 0;
    __m512i acc[NQ];
    for (int j = 0; j < NQ; ++j) acc[j] = _mm512_setzero_si512();
    for (int64_t w = 0; w < W; ++w) {
      pb += static_cast<int32_t>(_mm_popcnt_u64(xr[w]));
      const __m512i b = _mm512_maskz_mov_epi8(static_cast<__mmask64>(xr[w]), ones);
      for (int j = 0; j < NQ; ++j) acc[j] = _mm512_dpbusd_epi32(acc[j], _mm512_loadu_si512(q[j] + 8 * w), b);
    }
    for (int j = 0; j < nq; ++j) {
      const int32_t sumq = static_cast<int32_t>(static_cast<int64_t>(q[j][8 * W]));
      out[j * kRowTile + r] = 2 * (hsum_epi32(acc[j]) - 128 * pb) - sumq;
    }
  }
}
void score_signdot_avx512(const uint64_t* const* q, int nq, const uint64_t* x, int64_t nr, int64_t W, int32_t* out) {
  by_query_count(nq, [&](auto n) { score_signdot_avx512_n<decltype(n)::value>(q, nq, x, nr, W, out); });
}

// AVX-512 float32: 16-wide FMA partial sums per query, the row's tail by a masked load.
template <int NQ>
PE_AVX512 void score_float_avx512_n(const float* const* q, int nq, const float* x, int64_t ldx, int64_t nr,
                                    int64_t D, float* out) {
  const int64_t chunks = (D + 15) / 16;
  const __mmask16 tail = D % 16 ? static_cast<__mmask16>((1u << (D % 16)) - 1) : static_cast<__mmask16>(0xFFFF);
  for (int64_t r = 0; r < nr; ++r) {
    const float* xr = x + r * ldx;
    __m512 acc[NQ];
    for (int j = 0; j < NQ; ++j) acc[j] = _mm512_setzero_ps();
    for (int64_t c = 0; c < chunks; ++c) {
      const __mmask16 m = c + 1 < chunks ? static_cast<__mmask16>(0xFFFF) : tail;
      const __m512 xv = _mm512_maskz_loadu_ps(m, xr + 16 * c);
      for (int j = 0; j < NQ; ++j) acc[j] = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, q[j] + 16 * c), xv, acc[j]);
    }
    for (int j = 0; j < nq; ++j) out[j * kRowTile + r] = _mm512_reduce_add_ps(acc[j]);
  }
}
void score_float_avx512(const float* const* q, int nq, const float* x, int64_t ldx, int64_t nr, int64_t D,
                        float* out) {
  by_query_count(nq, [&](auto n) { score_float_avx512_n<decltype(n)::value>(q, nq, x, ldx, nr, D, out); });
}
#endif

// float32: 8-wide partial sums, then the tail.
PE_INLINE void score_float(const float* const* q, int nq, const float* x, int64_t ldx, int64_t nr, int64_t D,
                           float* out) {
  const int64_t D8 = D / 8 * 8;
  for (int64_t r = 0; r < nr; ++r) {
    const float* xr = x + r * ldx;
    v8 acc[kQ] = {};
    for (int64_t d = 0; d < D8; d += 8) {
      const v8 xv = load8(xr + d);
      for (int j = 0; j < kQ; ++j) acc[j] += load8(q[j] + d) * xv;
    }
    for (int j = 0; j < nq; ++j) {
      float s = 0.f;
      for (int i = 0; i < 8; ++i) s += acc[j][i];
      for (int64_t d = D8; d < D; ++d) s += q[j][d] * xr[d];
      out[j * kRowTile + r] = s;
    }
  }
}

// ---- the scan -------------------------------------------------------------------------------

template <typename S>
PE_INLINE void offer_one(TopK<S>& h, S s, int64_t row, const uint8_t* allow, int64_t k) {
  if (h.rejects(s)) return;
  if (allow && !allow[row]) return;
  h.offer(s, row, k);
}

// Rows [r, nr) of one query's tile scores once its candidates are full: almost every score is
// rejected, so the vector builds compare 16 (AVX-512) or 8 (AVX2) scores with the threshold at once
// and visit only those above it, in row order (the threshold only rises, so the mask is a superset
// and each visited score is checked again; NaN is never above, as !(s > thr) rejects it). Measured
// (binary, 256 queries x 100k rows, AVX-512, 1 thread): the one-compare-per-score loop took twice
// as long as the scoring itself. Returns the first row not visited.
#if defined(__x86_64__) && defined(__GNUC__)
PE_AVX512 PE_INLINE uint32_t above(const int32_t* t, int32_t thr, std::integral_constant<int, 16>) {
  return _mm512_cmpgt_epi32_mask(_mm512_loadu_si512(t), _mm512_set1_epi32(thr));
}
PE_AVX512 PE_INLINE uint32_t above(const float* t, float thr, std::integral_constant<int, 16>) {
  return _mm512_cmp_ps_mask(_mm512_loadu_ps(t), _mm512_set1_ps(thr), _CMP_GT_OQ);
}
__attribute__((target("avx2"))) PE_INLINE uint32_t above(const int32_t* t, int32_t thr, std::integral_constant<int, 8>) {
  const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(t));
  return static_cast<uint32_t>(_mm256_movemask_ps(_mm256_castsi256_ps(_mm256_cmpgt_epi32(v, _mm256_set1_epi32(thr)))));
}
__attribute__((target("avx2"))) PE_INLINE uint32_t above(const float* t, float thr, std::integral_constant<int, 8>) {
  return static_cast<uint32_t>(_mm256_movemask_ps(_mm256_cmp_ps(_mm256_loadu_ps(t), _mm256_set1_ps(thr), _CMP_GT_OQ)));
}
// (the loop is written in each target function: GCC inlines a target-specific intrinsic only into a
// function compiled for that target)
#define PE_OFFER_MASKED(V)                                        \
  for (; r + (V) <= nr; r += (V)) {                               \
    uint32_t m = above(t + r, h.thr, std::integral_constant<int, (V)>()); \
    while (m) {                                                   \
      const int b = __builtin_ctz(m);                             \
      m &= m - 1;                                                 \
      offer_one(h, t[r + b], r0 + r + b, allow, k);               \
    }                                                             \
  }                                                               \
  return r;
template <typename S>
PE_AVX512 int64_t offer_masked_avx512(TopK<S>& h, const S* t, int64_t r, int64_t nr, int64_t r0, const uint8_t* allow,
                                      int64_t k) {
  PE_OFFER_MASKED(16)
}
template <typename S>
__attribute__((target("avx2"))) int64_t offer_masked_avx2(TopK<S>& h, const S* t, int64_t r, int64_t nr, int64_t r0,
                                                          const uint8_t* allow, int64_t k) {
  PE_OFFER_MASKED(8)
}
#undef PE_OFFER_MASKED
#endif

// Rows [0, nr) of a tile (row r at src + r * lddb, cols bytes) as uint64 words zero-padded to W, rows
// past nr zero: transposed (word w of row r at x[w * kRowTile + r], the vector Hamming scorers) or
// row-major (x[r * W + w]). Word by word: a fixed 8-byte copy is one load where a row-sized memcpy
// is a `rep movs` (measured: as costly as scoring the tile at 384-d).
PE_INLINE void load_tile_words(const uint8_t* src, int64_t lddb, int64_t cols, int64_t nr, int64_t W, bool transposed,
                               uint64_t* x) {
  const int64_t whole = cols / 8, tail = cols - 8 * whole;
  const int64_t rs = transposed ? 1 : W, ws = transposed ? kRowTile : 1;
  for (int64_t r = 0; r < nr; ++r) {
    const uint8_t* row = src + r * lddb;
    for (int64_t w = 0; w < whole; ++w) {
      uint64_t v;
      std::memcpy(&v, row + 8 * w, 8);
      x[r * rs + w * ws] = v;
    }
    if (tail) {
      uint64_t v = 0;
      std::memcpy(&v, row + 8 * whole, static_cast<size_t>(tail));
      x[r * rs + whole * ws] = v;
    }
  }
  for (int64_t r = nr; r < kRowTile; ++r)
    for (int64_t w = 0; w < W; ++w) x[r * rs + w * ws] = 0;
}

// Gated sign-dot: the rows of one tile whose Hamming score (tile) reaches the query's gate get their
// sign-dot score (one row, one query: the build's scorer) offered to the query's candidates. Few rows
// pass (the gate keeps about f * k * r of N), so the compare is the cost: vectorized as above.
template <int ISA>
PE_INLINE int32_t signdot_one(const TopkArgs& a, int64_t i, int64_t row, uint64_t* rowbuf) {
  const int64_t W = (a.cols + 7) / 8;
  const uint8_t* src = static_cast<const uint8_t*>(a.db) + row * a.lddb;
  const uint64_t* xr = reinterpret_cast<const uint64_t*>(src);  // in place as scan_range reads words
  if (a.cols % 8 != 0) {
    rowbuf[W - 1] = 0;
    std::memcpy(rowbuf, src, static_cast<size_t>(a.cols));
    xr = rowbuf;
  }
  const uint64_t* qp[1] = {a.sd_prep + i * a.sd_pitch};
  int32_t s;
#if defined(__x86_64__) && defined(__GNUC__)
  if constexpr (ISA >= 2) {
    score_signdot_avx512(qp, 1, xr, 1, W, &s);
    return s;
  } else if constexpr (ISA == 1) {
    score_signdot_avx2(qp, 1, xr, 1, W, &s);
    return s;
  }
#endif
  score_signdot(qp, 1, xr, 1, W, &s);
  return s;
}
template <int ISA>
PE_INLINE void gated_hit(const TopkArgs& a, TopK<int32_t>& h, int64_t i, int64_t row, uint64_t* rowbuf) {
  if (a.allow && !a.allow[row]) return;
  const int32_t s = signdot_one<ISA>(a, i, row, rowbuf);
  if (!h.rejects(s)) h.offer(s, row, a.k);
}
#if defined(__x86_64__) && defined(__GNUC__)
// AVX-512: the passing (query, row) pairs of a block of queries x one tile are listed first (compare +
// in-register compress), then scored kGateRows pairs at a time with independent accumulators, then
// offered. (Row by row, each pass cost a branch miss at its mask bit and the latency of its own
// dependent dot chain: about 100 cycles, measured; about 1.4 rows of a 256-row tile pass per query
// at prefilter 12, so the list spans the block's queries to fill the batches.) Row words come from
// the tile the Hamming scorer read: word w of tile row r at x[r * rs + w * ws] (transposed: rs 1,
// ws kRowTile; rows in place or padded: rs W, ws 1), zero-padded past the row's bytes.
constexpr int kGateRows = 4;  // pairs scored together
PE_AVX512 PE_INLINE void signdot_pairs_avx512(const TopkArgs& a, int64_t q0, const int32_t* e, const uint64_t* x,
                                              int64_t rs, int64_t ws, int64_t W, int32_t* out) {
  const __m512i ones = _mm512_set1_epi8(1);
  const uint64_t* qb[kGateRows];
  const uint64_t* xr[kGateRows];
  __m512i acc[kGateRows];
  int64_t pb[kGateRows];
  for (int u = 0; u < kGateRows; ++u) {
    qb[u] = a.sd_prep + (q0 + e[u] / kRowTile) * a.sd_pitch;
    xr[u] = x + (e[u] % kRowTile) * rs;
    acc[u] = _mm512_setzero_si512(), pb[u] = 0;
  }
  for (int64_t w = 0; w < W; ++w)
    for (int u = 0; u < kGateRows; ++u) {
      const uint64_t xw = xr[u][w * ws];
      pb[u] += static_cast<int64_t>(_mm_popcnt_u64(xw));
      acc[u] = _mm512_dpbusd_epi32(acc[u], _mm512_loadu_si512(qb[u] + 8 * w),
                                   _mm512_maskz_mov_epi8(static_cast<__mmask64>(xw), ones));
    }
  // qb holds q + 128 as uint8 (score_signdot_avx512's layout) and sum_d q at word 8 W
  for (int u = 0; u < kGateRows; ++u)
    out[u] = 2 * (_mm512_reduce_add_epi32(acc[u]) - 128 * static_cast<int32_t>(pb[u])) -
             static_cast<int32_t>(static_cast<int64_t>(qb[u][8 * W]));
}
PE_AVX512 void gated_tile_avx512(const TopkArgs& a, TopK<int32_t>* heaps, int64_t q0, int nq, const int32_t* tile,
                                 int64_t r0, int64_t nr, const uint64_t* x, int64_t rs, int64_t ws) {
  alignas(64) int32_t list[kQ * kRowTile + 16];  // j * kRowTile + r; + 16: each compress stores a whole vector
  int64_t n = 0;
  const __m512i step = _mm512_set1_epi32(16);
  for (int j = 0; j < nq; ++j) {
    const int32_t* t = tile + j * kRowTile;
    const int32_t g = std::max(a.gate[q0 + j], 0) - 1;  // pass: score > g (scores are >= 0)
    const __m512i gv = _mm512_set1_epi32(g);
    __m512i lane = _mm512_add_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                                    _mm512_set1_epi32(j * static_cast<int32_t>(kRowTile)));
    int64_t r = 0;
    for (; r + 64 <= nr; r += 64) {  // most 64-row groups have no pass: compress only the others
      const __mmask16 m0 = _mm512_cmpgt_epi32_mask(_mm512_loadu_si512(t + r), gv);
      const __mmask16 m1 = _mm512_cmpgt_epi32_mask(_mm512_loadu_si512(t + r + 16), gv);
      const __mmask16 m2 = _mm512_cmpgt_epi32_mask(_mm512_loadu_si512(t + r + 32), gv);
      const __mmask16 m3 = _mm512_cmpgt_epi32_mask(_mm512_loadu_si512(t + r + 48), gv);
      if (static_cast<uint32_t>(m0 | m1 | m2 | m3) != 0) {
        const __mmask16 ms[4] = {m0, m1, m2, m3};
        for (int u = 0; u < 4; ++u) {  // register-form compress: fast on Zen 4 too (the store form is not)
          _mm512_storeu_si512(list + n, _mm512_maskz_compress_epi32(ms[u], lane));
          n += _mm_popcnt_u32(ms[u]);
          lane = _mm512_add_epi32(lane, step);
        }
      } else {
        lane = _mm512_add_epi32(lane, _mm512_set1_epi32(64));
      }
    }
    for (; r < nr; ++r) {  // the tile's tail
      list[n] = j * static_cast<int32_t>(kRowTile) + static_cast<int32_t>(r);
      n += t[r] > g;
    }
  }
  if (a.allow) {  // the allowed ones, in order
    int64_t kept = 0;
    for (int64_t j = 0; j < n; ++j) {
      list[kept] = list[j];
      kept += a.allow[r0 + list[j] % kRowTile] != 0;
    }
    n = kept;
  }
  for (int64_t u = n; u < n + kGateRows; ++u) list[u] = n ? list[n - 1] : 0;  // a short last batch: copies
  const int64_t W = (a.cols + 7) / 8;
  int32_t sc[kGateRows];
  for (int64_t j = 0; j < n; j += kGateRows) {
    signdot_pairs_avx512(a, q0, list + j, x, rs, ws, W, sc);
    const int nb = static_cast<int>(std::min<int64_t>(kGateRows, n - j));
    for (int u = 0; u < nb; ++u) {  // per query, rows still arrive in increasing order
      TopK<int32_t>& h = heaps[q0 + list[j + u] / kRowTile];
      if (!h.rejects(sc[u])) h.offer(sc[u], r0 + list[j + u] % kRowTile, a.k);
    }
  }
}
#define PE_GATE_MASKED(V, HIT)                                            \
  for (; r + (V) <= nr; r += (V)) {                                       \
    uint32_t m = above(t + r, g, std::integral_constant<int, (V)>());     \
    while (m) {                                                           \
      const int b = __builtin_ctz(m);                                     \
      m &= m - 1;                                                         \
      HIT(a, h, i, r0 + r + b, rowbuf);                                   \
    }                                                                     \
  }                                                                       \
  return r;
__attribute__((target("avx2,fma,popcnt"))) int64_t gate_masked_avx2(const TopkArgs& a, TopK<int32_t>& h, int64_t i,
                                                                     const int32_t* t, int32_t g, int64_t r, int64_t nr,
                                                                     int64_t r0, uint64_t* rowbuf) {
  PE_GATE_MASKED(8, gated_hit<1>)
}
#undef PE_GATE_MASKED
#endif

template <int ISA>
PE_INLINE void offer_gated(const TopkArgs& a, TopK<int32_t>* heaps, int q0, int nq, const int32_t* tile, int64_t r0,
                           int64_t nr, uint64_t* rowbuf, const uint64_t* x, int64_t rs, int64_t ws) {
#if defined(__x86_64__) && defined(__GNUC__)
  if constexpr (ISA >= 2) {
    gated_tile_avx512(a, heaps, q0, nq, tile, r0, nr, x, rs, ws);
    return;
  }
#endif
  for (int j = 0; j < nq; ++j) {
    const int64_t i = q0 + j;
    TopK<int32_t>& h = heaps[i];
    const int32_t* t = tile + j * kRowTile;
    const int32_t g = std::max(a.gate[i], 0) - 1;  // pass: score > g (scores are >= 0)
    int64_t r = 0;
#if defined(__x86_64__) && defined(__GNUC__)
    if constexpr (ISA == 1) r = gate_masked_avx2(a, h, i, t, g, r, nr, r0, rowbuf);
#endif
    for (; r < nr; ++r)
      if (t[r] > g) gated_hit<ISA>(a, h, i, r0 + r, rowbuf);
  }
}

template <typename S, int ISA>
PE_INLINE void offer_tile(TopK<S>* heaps, int q0, int nq, const S* tile, int64_t r0, int64_t nr,
                          const uint8_t* allow, int64_t k) {
  for (int j = 0; j < nq; ++j) {
    TopK<S>& h = heaps[q0 + j];
    const S* t = tile + j * kRowTile;
    int64_t r = 0;
    for (; r < nr && !h.full; ++r) offer_one(h, t[r], r0 + r, allow, k);
#if defined(__x86_64__) && defined(__GNUC__)
    if constexpr (ISA >= 2)
      r = offer_masked_avx512(h, t, r, nr, r0, allow, k);
    else if constexpr (ISA == 1)
      r = offer_masked_avx2(h, t, r, nr, r0, allow, k);
#endif
    for (; r < nr; ++r) offer_one(h, t[r], r0 + r, allow, k);
  }
}

// Rows [r0, r1) of the database for every query into heaps[0..nq).
template <typename S, int ISA>  // ISA: 0 baseline, 1 AVX2, 2 AVX-512 (topk_cpu_level)
PE_INLINE void scan_range(const TopkArgs& a, const void* qprep, int64_t qpitch, int64_t r0, int64_t r1,
                          TopK<S>* heaps, S* tile, uint64_t* xpad) {
  // Few queries: the tile transposition would cost as much as scoring it; rows are scored in place
  // by popcnt instead.
  constexpr bool AVX2 = ISA >= 1, AVX512 = ISA >= 2;
  const bool gated = a.kind == kTopkGatedSignDot;  // scored as binary, offered by offer_gated
  const bool hamming = a.kind == kTopkBinary || gated;
  const bool transposed = AVX2 && a.nq >= 4 && hamming;
  const bool signdot = a.kind == kTopkSignDot || a.kind == kTopkRaBitQ;  // rabitq: sign-dot, then its factors
  const bool words = hamming || signdot;  // rows read as uint64 words
  // (sign-dot: qpitch is the prepared query block, 8 planes of W words + 1; the rows have W words)
  const int64_t W = (a.cols + 7) / 8;
  for (int64_t t0 = r0; t0 < r1; t0 += kRowTile) {
    const int64_t nr = std::min(kRowTile, r1 - t0);
    const uint64_t* xw = nullptr;
    if (transposed) {  // transposed, zero-padded tile for score_binary_avx2
      const uint8_t* src = static_cast<const uint8_t*>(a.db) + t0 * a.lddb;
      load_tile_words(src, a.lddb, a.cols, nr, W, true, xpad);
    } else if (words) {
      const uint8_t* src = static_cast<const uint8_t*>(a.db) + t0 * a.lddb;
      if (a.cols % 8 == 0 && a.lddb == a.cols) {
        xw = reinterpret_cast<const uint64_t*>(src);  // read in place (alignment: memcpy-free only on x86)
      } else {
        load_tile_words(src, a.lddb, a.cols, nr, W, false, xpad);
        xw = xpad;
      }
    }
    for (int64_t q0 = 0; q0 < a.nq; q0 += kQ) {
      const int nq = static_cast<int>(std::min<int64_t>(kQ, a.nq - q0));
      if (transposed) {
#if defined(__x86_64__) && defined(__GNUC__)
        const uint64_t* qp[kQ];
        for (int j = 0; j < kQ; ++j) qp[j] = static_cast<const uint64_t*>(qprep) + (q0 + std::min(j, nq - 1)) * qpitch;
        if (AVX512)
          score_binary_avx512(qp, nq, xpad, qpitch, static_cast<int32_t>(8 * a.cols), reinterpret_cast<int32_t*>(tile));
        else
          score_binary_avx2(qp, nq, xpad, qpitch, static_cast<int32_t>(8 * a.cols), reinterpret_cast<int32_t*>(tile));
#endif
      } else if (hamming) {
        const uint64_t* qp[kQ];
        for (int j = 0; j < kQ; ++j) qp[j] = static_cast<const uint64_t*>(qprep) + (q0 + std::min(j, nq - 1)) * qpitch;
        score_binary(qp, nq, xw, nr, qpitch, static_cast<int32_t>(8 * a.cols), reinterpret_cast<int32_t*>(tile));
      } else if (signdot) {
        const uint64_t* qp[kQ];
        for (int j = 0; j < kQ; ++j) qp[j] = static_cast<const uint64_t*>(qprep) + (q0 + std::min(j, nq - 1)) * qpitch;
        // rabitq: the integer sign-dot into its own tile, then the float estimate into `tile`
        alignas(32) int32_t sd[kQ * kRowTile];
        int32_t* st = a.kind == kTopkRaBitQ ? sd : reinterpret_cast<int32_t*>(tile);
#if defined(__x86_64__) && defined(__GNUC__)
        if (AVX512)
          score_signdot_avx512(qp, nq, xw, nr, W, st);
        else if (AVX2)
          score_signdot_avx2(qp, nq, xw, nr, W, st);
        else
#endif
          score_signdot(qp, nq, xw, nr, W, st);
        if (a.kind == kTopkRaBitQ)
          rabitq_scores(st, nq, nr, kRowTile, a.row_scale + t0, a.row_add + t0, a.q_scale + q0, a.q_add + q0,
                        reinterpret_cast<float*>(tile));
      } else if (a.kind == kTopkInt8 && AVX512) {
#if defined(__x86_64__) && defined(__GNUC__)
        const uint8_t* qp[kQ];
        for (int j = 0; j < kQ; ++j) qp[j] = static_cast<const uint8_t*>(qprep) + (q0 + std::min(j, nq - 1)) * qpitch;
        score_int8_avx512(qp, nq, static_cast<const int8_t*>(a.db) + t0 * a.lddb, a.lddb, nr, a.cols,
                          a.db_bias ? a.db_bias + t0 : nullptr, reinterpret_cast<int32_t*>(tile));
#endif
      } else if (a.kind == kTopkInt8 && AVX2) {
#if defined(__x86_64__) && defined(__GNUC__)
        const int16_t* qp[kQ];
        for (int j = 0; j < kQ; ++j) qp[j] = static_cast<const int16_t*>(qprep) + (q0 + std::min(j, nq - 1)) * qpitch;
        score_int8_avx2(qp, nq, static_cast<const int8_t*>(a.db) + t0 * a.lddb, a.lddb, nr, a.cols,
                        a.db_bias ? a.db_bias + t0 : nullptr, reinterpret_cast<int32_t*>(tile));
#endif
      } else if (a.kind == kTopkInt8) {
        const int8_t* qp[kQ];
        for (int j = 0; j < kQ; ++j) qp[j] = static_cast<const int8_t*>(a.q) + (q0 + std::min(j, nq - 1)) * a.ldq;
        score_int8(qp, nq, static_cast<const int8_t*>(a.db) + t0 * a.lddb, a.lddb, nr, a.cols,
                   a.db_bias ? a.db_bias + t0 : nullptr, reinterpret_cast<int32_t*>(tile));
      } else {
        const float* qp[kQ];
        for (int j = 0; j < kQ; ++j) qp[j] = static_cast<const float*>(a.q) + (q0 + std::min(j, nq - 1)) * a.ldq;
#if defined(__x86_64__) && defined(__GNUC__)
        if (AVX512)
          score_float_avx512(qp, nq, static_cast<const float*>(a.db) + t0 * a.lddb, a.lddb, nr, a.cols,
                             reinterpret_cast<float*>(tile));
        else
#endif
        score_float(qp, nq, static_cast<const float*>(a.db) + t0 * a.lddb, a.lddb, nr, a.cols,
                    reinterpret_cast<float*>(tile));
      }
      if constexpr (std::is_same_v<S, int32_t>) {
        if (gated) {  // the row buffer of signdot_one: past the tile's words in xpad
          // the tile's row words as the scorer read them: transposed in xpad, or rows of W words
          offer_gated<ISA>(a, heaps, static_cast<int>(q0), nq, tile, t0, nr, xpad + kRowTile * W,
                           transposed ? xpad : xw, transposed ? 1 : W, transposed ? kRowTile : 1);
          continue;
        }
      }
      offer_tile<S, ISA>(heaps, static_cast<int>(q0), nq, tile, t0, nr, a.allow, a.k);
    }
  }
}

using RangeFn = void (*)(const TopkArgs&, const void*, int64_t, int64_t, int64_t, void*, void*, uint64_t*);

template <typename S, int ISA>
PE_INLINE void scan_any(const TopkArgs& a, const void* qprep, int64_t qpitch, int64_t r0, int64_t r1, void* heaps,
                        void* tile, uint64_t* xpad) {
  scan_range<S, ISA>(a, qprep, qpitch, r0, r1, static_cast<TopK<S>*>(heaps), static_cast<S*>(tile), xpad);
}

void range_i32_baseline(const TopkArgs& a, const void* qp, int64_t qpitch, int64_t r0, int64_t r1, void* h, void* t,
                        uint64_t* x) {
  scan_any<int32_t, 0>(a, qp, qpitch, r0, r1, h, t, x);
}
void range_f32_baseline(const TopkArgs& a, const void* qp, int64_t qpitch, int64_t r0, int64_t r1, void* h, void* t,
                        uint64_t* x) {
  scan_any<float, 0>(a, qp, qpitch, r0, r1, h, t, x);
}

#if defined(__x86_64__) && defined(__GNUC__)
__attribute__((target("avx2,fma,popcnt"))) void range_i32_avx2(const TopkArgs& a, const void* qp, int64_t qpitch,
                                                               int64_t r0, int64_t r1, void* h, void* t, uint64_t* x) {
  scan_any<int32_t, 1>(a, qp, qpitch, r0, r1, h, t, x);
}
__attribute__((target("avx2,fma,popcnt"))) void range_f32_avx2(const TopkArgs& a, const void* qp, int64_t qpitch,
                                                               int64_t r0, int64_t r1, void* h, void* t, uint64_t* x) {
  scan_any<float, 1>(a, qp, qpitch, r0, r1, h, t, x);
}
PE_AVX512 void range_i32_avx512(const TopkArgs& a, const void* qp, int64_t qpitch, int64_t r0, int64_t r1, void* h,
                                void* t, uint64_t* x) {
  scan_any<int32_t, 2>(a, qp, qpitch, r0, r1, h, t, x);
}
PE_AVX512 void range_f32_avx512(const TopkArgs& a, const void* qp, int64_t qpitch, int64_t r0, int64_t r1, void* h,
                                void* t, uint64_t* x) {
  scan_any<float, 2>(a, qp, qpitch, r0, r1, h, t, x);
}
bool cpu_has_popcnt() {
  static const bool ok = __builtin_cpu_supports("popcnt");
  return ok;
}
#endif

template <typename S>
void topk_typed(const TopkArgs& args) {
  TopkArgs a = args;  // kind 5: gets its sign-dot queries (sd_prep) below
  const bool is_float = a.kind == kTopkFloat32 || a.kind == kTopkRaBitQ;
  RangeFn fn = is_float ? range_f32_baseline : range_i32_baseline;
  const int level = topk_cpu_level();
  const bool use_avx2 = level == 1, use_avx512 = level == 2;
#if defined(__x86_64__) && defined(__GNUC__)
  if (use_avx512) fn = is_float ? range_f32_avx512 : range_i32_avx512;
  if (use_avx2) fn = is_float ? range_f32_avx2 : range_i32_avx2;
#endif
  // Queries of a binary scan as zero-padded uint64 words.
  std::vector<uint64_t> qwords;
  int64_t qpitch = 0;
  const void* qprep = a.q;
  const bool gated = a.kind == kTopkGatedSignDot;
  const bool signdot = a.kind == kTopkSignDot || a.kind == kTopkRaBitQ || gated;  // queries prepared for the sign-dot
  if (signdot && (use_avx2 || use_avx512)) {
    // Per query (score_signdot_avx2): u_d = q_d + 128 as 8 W words of bytes (0 past the last
    // dimension: those bits are 0 in the zero-padded rows), then sum_d q_d.
    const int64_t W = (a.cols + 7) / 8;
    qpitch = 8 * W + 1;
    qwords.assign(static_cast<size_t>(a.nq * qpitch), 0);
    for (int64_t i = 0; i < a.nq; ++i) {
      const int8_t* qi = static_cast<const int8_t*>(a.q) + i * a.ldq;
      uint64_t* dst = qwords.data() + i * qpitch;
      uint8_t* u = reinterpret_cast<uint8_t*>(dst);
      int64_t sumq = 0;
      for (int64_t d = 0; d < 8 * a.cols; ++d) {  // AVX-512: byte order reversed within each 8 (see the scorer)
        u[use_avx512 ? (d & ~int64_t{7}) + 7 - (d & 7) : d] = static_cast<uint8_t>(static_cast<int>(qi[d]) + 128);
        sumq += qi[d];
      }
      dst[8 * W] = static_cast<uint64_t>(sumq);
    }
    qprep = qwords.data();
  } else if (signdot) {
    // Per query: plane p (p = 0..7) = bit p of u_d = q_d + 128, packed like the codes (dimension
    // 8 i + t -> byte i, bit 7 - t: numpy.packbits), zero-padded to W words; then sum_d q_d.
    const int64_t W = (a.cols + 7) / 8;
    qpitch = 8 * W + 1;
    qwords.assign(static_cast<size_t>(a.nq * qpitch), 0);
    std::vector<uint8_t> bytes(static_cast<size_t>(8 * W * 8));
    for (int64_t i = 0; i < a.nq; ++i) {
      const int8_t* qi = static_cast<const int8_t*>(a.q) + i * a.ldq;
      std::fill(bytes.begin(), bytes.end(), 0);
      int64_t sumq = 0;
      for (int64_t d = 0; d < 8 * a.cols; ++d) {
        const unsigned u = static_cast<unsigned>(static_cast<int>(qi[d]) + 128);
        sumq += qi[d];
        for (int p = 0; p < 8; ++p)
          if (u >> p & 1u) bytes[static_cast<size_t>(p * 8 * W + d / 8)] |= static_cast<uint8_t>(0x80u >> (d % 8));
      }
      uint64_t* dst = qwords.data() + i * qpitch;
      std::memcpy(dst, bytes.data(), static_cast<size_t>(8 * W * 8));
      dst[8 * W] = static_cast<uint64_t>(sumq);
    }
    qprep = qwords.data();
  }
  std::vector<uint8_t> q8u;  // AVX-512 int8: queries as u = q + 128, zero-padded to a multiple of 64
  if (a.kind == kTopkInt8 && use_avx512) {
    qpitch = (a.cols + 63) / 64 * 64;
    q8u.assign(static_cast<size_t>(a.nq * qpitch), 0);
    for (int64_t i = 0; i < a.nq; ++i)
      for (int64_t d = 0; d < a.cols; ++d)
        q8u[i * qpitch + d] = static_cast<uint8_t>(static_cast<int>(static_cast<const int8_t*>(a.q)[i * a.ldq + d]) + 128);
    qprep = q8u.data();
  }
  std::vector<int16_t> q16;  // AVX2 int8: queries widened to int16, zero-padded to a multiple of 16
  if (a.kind == kTopkInt8 && use_avx2) {
    qpitch = (a.cols + 15) / 16 * 16;
    q16.assign(static_cast<size_t>(a.nq * qpitch), 0);
    for (int64_t i = 0; i < a.nq; ++i)
      for (int64_t d = 0; d < a.cols; ++d) q16[i * qpitch + d] = static_cast<const int8_t*>(a.q)[i * a.ldq + d];
    qprep = q16.data();
  }
  std::vector<uint64_t> bwords;  // binary (and gated: the Hamming side's) queries as zero-padded uint64 words
  if (a.kind == kTopkBinary || gated) {
    const uint8_t* qb = gated ? a.q_bits : static_cast<const uint8_t*>(a.q);
    const int64_t ldb = gated ? a.cols : a.ldq;
    if (gated) a.sd_prep = qwords.data(), a.sd_pitch = qpitch;
    qpitch = (a.cols + 7) / 8;
    bwords.assign(static_cast<size_t>(a.nq * qpitch), 0);
    for (int64_t i = 0; i < a.nq; ++i) std::memcpy(bwords.data() + i * qpitch, qb + i * ldb, a.cols);
    qprep = bwords.data();
  }
  const int64_t work = a.nq * a.N * std::max<int64_t>(a.cols, 1) * (signdot && !gated ? 8 : 1);
  int nthreads = 1;
  if (work >= (int64_t{1} << 20))
    nthreads = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(a.num_threads, (a.N + kRowTile - 1) / kRowTile)));
  const int64_t k = a.k;
  const int64_t cap = std::max<int64_t>(k, k > kLazyTopK ? lazy_capacity(k) : k);
  std::vector<Cand<S>> store(static_cast<size_t>(nthreads) * a.nq * cap);
  std::vector<TopK<S>> heaps(static_cast<size_t>(nthreads) * a.nq);
  for (int t = 0; t < nthreads; ++t)
    for (int64_t i = 0; i < a.nq; ++i)
      heaps[t * a.nq + i] = TopK<S>{store.data() + (t * a.nq + i) * cap, 0, S{}, false};

  // Threads: std::thread fork/join, not OpenMP. Measured on the 2-core dev machine: a libgomp
  // parallel region started while torch's own OpenMP pool (a second libgomp) still spins after a
  // torch op waited 15-25 ms for a core (a scan of 3,000 rows takes 0.2 ms); a joined std::thread
  // sleeps in the kernel instead of spinning, so the cores go where the work is.
  auto work_of = [&](int t) {
    // Tiles of kRowTile rows, split evenly (in whole tiles) between the threads.
    const int64_t tiles = (a.N + kRowTile - 1) / kRowTile;
    const int64_t r0 = std::min(a.N, tiles * t / nthreads * kRowTile);
    const int64_t r1 = std::min(a.N, tiles * (t + 1) / nthreads * kRowTile);
    std::vector<S> tile(static_cast<size_t>(kQ * kRowTile));
    const int64_t xwords = (a.cols + 7) / 8;  // per-row words of the binary / sign-dot tile
    // (+ one row for the gated kind's signdot_one)
    std::vector<uint64_t> xpad(a.kind == kTopkBinary || signdot ? static_cast<size_t>((kRowTile + gated) * xwords) : 0);
    if (r1 > r0) fn(a, qprep, qpitch, r0, r1, heaps.data() + t * a.nq, tile.data(), xpad.data());
    // A lazy buffer holds up to 2k: down to its k best here, in parallel, so the merge reads k per thread.
    for (int64_t i = 0; i < a.nq; ++i) {
      TopK<S>& h = heaps[t * a.nq + i];
      if (h.n > k) {
        std::nth_element(h.c, h.c + (k - 1), h.c + h.n, Better<S>());
        h.n = k;
      }
    }
  };
  S* out_s = static_cast<S*>(a.out_scores);
  const S lowest = is_float ? static_cast<S>(-INFINITY) : static_cast<S>(INT32_MIN);
  // Merge the threads' candidates per query, best first, and pad; the queries split between the
  // threads (at k = 250 and 256 queries a serial merge cost as much as a third of the scan).
  auto merge_of = [&](int t) {
    std::vector<Cand<S>> all;
    all.reserve(static_cast<size_t>(nthreads * k));
    for (int64_t i = a.nq * t / nthreads; i < a.nq * (t + 1) / nthreads; ++i) {
      all.clear();
      for (int u = 0; u < nthreads; ++u) {
        const TopK<S>& h = heaps[u * a.nq + i];
        all.insert(all.end(), h.c, h.c + h.n);
      }
      const int64_t m = std::min<int64_t>(k, static_cast<int64_t>(all.size()));
      if (m < static_cast<int64_t>(all.size())) std::nth_element(all.begin(), all.begin() + (m - 1), all.end(), Better<S>());
      std::sort(all.begin(), all.begin() + m, Better<S>());
      for (int64_t j = 0; j < k; ++j) {
        out_s[i * k + j] = j < m ? all[j].s : lowest;
        a.out_idx[i * k + j] = j < m ? all[j].i : -1;
      }
    }
  };
  {
    std::vector<std::thread> pool;
    for (int t = 1; t < nthreads; ++t) pool.emplace_back(work_of, t);
    work_of(0);
    for (auto& th : pool) th.join();
  }
  {
    std::vector<std::thread> pool;
    for (int t = 1; t < nthreads; ++t) pool.emplace_back(merge_of, t);
    merge_of(0);
    for (auto& th : pool) th.join();
  }
}

}  // namespace

int topk_cpu_level() {
#if defined(__x86_64__) && defined(__GNUC__)
  if (cpu_isa() >= Isa::kAvx512 && cpu_has_avx512_vnni() && cpu_has_avx512_vpopcntdq()) return 2;
  if (avx2_enabled() && cpu_has_popcnt()) return 1;
#endif
  return 0;
}

void signdot_rerank_cpu(const int8_t* q, int64_t nq, int64_t ldq, const uint8_t* db, int64_t N, int64_t lddb,
                        int64_t cols, const int64_t* cand, int64_t P, int64_t k, int32_t* out_s, int64_t* out_i,
                        int num_threads) {
  // Per query a byte table T[b][v] = the sum of q over the set bits of byte value v at byte b (code
  // byte b, bit 7 - t <-> dimension 8 b + t, numpy.packbits), built by one add per entry from the
  // entry without its lowest bit; a candidate then costs cols lookups. Exact integers.
  (void)N;
  const int nthreads = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(num_threads, nq * P >= 4096 ? nq : 1)));
  auto work_of = [&](int t) {
    std::vector<int32_t> table(static_cast<size_t>(cols * 256));
    std::vector<Cand<int32_t>> c;
    c.reserve(static_cast<size_t>(P));
    for (int64_t i = nq * t / nthreads; i < nq * (t + 1) / nthreads; ++i) {
      const int8_t* qi = q + i * ldq;
      int32_t sumq = 0;
      for (int64_t d = 0; d < 8 * cols; ++d) sumq += qi[d];
      for (int64_t b = 0; b < cols; ++b) {
        int32_t* tb = table.data() + b * 256;
        tb[0] = 0;
        for (int v = 1; v < 256; ++v) tb[v] = tb[v & (v - 1)] + qi[8 * b + 7 - __builtin_ctz(static_cast<unsigned>(v))];
      }
      c.clear();
      for (int64_t p = 0; p < P; ++p) {
        const int64_t row = cand[i * P + p];
        if (row < 0) continue;
        const uint8_t* x = db + row * lddb;
        int32_t ub = 0;
        for (int64_t b = 0; b < cols; ++b) ub += table[static_cast<size_t>(b * 256 + x[b])];
        c.push_back(Cand<int32_t>{2 * ub - sumq, row});
      }
      const int64_t m = std::min<int64_t>(k, static_cast<int64_t>(c.size()));
      if (m < static_cast<int64_t>(c.size())) std::nth_element(c.begin(), c.begin() + (m - 1), c.end(), Better<int32_t>());
      std::sort(c.begin(), c.begin() + m, Better<int32_t>());
      for (int64_t j = 0; j < k; ++j) {
        out_s[i * k + j] = j < m ? c[j].s : INT32_MIN;
        out_i[i * k + j] = j < m ? c[j].i : -1;
      }
    }
  };
  std::vector<std::thread> pool;
  for (int t = 1; t < nthreads; ++t) pool.emplace_back(work_of, t);
  work_of(0);
  for (auto& th : pool) th.join();
}

// The r-th best binary score (8 * cols - Hamming) of each query over the allowed rows; INT32_MIN where
// fewer than r rows are allowed. The gates of the Hamming pre-filter (EmbeddingIndex: a sample of the
// rows, r ~ f k r' / stride). Only a score, not the rows: per query a histogram of the scores at or
// above a floor, the floor raised while at least r recorded scores lie above it, so a row costs one
// vector compare and the few that pass one increment (a top-k of rows costs a heap or selection step
// per accepted row: 3x the time on 256 queries x 6,250 rows). Threads split the queries; each tile
// of rows is transposed once per thread and scored by the scan's binary scorers.
namespace {
struct KthState {
  int32_t floor;  // every score >= floor is in hist
  int64_t cnt;    // recorded scores (all >= floor)
  int32_t* hist;
};
// A score equal to the floor once k are recorded cannot change the answer (the floor is it, or a
// higher score is): only scores above kth_gate are recorded (fewer hits where scores tie).
PE_INLINE int32_t kth_gate(const KthState& st, int64_t k) { return st.cnt < k ? st.floor - 1 : st.floor; }
PE_INLINE void kth_hit(KthState& st, int32_t s, int64_t r) {
  ++st.hist[s];
  ++st.cnt;
  while (st.cnt - st.hist[st.floor] >= r) st.cnt -= st.hist[st.floor++];
}
#if defined(__x86_64__) && defined(__GNUC__)
#define PE_KTH_MASKED(V)                                                       \
  int64_t r = 0;                                                               \
  for (; r + (V) <= nr; r += (V)) {                                            \
    uint32_t m = above(t + r, kth_gate(st, k), std::integral_constant<int, (V)>()); \
    while (m) {                                                                \
      const int b = __builtin_ctz(m);                                          \
      m &= m - 1;                                                              \
      if (t[r + b] > kth_gate(st, k) && (!allow || allow[r0 + r + b])) kth_hit(st, t[r + b], k);   \
    }                                                                          \
  }                                                                            \
  return r;
PE_AVX512 int64_t kth_masked_avx512(KthState& st, const int32_t* t, int64_t nr, int64_t r0, const uint8_t* allow,
                                    int64_t k) {
  PE_KTH_MASKED(16)
}
__attribute__((target("avx2"))) int64_t kth_masked_avx2(KthState& st, const int32_t* t, int64_t nr, int64_t r0,
                                                        const uint8_t* allow, int64_t k) {
  PE_KTH_MASKED(8)
}
#undef PE_KTH_MASKED
#endif
}  // namespace

void hamming_kth_cpu(const uint8_t* q, int64_t nq, int64_t ldq, const uint8_t* db, int64_t N, int64_t lddb,
                     int64_t cols, const uint8_t* allow, int64_t k, int32_t* out, int num_threads) {
  const int level = topk_cpu_level();
  const int64_t W = (cols + 7) / 8;
  const int32_t total = static_cast<int32_t>(8 * cols);
  std::vector<uint64_t> qw(static_cast<size_t>(nq * W), 0);
  for (int64_t i = 0; i < nq; ++i) std::memcpy(qw.data() + i * W, q + i * ldq, static_cast<size_t>(cols));
  std::vector<int32_t> hist(static_cast<size_t>(nq * (total + 1)), 0);
  const int64_t work = nq * N * cols;
  const int nthreads = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(num_threads, work >= (1 << 20) ? nq : 1)));
  auto work_of = [&](int t) {
    const int64_t i0 = nq * t / nthreads, i1 = nq * (t + 1) / nthreads;
    std::vector<KthState> st(static_cast<size_t>(i1 - i0));
    for (int64_t i = i0; i < i1; ++i) st[i - i0] = KthState{0, 0, hist.data() + i * (total + 1)};
    std::vector<uint64_t> xpad(static_cast<size_t>(kRowTile * W));
    alignas(64) int32_t tile[kQ * kRowTile];
    for (int64_t t0 = 0; t0 < N; t0 += kRowTile) {
      const int64_t nr = std::min(kRowTile, N - t0);
      load_tile_words(db + t0 * lddb, lddb, cols, nr, W, level >= 1, xpad.data());  // transposed for the vector builds
      for (int64_t b0 = i0; b0 < i1; b0 += kQ) {
        const int nb = static_cast<int>(std::min<int64_t>(kQ, i1 - b0));
        const uint64_t* qp[kQ];
        for (int j = 0; j < kQ; ++j) qp[j] = qw.data() + (b0 + std::min(j, nb - 1)) * W;
#if defined(__x86_64__) && defined(__GNUC__)
        if (level >= 2)
          score_binary_avx512(qp, nb, xpad.data(), W, total, tile);
        else if (level == 1)
          score_binary_avx2(qp, nb, xpad.data(), W, total, tile);
        else
#endif
          score_binary(qp, nb, xpad.data(), nr, W, total, tile);
        for (int j = 0; j < nb; ++j) {
          KthState& s = st[b0 + j - i0];
          const int32_t* tj = tile + j * kRowTile;
          if (s.cnt < k) {  // still filling (the floor is 0): the whole tile, without a branch per row
            for (int64_t r = 0; r < nr; ++r) {
              const int64_t in = !allow || allow[t0 + r];
              s.hist[tj[r]] += static_cast<int32_t>(in);
              s.cnt += in;
            }
            while (s.cnt - s.hist[s.floor] >= k) s.cnt -= s.hist[s.floor++];
            continue;
          }
          int64_t r = 0;
#if defined(__x86_64__) && defined(__GNUC__)
          if (level >= 2)
            r = kth_masked_avx512(s, tj, nr, t0, allow, k);
          else if (level == 1)
            r = kth_masked_avx2(s, tj, nr, t0, allow, k);
#endif
          for (; r < nr; ++r)
            if (tj[r] > kth_gate(s, k) && (!allow || allow[t0 + r])) kth_hit(s, tj[r], k);
        }
      }
    }
    for (int64_t i = i0; i < i1; ++i) {  // the largest T with at least k recorded scores >= T
      const int32_t* h = hist.data() + i * (total + 1);
      int64_t acc = 0;
      out[i] = INT32_MIN;
      for (int32_t v = total; v >= 0; --v)
        if ((acc += h[v]) >= k) {
          out[i] = v;
          break;
        }
    }
  };
  std::vector<std::thread> pool;
  for (int t = 1; t < nthreads; ++t) pool.emplace_back(work_of, t);
  work_of(0);
  for (auto& th : pool) th.join();
}

void topk_cpu(const TopkArgs& a) {
  if (a.kind == kTopkFloat32 || a.kind == kTopkRaBitQ)
    topk_typed<float>(a);
  else
    topk_typed<int32_t>(a);
}

}  // namespace postembed
