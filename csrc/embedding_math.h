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

// What the store kernel of each PrecisionCode (finalize_row below) writes and reads, indexed by code:
// the compiled side of the precision table (kernels/precision.py), which sizes the output buffers
// and passes their width and element size as arguments. The bindings check those arguments against
// this (a mismatch is an error, never a write past the buffer) and export it as PRECISION_CODES /
// PRECISION_KERNELS; tests/test_precision.py checks both sides agree. A new precision: a row in the
// Python table, plus its kernel here: a code, a row below, a case in finalize_row.
struct StoreKernel {
  const char* name;
  int64_t elem_size;  // bytes per output element
  bool packed_bits;   // 8 dimensions per byte: ceil(D / 8) columns, else D
  bool needs_ranges;  // reads the per-dimension (min, max) ranges
};
constexpr StoreKernel kStoreKernels[] = {
    {"float32", 4, false, false}, {"float16", 2, false, false}, {"int8", 1, false, true},
    {"uint8", 1, false, true},    {"binary", 1, true, false},   {"ubinary", 1, true, false},
};
constexpr int kNumPrecisions = static_cast<int>(sizeof(kStoreKernels) / sizeof(kStoreKernels[0]));
static_assert(kNumPrecisions == kPUBinary + 1, "one kStoreKernels row per PrecisionCode");

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
  // Branch-free (selects only) so host loops vectorize; after F. Giesen's
  // float_to_half_fast3_rtne. Subnormal results: adding 0.5f rounds |f| to a
  // multiple of 2^-24 with the FPU's round-to-nearest-even. Normal results:
  // rebias and round the 13 dropped mantissa bits to nearest even (a carry can
  // bump the exponent, up to inf at >= 65520). nan -> quiet nan.
  const uint32_t x = float_to_bits(f);
  const uint32_t sign = x & 0x80000000u;
  const uint32_t ax = x ^ sign;
  const uint32_t sub = float_to_bits(bits_to_float(ax) + 0.5f) - 0x3f000000u;
  const uint32_t norm = (ax + 0xc8000fffu + ((ax >> 13) & 1u)) >> 13;  // 0xc8000000 == (15 - 127) << 23
  const uint32_t infnan = ax > 0x7f800000u ? 0x7e00u : 0x7c00u;
  uint32_t o = ax < 0x38800000u ? sub : norm;  // below 2^-14: subnormal or zero
  o = ax >= 0x47800000u ? infnan : o;          // >= 65536 (or inf/nan)
  return static_cast<uint16_t>(o | (sign >> 16));
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

// step = (max - min) / 255, per dimension (the CPU precomputes it once per call;
// the result is bit-identical to computing it inline).
// Ties are exact on every backend because each step is one IEEE operation: nvcc's default
// -prec-div=true makes '/' correctly rounded, and no a*b+c here can be contracted into an FMA.
PE_HD float quant_step(float lo, float hi) { return (hi - lo) / 255.0f; }

PE_HD uint8_t quantize_u8_step(float x, float lo, float step) {
  const float v = (x - lo) / step + 0.5f;
  // clip(floor(v), 0, 255) == min(trunc(clamp(v, 0, 256)), 255) for every v (nan -> 0,
  // +-inf -> 255 / 0); truncation of a value >= 0 is floor, and it vectorizes at the
  // baseline x86-64 ISA (cvttps2dq) where floorf does not.
  const float w = v > 0.0f ? (v < 256.0f ? v : 256.0f) : 0.0f;
  const int q = static_cast<int>(w);
  return static_cast<uint8_t>(q < 255 ? q : 255);
}

PE_HD uint8_t quantize_u8(float x, float lo, float hi) { return quantize_u8_step(x, lo, quant_step(lo, hi)); }

// Byte j of the packed sign bits of v[0..n) / denom: element 8j+k -> bit (7-k).
// (Constant trip count: both compilers unroll it fully at -O3.)
template <typename T>
PE_HD uint8_t pack_bits8(const T* v, int64_t n, int64_t j, float denom) {
  unsigned byte = 0;
  const int64_t base = j * 8;
  for (int k = 0; k < 8; ++k) {
    const int64_t d = base + k;
    if (d < n && load_f(v, d) / denom > 0.0f) byte |= 0x80u >> k;
  }
  return static_cast<uint8_t>(byte);
}

// v[d] / denom; kUnit: denom == 1, where the division is the identity and is skipped.
template <bool kUnit, typename T>
PE_HD float scaled_at(const T* v, int64_t d, float denom) {
  return kUnit ? load_f(v, d) : load_f(v, d) / denom;
}

template <bool kUnit, typename T>
PE_HD void finalize_row_impl(const T* v, int64_t D, float denom, int precision, const float* lo, const float* hi,
                             const float* step, void* out_row, int64_t start, int64_t stride) {
  switch (precision) {
    case kPFloat32: {
      float* o = static_cast<float*>(out_row);
      for (int64_t d = start; d < D; d += stride) o[d] = scaled_at<kUnit>(v, d, denom);
      break;
    }
    case kPFloat16: {
      uint16_t* o = static_cast<uint16_t*>(out_row);
      for (int64_t d = start; d < D; d += stride) o[d] = float_to_half_bits(scaled_at<kUnit>(v, d, denom));
      break;
    }
    case kPUInt8:
    case kPInt8: {
      // int8 = uint8 - 128: one loop body, the same bytes offset by 128 (two's complement)
      uint8_t* o = static_cast<uint8_t*>(out_row);
      const unsigned shift = precision == kPInt8 ? 128u : 0u;
      if (step != nullptr) {
        for (int64_t d = start; d < D; d += stride)
          o[d] = static_cast<uint8_t>(quantize_u8_step(scaled_at<kUnit>(v, d, denom), lo[d], step[d]) ^ shift);
      } else {
        for (int64_t d = start; d < D; d += stride)
          o[d] = static_cast<uint8_t>(quantize_u8(scaled_at<kUnit>(v, d, denom), lo[d], hi[d]) ^ shift);
      }
      break;
    }
    case kPUBinary:
    case kPBinary: {
      uint8_t* o = static_cast<uint8_t*>(out_row);
      const unsigned shift = precision == kPBinary ? 128u : 0u;
      const int64_t nb = (D + 7) / 8;
      for (int64_t j = start; j < nb; j += stride) o[j] = static_cast<uint8_t>(pack_bits8(v, D, j, denom) ^ shift);
      break;
    }
    default:
      break;  // validated at the boundary
  }
}

// Write one output row from v[0..D) / denom in the requested precision. Element
// (or packed byte) indices start, start+stride, ...: the CPU calls it with (0, 1),
// a CUDA block with (threadIdx.x, blockDim.x). lo/hi: per-dimension ranges
// (int8/uint8 only); step: quant_step(lo, hi) precomputed per dimension, or null
// to compute it inline. int8/binary bytes are the uint8/ubinary codes minus 128,
// written as (code ^ 0x80), which is the same two's-complement byte.
template <typename T>
PE_HD void finalize_row(const T* v, int64_t D, float denom, int precision, const float* lo, const float* hi,
                        const float* step, void* out_row, int64_t start, int64_t stride) {
  if (denom == 1.0f) {
    finalize_row_impl<true>(v, D, denom, precision, lo, hi, step, out_row, start, stride);
  } else {
    finalize_row_impl<false>(v, D, denom, precision, lo, hi, step, out_row, start, stride);
  }
}

}  // namespace postembed
