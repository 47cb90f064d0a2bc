// CPU (OpenMP) pool_normalize and quantize_embeddings. One sequence (row) per
// iteration of an OpenMP loop; the inner loops run over D with float
// accumulators and compile to SIMD at the baseline ISA. The arithmetic itself is
// embedding_math.h, shared with the CUDA kernels.
#include <algorithm>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
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

template <typename T>
void pool_impl(const PoolArgs& a) {
  const T* x = static_cast<const T*>(a.hidden);
  const int64_t D = a.D;
  const int64_t row_bytes = output_cols(D, a.precision) * output_elem_size(a.precision);
  char* out = static_cast<char*>(a.out);
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
      finalize_row(static_cast<const float*>(acc), D, l2_denom(ss, a.normalize), a.precision, a.lo, a.hi,
                   out + b * row_bytes, 0, 1);
    }
  }
}

template <typename T>
void quant_impl(const QuantArgs& a) {
  const T* x = static_cast<const T*>(a.x);
  const int64_t row_bytes = output_cols(a.D, a.precision) * output_elem_size(a.precision);
  char* out = static_cast<char*>(a.out);
  const int nthreads = threads_for(a.B, a.B * a.D);
#pragma omp parallel for schedule(static) num_threads(nthreads)
  for (int64_t b = 0; b < a.B; ++b) {
    finalize_row(x + b * a.ld, a.D, 1.0f, a.precision, a.lo, a.hi, out + b * row_bytes, 0, 1);
  }
}

}  // namespace

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
