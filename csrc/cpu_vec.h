// Vector helpers of the CPU kernels that take float32 and bfloat16 (attention_cpu.cpp, layernorm_cpu.cpp,
// gelu_cpu.cpp): 8-float vectors as GCC/Clang vector extensions, so one source compiles for every ISA
// build (baseline SSE2 / NEON; AVX2+FMA and AVX-512 through target attributes, picked at run time), and
// loads / stores of 8 elements of either storage type with fp32 math in between.
//
// bfloat16 is stored as raw bits (embedding_math.h bf16_t) and converted by 16-bit shifts: bf16 -> fp32
// is exact (the high half of a float); fp32 -> bf16 rounds to nearest even, NaN -> 0x7fc0, exactly as
// torch's .to(torch.bfloat16), so a kernel's bf16 output equals torch's rounding of its fp32 result.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>

#include "embedding_math.h"

namespace postembed {
namespace vec {

#define PE_VEC_INLINE inline __attribute__((always_inline))

typedef float v8 __attribute__((vector_size(32)));
typedef int32_t v8i __attribute__((vector_size(32)));
typedef uint32_t v8u __attribute__((vector_size(32)));
typedef uint16_t v8h __attribute__((vector_size(16)));
typedef uint16_t v16h __attribute__((vector_size(32)));

// Spelled as a shuffle: GCC turns an initializer list into a chain of inserts.
PE_VEC_INLINE v8 splat(float x) {
#if defined(__clang__)
  const v8 v = {x};
  return __builtin_shufflevector(v, v, 0, 0, 0, 0, 0, 0, 0, 0);
#else
  return __builtin_shuffle(v8{x}, v8i{});
#endif
}
PE_VEC_INLINE v8u splat_u(uint32_t x) {
#if defined(__clang__)
  const v8u v = {x};
  return __builtin_shufflevector(v, v, 0, 0, 0, 0, 0, 0, 0, 0);
#else
  return __builtin_shuffle(v8u{x}, v8u{});
#endif
}
PE_VEC_INLINE v8 vmax(v8 a, v8 b) { return a > b ? a : b; }
PE_VEC_INLINE v8 at_least(v8 x, v8 lo) { return x < lo ? lo : x; }  // NaN stays NaN
PE_VEC_INLINE v8 at_most(v8 x, v8 hi) { return x > hi ? hi : x; }   // NaN stays NaN

PE_VEC_INLINE float hsum(v8 v) {
  float s = 0.f;
  for (int i = 0; i < 8; ++i) s += v[i];
  return s;
}
PE_VEC_INLINE float hmax(v8 v) {
  float m = v[0];
  for (int i = 1; i < 8; ++i) m = std::max(m, v[i]);
  return m;
}

// fp32 bits -> bf16 bits in the low half of each lane: round to nearest even, NaN -> 0x7fc0 (torch's rule).
PE_VEC_INLINE v8u round_to_bf16(v8u u) {
  const v8u nan = (u & 0x7fffffffu) > 0x7f800000u;
  const v8u r = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
  return nan ? splat_u(0x7fc0u) : r;
}

PE_VEC_INLINE v8 load8(const float* p) {
  v8 v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
PE_VEC_INLINE v8 load8(const bf16_t* p) {
  v8h h;
  std::memcpy(&h, p, sizeof h);
  const v8u u = __builtin_convertvector(h, v8u) << 16;
  v8 v;
  std::memcpy(&v, &u, sizeof v);
  return v;
}
PE_VEC_INLINE void store8(float* p, v8 v) { std::memcpy(p, &v, sizeof v); }
PE_VEC_INLINE void store8(bf16_t* p, v8 v) {
  v8u u;
  std::memcpy(&u, &v, sizeof u);
  const v8u r = round_to_bf16(u);
  v16h w;
  std::memcpy(&w, &r, sizeof w);
#if defined(__clang__) || __GNUC__ >= 12
  const v8h h = __builtin_shufflevector(w, w, 0, 2, 4, 6, 8, 10, 12, 14);  // the low halves (little-endian)
#else
  const v8h h = {w[0], w[2], w[4], w[6], w[8], w[10], w[12], w[14]};
#endif
  std::memcpy(p, &h, sizeof h);
}

// Scalar forms, for row tails.
PE_VEC_INLINE float to_float(float x) { return x; }
PE_VEC_INLINE float to_float(bf16_t x) { return bf16_to_float(x.bits); }
PE_VEC_INLINE void store1(float* p, float x) { *p = x; }
PE_VEC_INLINE void store1(bf16_t* p, float x) {
  const uint32_t u = float_to_bits(x);
  const bool nan = (u & 0x7fffffffu) > 0x7f800000u;
  p->bits = nan ? uint16_t{0x7fc0} : static_cast<uint16_t>((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

}  // namespace vec
}  // namespace postembed
