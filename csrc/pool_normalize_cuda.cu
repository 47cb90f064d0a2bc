// CUDA pool_normalize and quantize_embeddings. The element arithmetic is
// embedding_math.h, shared with (and tested through) the CPU kernel.
//
// pool_normalize: one block per sequence. The block is a (rows x cols) grid of
// threads: cols threads cover D in vectors of VEC elements (16-byte loads when
// the base pointer and row pitch allow it, else VEC = 1), rows token groups
// split the sequence's tokens. Partial fp32 sums go to shared memory, are
// reduced in a fixed order (deterministic), then the block computes the norm
// and writes the final row in the requested precision. Runs on the caller's
// stream; cu_seqlens is read on the device (no host sync). A corrupt cu_seqlens
// (not validated on GPU, that would sync) cannot make it read out of bounds:
// each sequence is clamped to [0, total_tokens) and an empty one pools to NaN.
#include <cuda_runtime.h>

#include <stdexcept>
#include <string>

#include "embedding_math.h"
#include "kernels.h"

namespace postembed {
namespace {

constexpr int kThreads = 256;
constexpr int64_t kMaxSmemBytes = 48 * 1024;  // default dynamic shared memory limit

// 16 bytes of T, converted to float.
template <typename T, int VEC>
__device__ __forceinline__ void load_vec(const T* p, float (&v)[VEC]) {
  if constexpr (VEC == 1) {
    v[0] = load_f(p, 0);
  } else {
    static_assert(sizeof(T) * VEC == 16, "16-byte vectors");
    const uint4 raw = __ldg(reinterpret_cast<const uint4*>(p));
    const T* e = reinterpret_cast<const T*>(&raw);
#pragma unroll
    for (int k = 0; k < VEC; ++k) v[k] = load_f(e, k);
  }
}

__device__ __forceinline__ float block_sum(float x, float* scratch) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(0xffffffffu, x, o);
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  if (lane == 0) scratch[warp] = x;
  __syncthreads();
  if (warp == 0) {
    const int nwarps = (blockDim.x + 31) >> 5;
    float y = lane < nwarps ? scratch[lane] : 0.0f;
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) y += __shfl_xor_sync(0xffffffffu, y, o);
    if (lane == 0) scratch[32] = y;
  }
  __syncthreads();
  return scratch[32];
}

template <typename T, int VEC>
__global__ void __launch_bounds__(kThreads)
pool_normalize_kernel(const T* __restrict__ x, const int32_t* __restrict__ cu, int64_t total_tokens, int64_t D,
                      int64_t ld, int rows, int cols, int mode, bool normalize, int precision,
                      const float* __restrict__ lo, const float* __restrict__ hi, char* __restrict__ out,
                      int64_t out_row_bytes) {
  extern __shared__ float smem[];
  const int64_t nvec = D / VEC;  // VEC > 1 only when VEC divides D
  const int64_t Dp = nvec * VEC;
  float* part = smem;                            // [rows][D] partial sums
  float* scratch = smem + static_cast<int64_t>(rows) * Dp;  // 33 floats for block_sum

  const int64_t b = blockIdx.x;
  int64_t start = cu[b], end = cu[b + 1];
  start = start < 0 ? 0 : (start > total_tokens ? total_tokens : start);
  end = end < start ? start : (end > total_tokens ? total_tokens : end);
  if (mode == kCls && end > start) end = start + 1;
  const int32_t count = static_cast<int32_t>(end - start);

  const int tid = threadIdx.x;
  const int r = tid / cols, c = tid % cols;
  if (r < rows) {
    for (int64_t v = c; v < nvec; v += cols) {
      float acc[VEC];
#pragma unroll
      for (int k = 0; k < VEC; ++k) acc[k] = 0.0f;
      for (int64_t t = start + r; t < end; t += rows) {
        float e[VEC];
        load_vec<T, VEC>(x + t * ld + v * VEC, e);
#pragma unroll
        for (int k = 0; k < VEC; ++k) acc[k] += e[k];
      }
#pragma unroll
      for (int k = 0; k < VEC; ++k) part[r * Dp + v * VEC + k] = acc[k];
    }
  }
  __syncthreads();

  // Fixed-order reduction over token groups, then mean; column d belongs to one thread.
  float ss = 0.0f;
  for (int64_t d = tid; d < D; d += blockDim.x) {
    float s = part[d];
    for (int rr = 1; rr < rows; ++rr) s += part[rr * Dp + d];
    const float m = mode == kCls ? s : mean_of(s, count);
    part[d] = m;
    ss += m * m;
  }
  ss = block_sum(ss, scratch);  // also the barrier before other threads read part[0][*]
  finalize_row(static_cast<const float*>(part), D, l2_denom(ss, normalize), precision, lo, hi, nullptr,
               out + b * out_row_bytes, tid, blockDim.x);
}

template <typename T>
__global__ void quantize_kernel(const T* __restrict__ x, int64_t D, int64_t ld, int precision,
                                const float* __restrict__ lo, const float* __restrict__ hi,
                                char* __restrict__ out, int64_t out_row_bytes) {
  const int64_t b = blockIdx.x;
  finalize_row(x + b * ld, D, 1.0f, precision, lo, hi, nullptr, out + b * out_row_bytes, threadIdx.x, blockDim.x);
}

