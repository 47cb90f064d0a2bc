// Per-element arithmetic of pool_normalize / quantize_embeddings, written ONCE
// for the CPU kernel (g++) and the CUDA kernel (nvcc): the CPU tests exercise the
// very code the GPU runs. Formulas and op order follow kernels/quantize.py:
//   mean    = (fp32 sum over the sequence's tokens) / count
//   L2      = x / max(||x||, 1e-12)
//   uint8   = clip(floor((x - min) / ((max - min) / 255) + 0.5), 0, 255)   (fp32)
//   int8    = uint8 - 128
//   ubinary = bit (x > 0), 8 per byte, most significant bit first (numpy.packbits)
//   binary  = ubinary - 128 (as int8)
//   float16 = round-to-nearest-even cast
// Nothing here may be compiled with fast-math: the quantized codes depend on an
// IEEE division and floor.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#ifdef __CUDACC__
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#define PE_HD __host__ __device__ __forceinline__
#else
#define PE_HD inline
#endif

namespace postembed {

// Codes shared with Python (bindings.cpp exports them; kernels/cpp_ops.py reads them).
enum DTypeCode : int { kF32 = 0, kF16 = 1, kBF16 = 2 };
enum PoolMode : int { kMean = 0, kCls = 1 };
enum PrecisionCode : int { kPFloat32 = 0, kPFloat16 = 1, kPInt8 = 2, kPUInt8 = 3, kPBinary = 4, kPUBinary = 5 };

constexpr float kNormEps = 1e-12f;

// fp16/bf16 storage is handled as raw uint16_t bits everywhere (no half types in
// the interface), so host code needs no CUDA headers.
struct f16_t { uint16_t bits; };
struct bf16_t { uint16_t bits; };

PE_HD float bits_to_float(uint32_t u) {
#ifdef __CUDA_ARCH__
  return __uint_as_float(u);
#else
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
#endif
}

PE_HD uint32_t float_to_bits(float f) {
#ifdef __CUDA_ARCH__
  return __float_as_uint(f);
#else
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  return u;
#endif
}

// IEEE half -> float, exact. Branch-free on the host so the accumulation loop vectorizes.
PE_HD float half_to_float(uint16_t h) {
#ifdef __CUDA_ARCH__
  return __half2float(__ushort_as_half(h));
#else
  // Branch-free so the host accumulation loop vectorizes (F. Giesen's
  // half_to_float_fast5): place exponent+mantissa in a float and scale by
  // 2^(127-15), which rebiases normals and renormalizes subnormals exactly; an
  // all-ones half exponent lands at >= 2^16 and becomes inf/nan.
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const float scaled = bits_to_float(static_cast<uint32_t>(h & 0x7fffu) << 13) * 0x1p112f;
  const uint32_t infnan = (0u - static_cast<uint32_t>(scaled >= 65536.0f)) & 0x7f800000u;
  return bits_to_float(float_to_bits(scaled) | infnan | sign);
#endif
}

// bfloat16 -> float, exact (the high half of a float).
PE_HD float bf16_to_float(uint16_t b) {
#ifdef __CUDA_ARCH__
  return __bfloat162float(__ushort_as_bfloat16(b));
#else
  return bits_to_float(static_cast<uint32_t>(b) << 16);
#endif
}

// float -> IEEE half, round to nearest even (as torch's .to(torch.float16)).
PE_HD uint16_t float_to_half_bits(float f) {
#ifdef __CUDA_ARCH__
  return __half_as_ushort(__float2half_rn(f));
#else
  const uint32_t x = float_to_bits(f);
  const uint16_t sign = static_cast<uint16_t>((x >> 16) & 0x8000u);
  const uint32_t ax = x & 0x7fffffffu;
  if (ax >= 0x7f800000u) {  // inf or nan (keep nan quiet and non-zero)
    return static_cast<uint16_t>(sign | 0x7c00u | (ax > 0x7f800000u ? (0x0200u | ((ax >> 13) & 0x3ffu)) : 0u));
  }
  if (ax >= 0x477ff000u) return static_cast<uint16_t>(sign | 0x7c00u);  // rounds to >= 65520 -> inf
  if (ax < 0x38800000u) {  // below the smallest normal half (2^-14): subnormal or zero
    if (ax < 0x33000000u) return sign;  // < 2^-25: rounds to zero (2^-25 itself ties to even 0)
    const uint32_t e = ax >> 23;                     // 102..112
    const uint32_t m = (ax & 0x7fffffu) | 0x800000u;  // implicit bit
    const uint32_t shift = 126u - e;                 // 14..24
    uint32_t q = m >> shift;
    const uint32_t rem = m & ((1u << shift) - 1u);
    const uint32_t half = 1u << (shift - 1u);
    if (rem > half || (rem == half && (q & 1u))) ++q;
    return static_cast<uint16_t>(sign | q);
  }
  // normal: rebias, round the 13 dropped mantissa bits to nearest even (carry may bump the exponent)
  uint32_t r = ax - ((127u - 15u) << 23);
  r += 0x0fffu + ((r >> 13) & 1u);
  return static_cast<uint16_t>(sign | (r >> 13));
#endif
}

// Load element i of a float / fp16 / bf16 array as float.
PE_HD float load_f(const float* p, int64_t i) { return p[i]; }
PE_HD float load_f(const f16_t* p, int64_t i) { return half_to_float(p[i].bits); }
PE_HD float load_f(const bf16_t* p, int64_t i) { return bf16_to_float(p[i].bits); }

// ---- pooling / normalization ----------------------------------------------------

PE_HD float mean_of(float sum, int32_t count) { return sum / static_cast<float>(count); }

// Divisor of the L2 normalization (1 when normalization is off, so x / 1 == x).
PE_HD float l2_denom(float sum_sq, bool normalize) {
  return normalize ? fmaxf(sqrtf(sum_sq), kNormEps) : 1.0f;
}

// ---- quantization -----------------------------------------------------------------

PE_HD uint8_t quantize_u8(float x, float lo, float hi) {
  const float step = (hi - lo) / 255.0f;
  const float q = floorf((x - lo) / step + 0.5f);
  return static_cast<uint8_t>(fminf(fmaxf(q, 0.0f), 255.0f));  // fmaxf maps nan -> 0 (no UB cast)
}

PE_HD int8_t quantize_i8(float x, float lo, float hi) {
  return static_cast<int8_t>(static_cast<int>(quantize_u8(x, lo, hi)) - 128);
}

// Byte j of the packed sign bits of v[0..n) / denom: element 8j+k -> bit (7-k).
template <typename T>
PE_HD uint8_t pack_bits8(const T* v, int64_t n, int64_t j, float denom) {
  unsigned byte = 0;
  const int64_t base = j * 8;
#pragma unroll
  for (int k = 0; k < 8; ++k) {
    const int64_t d = base + k;
    if (d < n && load_f(v, d) / denom > 0.0f) byte |= 0x80u >> k;
  }
  return static_cast<uint8_t>(byte);
}

PE_HD int64_t output_cols(int64_t D, int precision) {
  return (precision == kPBinary || precision == kPUBinary) ? (D + 7) / 8 : D;
}

PE_HD int64_t output_elem_size(int precision) {
  return precision == kPFloat32 ? 4 : (precision == kPFloat16 ? 2 : 1);
}

// Write one output row from v[0..D) / denom in the requested precision. Element
// (or packed byte) indices start, start+stride, ...: the CPU calls it with (0, 1),
// a CUDA block with (threadIdx.x, blockDim.x). lo/hi: per-dimension ranges
// (int8/uint8 only).
template <typename T>
PE_HD void finalize_row(const T* v, int64_t D, float denom, int precision, const float* lo, const float* hi,
                        void* out_row, int64_t start, int64_t stride) {
  switch (precision) {
    case kPFloat32: {
      float* o = static_cast<float*>(out_row);
      for (int64_t d = start; d < D; d += stride) o[d] = load_f(v, d) / denom;
      break;
    }
    case kPFloat16: {
      uint16_t* o = static_cast<uint16_t*>(out_row);
      for (int64_t d = start; d < D; d += stride) o[d] = float_to_half_bits(load_f(v, d) / denom);
      break;
    }
    case kPUInt8: {
      uint8_t* o = static_cast<uint8_t*>(out_row);
      for (int64_t d = start; d < D; d += stride) o[d] = quantize_u8(load_f(v, d) / denom, lo[d], hi[d]);
      break;
    }
    case kPInt8: {
      int8_t* o = static_cast<int8_t*>(out_row);
      for (int64_t d = start; d < D; d += stride) o[d] = quantize_i8(load_f(v, d) / denom, lo[d], hi[d]);
      break;
    }
    case kPUBinary: {
      uint8_t* o = static_cast<uint8_t*>(out_row);
      const int64_t nb = (D + 7) / 8;
      for (int64_t j = start; j < nb; j += stride) o[j] = pack_bits8(v, D, j, denom);
      break;
    }
    case kPBinary: {
      int8_t* o = static_cast<int8_t*>(out_row);
      const int64_t nb = (D + 7) / 8;
      for (int64_t j = start; j < nb; j += stride)
        o[j] = static_cast<int8_t>(static_cast<int>(pack_bits8(v, D, j, denom)) - 128);
      break;
    }
    default:
      break;  // validated at the boundary
  }
}

}  // namespace postembed
