// Candidate re-ranking on the CPU: the last stage of a rescored search (EmbeddingIndex.search(...,
// rescore=r)). For each query the k best of its P candidate rows by the float32 dot product of the
// float32 query with the row's float16 vector, best first, ties by the lower row, -1 / -inf past the
// candidates. A gather of P rows per query: the vectors are converted as they are read (vcvtph2ps),
// never materialized as float32.
//
// Three builds, as the scans (csrc/topk_cpu.cpp), picked by topk_cpu_level(): AVX-512 (16 lanes, a
// masked tail), AVX2 + F16C (8 lanes), baseline (embedding_math.h half_to_float). Each sums in its
// own lane order, so scores agree with a float64 reference to float32 rounding, not bit for bit
// across builds (kernels/float16_rerank.py; tests/test_rerank.py).
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <thread>
#include <vector>

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#endif

#include "embedding_math.h"
#include "kernels.h"

namespace postembed {
namespace {

struct Scored {
  float s;
  int64_t i;
};
inline bool better(const Scored& a, const Scored& b) { return a.s > b.s || (a.s == b.s && a.i < b.i); }

float dot_baseline(const float* q, const uint16_t* v, int64_t D) {
  float acc[8] = {};
  int64_t d = 0;
  for (; d + 8 <= D; d += 8)
    for (int l = 0; l < 8; ++l) acc[l] += q[d + l] * half_to_float(v[d + l]);
  float s = 0.f;
  for (; d < D; ++d) s += q[d] * half_to_float(v[d]);
  for (int l = 0; l < 8; ++l) s += acc[l];
  return s;
}

#if defined(__x86_64__) && defined(__GNUC__)
__attribute__((target("avx2,fma,f16c"))) float dot_avx2(const float* q, const uint16_t* v, int64_t D) {
  __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
  int64_t d = 0;
  for (; d + 16 <= D; d += 16) {
    a0 = _mm256_fmadd_ps(_mm256_loadu_ps(q + d), _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(v + d))), a0);
    a1 = _mm256_fmadd_ps(_mm256_loadu_ps(q + d + 8),
                         _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(v + d + 8))), a1);
  }
  for (; d + 8 <= D; d += 8)
    a0 = _mm256_fmadd_ps(_mm256_loadu_ps(q + d), _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(v + d))), a0);
  const __m256 a = _mm256_add_ps(a0, a1);
  __m128 h = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
  h = _mm_add_ps(h, _mm_movehl_ps(h, h));
  h = _mm_add_ss(h, _mm_shuffle_ps(h, h, 1));
  float s = _mm_cvtss_f32(h);
  for (; d < D; ++d) s += q[d] * half_to_float(v[d]);
  return s;
}

__attribute__((target("avx512f,avx512bw,avx512vl,avx2,fma,f16c"))) float dot_avx512(const float* q, const uint16_t* v,
                                                                                    int64_t D) {
  __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps();
  int64_t d = 0;
  for (; d + 32 <= D; d += 32) {
    a0 = _mm512_fmadd_ps(_mm512_loadu_ps(q + d), _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(v + d))), a0);
    a1 = _mm512_fmadd_ps(_mm512_loadu_ps(q + d + 16),
                         _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(v + d + 16))), a1);
  }
  for (; d < D; d += 16) {  // the last 1..16 dimensions by masked loads (never read past the row)
    const __mmask16 m = D - d >= 16 ? __mmask16(0xffff) : static_cast<__mmask16>((1u << (D - d)) - 1);
    a0 = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, q + d), _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(m, v + d)), a0);
  }
  return _mm512_reduce_add_ps(_mm512_add_ps(a0, a1));
}
#endif

using DotFn = float (*)(const float*, const uint16_t*, int64_t);

DotFn pick_dot() {
#if defined(__x86_64__) && defined(__GNUC__)
  const int level = topk_cpu_level();
  if (level >= 2) return dot_avx512;
  if (level == 1 && __builtin_cpu_supports("f16c")) return dot_avx2;
#endif
  return dot_baseline;
}

constexpr int64_t kPrefetchRows = 4;
inline void prefetch_row(const uint16_t* v, int64_t D) {
  const char* p = reinterpret_cast<const char*>(v);
  for (int64_t off = 0; off < 2 * D; off += 64) __builtin_prefetch(p + off);
}

}  // namespace

void float16_rerank_cpu(const float* q, int64_t nq, int64_t ldq, const uint16_t* vec, int64_t ldv, int64_t D,
                        const int64_t* cand, int64_t P, int64_t k, float* out_s, int64_t* out_i, int num_threads) {
  const DotFn dot = pick_dot();
  // Threads over queries once there is enough to share (a thread costs ~20 us to start).
  const int nthreads = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(num_threads, nq * P * D >= (1 << 18) ? nq : 1)));
  auto work_of = [&](int t) {
    std::vector<Scored> c;
    c.reserve(static_cast<size_t>(P));
    const int64_t i0 = nq * t / nthreads, i1 = nq * (t + 1) / nthreads;
    for (int64_t i = i0; i < i1; ++i) {
      const float* qi = q + i * ldq;
      c.clear();
      for (int64_t p = 0; p < P; ++p) {
        // the rows are random gathers from DRAM: ask for the one kPrefetchRows ahead (into the next
        // query's candidates) while this one is scored
        const int64_t ahead = i * P + p + kPrefetchRows;
        if (ahead < i1 * P && cand[ahead] >= 0) prefetch_row(vec + cand[ahead] * ldv, D);
        const int64_t row = cand[i * P + p];
        if (row < 0) continue;
        const float s = dot(qi, vec + row * ldv, D);
        c.push_back(Scored{s == s ? s : -INFINITY, row});  // NaN (an inf * 0 term) ranks last, not UB in the sort
      }
      const int64_t m = std::min<int64_t>(k, static_cast<int64_t>(c.size()));
      if (m < static_cast<int64_t>(c.size())) std::nth_element(c.begin(), c.begin() + (m - 1), c.end(), better);
      std::sort(c.begin(), c.begin() + m, better);
      for (int64_t j = 0; j < k; ++j) {
        out_s[i * k + j] = j < m ? c[j].s : -INFINITY;
        out_i[i * k + j] = j < m ? c[j].i : -1;
      }
    }
  };
  std::vector<std::thread> pool;
  for (int t = 1; t < nthreads; ++t) pool.emplace_back(work_of, t);
  work_of(0);
  for (auto& th : pool) th.join();
}

}  // namespace postembed
