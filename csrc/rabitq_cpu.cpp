// RaBitQ scores from the exact integer sign-dot (csrc/topk_cpu.cpp, kind 4): the estimator of <q, x>
//   row_scale[r] * (q_scale[j] * S) + row_add[r] + q_add[j]
// evaluated in double, one IEEE rounding per operation, left to right, then rounded to float32: the
// same operations as the numpy / torch references, so the scores are equal bit for bit. This file is
// compiled with -ffp-contract=off (CMakeLists.txt): a fused multiply-add would round once instead of
// twice and the scores would no longer match the reference.
#include "kernels.h"

namespace postembed {

void rabitq_scores(const int32_t* s, int nq, int64_t nr, int64_t pitch, const float* row_scale, const float* row_add,
                   const double* q_scale, const double* q_add, float* out) {
  for (int j = 0; j < nq; ++j) {
    const double qs = q_scale[j], qa = q_add[j];
    const int32_t* sj = s + j * pitch;
    float* oj = out + j * pitch;
    for (int64_t r = 0; r < nr; ++r) {
      const double t = qs * static_cast<double>(sj[r]);
      const double u = static_cast<double>(row_scale[r]) * t;
      const double v = u + static_cast<double>(row_add[r]);
      oj[r] = static_cast<float>(v + qa);
    }
  }
}

}  // namespace postembed
