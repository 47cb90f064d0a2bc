// Kernel entry points behind the pybind11 boundary (bindings.cpp). Arguments are
// already validated there: pointers are non-null and point to buffers of the
// documented sizes, codes are valid, B > 0, D > 0.
#pragma once

#include <cstdint>

#include "cpu_isa.h"

namespace postembed {

// hidden: [total_tokens, D] rows ld elements apart (ld >= D), dtype by code;
// cu: int32 [B+1] on the same device; lo/hi: float32 [D] each (int8/uint8 only, else may be null);
// out: [B, out_cols] of the precision's element type, rows out_row_bytes apart (both from the caller's
// precision table, checked against kStoreKernels).
struct PoolArgs {
  const void* hidden;
  const int32_t* cu;
  int64_t total_tokens;
  int64_t B;
  int64_t D;
  int64_t ld;
  int dtype;
  int mode;
  bool normalize;
  int precision;
  const float* lo;
  const float* hi;
  void* out;
  int64_t out_cols;
  int64_t out_row_bytes;
};

// x: [B, D] rows ld elements apart; out as above.
struct QuantArgs {
  const void* x;
  int64_t B;
  int64_t D;
  int64_t ld;
  int dtype;
  int precision;
  const float* lo;
  const float* hi;
  void* out;
  int64_t out_cols;
  int64_t out_row_bytes;
};

// Attention over packed sequences, float32 or bfloat16 (dtype: kF32 / kBF16 of embedding_math.h, for
// q, k, v and out alike; fp32 math either way): q/k/v/out rows are tokens; element
// (t, h, d) of q lives at q[t * sqt + h * sqh + d] (likewise k, v, out).
// cu: int32 [B+1]; D in {16, 32, 64, 128}.
struct AttnArgs {
  const void* q;
  const void* k;
  const void* v;
  void* out;
  int64_t sqt, sqh, skt, skh, svt, svh, sot, soh;
  const int32_t* cu;
  int64_t B;
  int64_t H;
  int64_t D;
  float scale;
  int num_threads;
  int dtype = 0;  // kF32
};

// out = LayerNorm(x + residual) * weight + bias over rows of H, all five float32 or all bfloat16
// (dtype as above; fp32 sums and statistics either way); rows are
// ldx / ldr / ldo elements apart (ldr may be 0: one residual row for all). out may
// be x or residual itself, never a partial overlap.
struct LayerNormArgs {
  const void* x;
  const void* residual;
  const void* weight;
  const void* bias;
  void* out;
  int64_t rows, H, ldx, ldr, ldo;
  float eps;
  int num_threads;
  int dtype = 0;  // kF32
};

// out = GELU(x + bias) (exact erf GELU, BERT's "gelu") over rows of F, x / bias / out all float32 or all
// bfloat16 (dtype as above; fp32 math); rows ldx / ldo elements apart; bias [F] may be null; out may be x.
struct BiasGeluArgs {
  const void* x;
  const void* bias;
  void* out;
  int64_t rows, F, ldx, ldo;
  int dtype;
  int num_threads;
};

// Exact top-k scan (csrc/topk_cpu.cpp). q: [nq, cols] rows ldq elements apart; db: [N, cols] rows
// lddb elements apart (binary: bytes of packed bits; int8 / float32: dimensions); db_bias: int32 [N]
// added to int8 scores (may be null); allow: uint8 [N] (0 = skip the row; may be null).
// out_scores: [nq, k] int32 (binary, int8, sign-dot) or float32; out_idx: int64 [nq, k].
// Sign-dot (kind 3): db as binary (cols bytes of packed sign bits), q int8 [nq, 8 * cols] (ldq
// elements apart); score sum_d q_d (bit_d ? +1 : -1).
// RaBitQ (kind 4): q and db as sign-dot, float32 scores
//   float(row_scale[r] * (q_scale[i] * S) + row_add[r] + q_add[i])   (in double, left to right)
// of the exact integer sign-dot S (csrc/rabitq_cpu.cpp: rabitq_scores).
// Gated sign-dot (kind 5): q as sign-dot; q_bits [nq, cols] binary query codes (rows cols apart) and
// gate int32 [nq]: for query i only rows with 8 * cols - Hamming(q_bits[i], row) >= gate[i] are scored
// (kernels/sign_dot_topk.py gated_sign_dot_topk: the Hamming pre-filter fused into the scan).
enum TopkKind { kTopkBinary = 0, kTopkInt8 = 1, kTopkFloat32 = 2, kTopkSignDot = 3, kTopkRaBitQ = 4,
                kTopkGatedSignDot = 5 };
struct TopkArgs {
  int kind;
  const void* q;
  int64_t nq, ldq;
  const void* db;
  int64_t N, lddb, cols;
  const int32_t* db_bias;
  const uint8_t* allow;
  int64_t k;
  void* out_scores;
  int64_t* out_idx;
  int num_threads;
  // kind 4 only: per-row float32 [N] and per-query float64 [nq] factors
  const float* row_scale = nullptr;
  const float* row_add = nullptr;
  const double* q_scale = nullptr;
  const double* q_add = nullptr;
  // kind 5 only
  const uint8_t* q_bits = nullptr;
  const int32_t* gate = nullptr;
  // set by topk_cpu itself (kind 5): the sign-dot's prepared queries, their pitch in words
  const uint64_t* sd_prep = nullptr;
  int64_t sd_pitch = 0;
};
// RaBitQ scores of a tile: out[j * pitch + r] = float(row_scale[r] * (q_scale[j] * s[j * pitch + r]) +
// row_add[r] + q_add[j]) for j < nq, r < nr; double arithmetic without contraction (the numpy formula).
void rabitq_scores(const int32_t* s, int nq, int64_t nr, int64_t pitch, const float* row_scale, const float* row_add,
                   const double* q_scale, const double* q_add, float* out);
void topk_cpu(const TopkArgs& a);
// The build every CPU scan runs now: 0 baseline, 1 AVX2 + POPCNT, 2 AVX-512 with VPOPCNTDQ and VNNI
// (needs both; otherwise 1). Follows cpu_isa(), so POSTEMBED_CPU_ISA / the test cap lowers it.
int topk_cpu_level();
// The k best of each query's P candidate rows (cand [nq, P], -1 = none) by the sign-dot score of raw
// bits, best first, ties by the lower row; -1 / INT32_MIN past the candidates (kernels/sign_dot_topk.py).
void signdot_rerank_cpu(const int8_t* q, int64_t nq, int64_t ldq, const uint8_t* db, int64_t N, int64_t lddb,
                        int64_t cols, const int64_t* cand, int64_t P, int64_t k, int32_t* out_s, int64_t* out_i,
                        int num_threads);

// The k best of each query's P candidate rows (cand [nq, P], -1 = none) by the float32 dot product of
// q (float32 [nq, D], rows ldq apart) with float16 vectors (raw bits [N, D], rows ldv apart), best
// first, ties by the lower row; -1 / -inf past the candidates (kernels/float16_rerank.py).
void float16_rerank_cpu(const float* q, int64_t nq, int64_t ldq, const uint16_t* vec, int64_t ldv, int64_t D,
                        const int64_t* cand, int64_t P, int64_t k, float* out_s, int64_t* out_i, int num_threads);

// The k-th best binary score (8 * cols - Hamming) of each query over the allowed rows (allow may be
// null), INT32_MIN where fewer than k are allowed (kernels/hamming_kth_score.py).
void hamming_kth_cpu(const uint8_t* q, int64_t nq, int64_t ldq, const uint8_t* db, int64_t N, int64_t lddb,
                     int64_t cols, const uint8_t* allow, int64_t k, int32_t* out, int num_threads);

void pool_normalize_cpu(const PoolArgs& a);
void add_layernorm_cpu(const LayerNormArgs& a);
void varlen_attention_cpu(const AttnArgs& a);
// Testing hook: bf16 attention through the portable emulation of its AVX512-BF16 pair-dot build (the
// same layouts and operation order), so that build's code is tested on any CPU; returns the previous.
bool set_attention_pair_dot_emulated(bool on);
void bias_gelu_cpu(const BiasGeluArgs& a);
// True when cpu_isa() (cpu_isa.h) admits the AVX2+FMA+POPCNT builds; tests cap the level to
// exercise the baseline builds.
bool avx2_enabled();
// CPU float32 -> float16 uses F16C when the CPU has it (runtime check) unless
// disallowed; tests turn it off to exercise the portable conversion too.
bool f16c_enabled();
bool set_f16c_allowed(bool allowed);  // returns the previous setting
void quantize_cpu(const QuantArgs& a);

#ifdef POSTEMBED_WITH_CUDA
// Launch on `stream` (a cudaStream_t as an integer) of CUDA device `device`
// (all pointers live there); throws std::runtime_error on a launch error. Never
// synchronizes.
void pool_normalize_cuda(const PoolArgs& a, uintptr_t stream, int device);
void quantize_cuda(const QuantArgs& a, uintptr_t stream, int device);
// Largest D the CUDA pooling kernel takes (shared memory bound).
int64_t pool_normalize_cuda_max_dim();
#endif

}  // namespace postembed
