// CPU (OpenMP) pool_normalize and quantize_embeddings. One sequence (row) per
// iteration of an OpenMP loop; the inner loops run over D with float
// accumulators and compile to SIMD at the baseline ISA. The arithmetic itself is
// embedding_math.h, shared with the CUDA kernels.
#include <algorithm>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif
#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define PE_X86_F16C 1
#endif

#include "embedding_math.h"
#include "kernels.h"

namespace postembed {
namespace {

// Below this many input elements a call runs on one thread: a fork/join costs
// more than it saves (and on a loaded machine a barrier can cost milliseconds).
constexpr int64_t kParallelMinElems = 1 << 18;

int threads_for(int64_t items, int64_t elems) {
#ifdef _OPENMP
  if (elems < kParallelMinElems) return 1;
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(omp_get_max_threads(), items)));
#else
  (void)items;
  (void)elems;
  return 1;
#endif
}

// acc[0..D) = fp32 sum of rows [start, end) of x (row pitch ld).
template <typename T>
void accumulate_rows(const T* __restrict x, int64_t ld, int64_t start, int64_t end, int64_t D,
                     float* __restrict acc) {
  const T* row = x + start * ld;
  for (int64_t d = 0; d < D; ++d) acc[d] = load_f(row, d);
  for (int64_t t = start + 1; t < end; ++t) {
    row = x + t * ld;
    for (int64_t d = 0; d < D; ++d) acc[d] += load_f(row, d);
  }
}

// Per-dimension quantization step, computed once per call (int8/uint8), else empty.
std::vector<float> steps(const float* lo, const float* hi, int64_t D) {
  std::vector<float> s;
  if (lo != nullptr) {
    s.resize(static_cast<size_t>(D));
    for (int64_t d = 0; d < D; ++d) s[d] = quant_step(lo[d], hi[d]);
  }
  return s;
}

template <typename T>
void pool_impl(const PoolArgs& a) {
  const T* x = static_cast<const T*>(a.hidden);
  const int64_t D = a.D;
  const int64_t row_bytes = a.out_row_bytes;
  char* out = static_cast<char*>(a.out);
  const std::vector<float> step_buf = steps(a.lo, a.hi, D);
  const float* step = step_buf.empty() ? nullptr : step_buf.data();
  const int nthreads = threads_for(a.B, (a.mode == kCls ? a.B : a.total_tokens) * D);
#pragma omp parallel num_threads(nthreads)
  {
    std::vector<float> buf(static_cast<size_t>(D));
    float* acc = buf.data();
#pragma omp for schedule(dynamic, 1)
    for (int64_t b = 0; b < a.B; ++b) {
      const int64_t start = a.cu[b];
      const int64_t count = a.mode == kCls ? 1 : a.cu[b + 1] - start;
      accumulate_rows(x, a.ld, start, start + count, D, acc);
      if (a.mode != kCls) {
        for (int64_t d = 0; d < D; ++d) acc[d] = mean_of(acc[d], static_cast<int32_t>(count));
      }
      float ss = 0.0f;
      if (a.normalize) {
#pragma omp simd reduction(+ : ss)
        for (int64_t d = 0; d < D; ++d) ss += acc[d] * acc[d];
      }
      finalize_row(static_cast<const float*>(acc), D, l2_denom(ss, a.normalize), a.precision, a.lo, a.hi, step,
                   out + b * row_bytes, 0, 1);
    }
  }
}

// float32 -> float16 rows: x86 CPUs with F16C convert 8 values per instruction
// (round to nearest even, bit-identical to float_to_half_bits, which does the
// tail and is the portable path). Chosen at run time: the build stays baseline.
#ifdef PE_X86_F16C
__attribute__((target("avx,f16c"))) void f32_to_f16_row_f16c(const float* x, int64_t n, uint16_t* o) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m128i h = _mm256_cvtps_ph(_mm256_loadu_ps(x + i), _MM_FROUND_TO_NEAREST_INT);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(o + i), h);
  }
  for (; i < n; ++i) o[i] = float_to_half_bits(x[i]);
}
bool cpu_has_f16c() {
  static const bool ok = __builtin_cpu_supports("avx") && __builtin_cpu_supports("f16c");
  return ok;
}
#else
bool cpu_has_f16c() { return false; }
#endif

template <typename T>
bool quant_fast_path(const QuantArgs&) { return false; }

template <>
bool quant_fast_path<float>(const QuantArgs& a) {
#ifdef PE_X86_F16C
  if (a.precision != kPFloat16 || !f16c_enabled()) return false;
  const float* x = static_cast<const float*>(a.x);
  uint16_t* out = static_cast<uint16_t*>(a.out);
  const int64_t out_ld = a.out_row_bytes / static_cast<int64_t>(sizeof(uint16_t));
  const int nthreads = threads_for(a.B, a.B * a.D);
#pragma omp parallel for schedule(static) num_threads(nthreads)
  for (int64_t b = 0; b < a.B; ++b) f32_to_f16_row_f16c(x + b * a.ld, a.D, out + b * out_ld);
  return true;
#else
  (void)a;
  return false;
#endif
}

template <typename T>
void quant_impl(const QuantArgs& a) {
  if (quant_fast_path<T>(a)) return;
  const T* x = static_cast<const T*>(a.x);
  const int64_t row_bytes = a.out_row_bytes;
  char* out = static_cast<char*>(a.out);
  const std::vector<float> step_buf = steps(a.lo, a.hi, a.D);
  const float* step = step_buf.empty() ? nullptr : step_buf.data();
  const int nthreads = threads_for(a.B, a.B * a.D);
#pragma omp parallel for schedule(static) num_threads(nthreads)
  for (int64_t b = 0; b < a.B; ++b) {
    finalize_row(x + b * a.ld, a.D, 1.0f, a.precision, a.lo, a.hi, step, out + b * row_bytes, 0, 1);
  }
}

}  // namespace

static bool g_f16c_allowed = true;

bool f16c_enabled() { return g_f16c_allowed && cpu_has_f16c(); }

bool set_f16c_allowed(bool allowed) {
  const bool prev = g_f16c_allowed;
  g_f16c_allowed = allowed;
  return prev;
}

void pool_normalize_cpu(const PoolArgs& a) {
  switch (a.dtype) {
    case kF32: pool_impl<float>(a); break;
    case kF16: pool_impl<f16_t>(a); break;
    case kBF16: pool_impl<bf16_t>(a); break;
    default: break;  // validated in bindings.cpp
  }
}

void quantize_cpu(const QuantArgs& a) {
  switch (a.dtype) {
    case kF32: quant_impl<float>(a); break;
    case kF16: quant_impl<f16_t>(a); break;
    case kBF16: quant_impl<bf16_t>(a); break;
    default: break;
  }
}

}  // namespace postembed