void check_launch(const char* what) {
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) throw std::runtime_error(std::string(what) + ": CUDA launch failed: " + cudaGetErrorString(err));
}

// Makes `device` current for the launch (torch's current device may differ from
// the tensor's) and restores the previous one.
struct DeviceGuard {
  int prev = -1;
  explicit DeviceGuard(int device) {
    if (cudaGetDevice(&prev) != cudaSuccess) {
      cudaGetLastError();
      throw std::runtime_error("CUDA kernels: no usable CUDA device/driver");
    }
    if (prev != device && cudaSetDevice(device) != cudaSuccess) {
      cudaGetLastError();
      throw std::invalid_argument("CUDA kernels: invalid device index " + std::to_string(device));
    }
  }
  ~DeviceGuard() {
    int cur = -1;
    if (prev >= 0 && cudaGetDevice(&cur) == cudaSuccess && cur != prev) cudaSetDevice(prev);
  }
};

int vec_width(int dtype) { return dtype == kF32 ? 4 : 8; }

struct Layout {
  int vec, rows, cols;
  int64_t smem;
};

Layout pool_layout(const PoolArgs& a) {
  const int64_t esize = a.dtype == kF32 ? 4 : 2;
  const int wide = vec_width(a.dtype);
  const bool aligned = reinterpret_cast<uintptr_t>(a.hidden) % 16 == 0 && (a.ld * esize) % 16 == 0 && a.D % wide == 0;
  Layout l;
  l.vec = aligned ? wide : 1;
  const int64_t nvec = a.D / l.vec;
  l.cols = static_cast<int>(nvec < kThreads ? nvec : kThreads);
  l.rows = a.mode == kCls ? 1 : kThreads / l.cols;
  l.smem = (static_cast<int64_t>(l.rows) * nvec * l.vec + 33) * static_cast<int64_t>(sizeof(float));
  return l;
}

template <typename T>
void launch_pool(const PoolArgs& a, cudaStream_t stream) {
  const Layout l = pool_layout(a);
  if (l.smem > kMaxSmemBytes) throw std::invalid_argument("pool_normalize_cuda: D too large for the CUDA kernel");
  const int64_t row_bytes = a.out_row_bytes;
  const T* x = static_cast<const T*>(a.hidden);
  char* out = static_cast<char*>(a.out);
  const dim3 grid(static_cast<unsigned>(a.B)), block(kThreads);
#define PE_LAUNCH(V)                                                                                           \
  pool_normalize_kernel<T, V><<<grid, block, l.smem, stream>>>(x, a.cu, a.total_tokens, a.D, a.ld, l.rows, l.cols, \
                                                               a.mode, a.normalize, a.precision, a.lo, a.hi, out, \
                                                               row_bytes)
  if (l.vec == 1) {
    PE_LAUNCH(1);
  } else if constexpr (sizeof(T) == 4) {
    PE_LAUNCH(4);
  } else {
    PE_LAUNCH(8);
  }
#undef PE_LAUNCH
  check_launch("pool_normalize_cuda");
}

template <typename T>
void launch_quant(const QuantArgs& a, cudaStream_t stream) {
  const int64_t cols = a.out_cols;
  const int threads = cols >= 256 ? 256 : (cols >= 128 ? 128 : 64);
  quantize_kernel<T><<<static_cast<unsigned>(a.B), threads, 0, stream>>>(
      static_cast<const T*>(a.x), a.D, a.ld, a.precision, a.lo, a.hi, static_cast<char*>(a.out), a.out_row_bytes);
  check_launch("quantize_cuda");
}

}  // namespace

int64_t pool_normalize_cuda_max_dim() {
  // Worst case rows == 1 (cols == kThreads): D floats + scratch must fit.
  return kMaxSmemBytes / static_cast<int64_t>(sizeof(float)) - 33;
}

void pool_normalize_cuda(const PoolArgs& a, uintptr_t stream_handle, int device) {
  DeviceGuard guard(device);
  cudaStream_t stream = reinterpret_cast<cudaStream_t>(stream_handle);
  switch (a.dtype) {
    case kF32: launch_pool<float>(a, stream); break;
    case kF16: launch_pool<f16_t>(a, stream); break;
    case kBF16: launch_pool<bf16_t>(a, stream); break;
    default: throw std::invalid_argument("pool_normalize_cuda: bad dtype code");
  }
}

void quantize_cuda(const QuantArgs& a, uintptr_t stream_handle, int device) {
  DeviceGuard guard(device);
  cudaStream_t stream = reinterpret_cast<cudaStream_t>(stream_handle);
  switch (a.dtype) {
    case kF32: launch_quant<float>(a, stream); break;
    case kF16: launch_quant<f16_t>(a, stream); break;
    case kBF16: launch_quant<bf16_t>(a, stream); break;
    default: throw std::invalid_argument("quantize_cuda: bad dtype code");
  }
}

}  // namespace postembed
