// Thin pybind11 boundary of postembed_fast._C: argument checks happen here
// (and in the Python launchers), kernels live in their own files.
//
// The API takes raw pointers (tensor.data_ptr()) as integers, sizes, dtype /
// mode / precision codes (exported as DTYPE_CODES, MODE_CODES, PRECISION_CODES)
// and, for CUDA, a device index and a stream handle
// (torch.cuda.current_stream().cuda_stream). It never links libtorch. Every
// check failure raises ValueError (std::invalid_argument) before any kernel
// touches memory; the CPU kernels run with the GIL released.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <limits>
#include <memory>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "cuda_api.h"
#include "embedding_math.h"
#include "kernels.h"
#include "wordpiece.h"

namespace py = pybind11;
using namespace postembed;

namespace {

// Error messages are built by string appends, never iostreams: no locale state
// is needed to report an error (see csrc/CMakeLists.txt on the C++ runtime).
void append(std::string& s, const char* v) { s += v; }
void append(std::string& s, const std::string& v) { s += v; }
template <typename F>
void append_real(std::string& s, F v) {
  // Shortest %g form that reads back as v ("inf", "nan", "1e-05", "0.1").
  char buf[32];
  for (int prec = 6; prec <= 17; ++prec) {
    std::snprintf(buf, sizeof buf, "%.*g", prec, static_cast<double>(v));
    if (!std::isfinite(v) || static_cast<F>(std::strtod(buf, nullptr)) == v) break;
  }
  s += buf;
}
void append(std::string& s, double v) { append_real(s, v); }
void append(std::string& s, float v) { append_real(s, v); }
template <typename T, typename = std::enable_if_t<std::is_integral_v<T>>>
void append(std::string& s, T v) { s += std::to_string(v); }

template <typename... Ts>
std::string cat(const Ts&... parts) {
  std::string s;
  (append(s, parts), ...);
  return s;
}

#define PE_CHECK(cond, ...)                                              \
  do {                                                                   \
    if (!(cond)) throw std::invalid_argument(cat(__VA_ARGS__));          \
  } while (0)

constexpr int64_t kI32Max = std::numeric_limits<int32_t>::max();

void check_ptr(const char* fn, const char* name, uintptr_t p) { PE_CHECK(p != 0, fn, ": ", name, " is a null pointer"); }

// The attention, add_layernorm and bias_gelu kernels take float32 or bfloat16 (DTYPE_CODES).
void check_float32_or_bf16(const char* fn, int dtype) {
  PE_CHECK(dtype == kF32 || dtype == kBF16, fn, ": dtype code ", dtype, " is not float32 (0) or bfloat16 (2)");
}

void check_codes(const char* fn, int dtype, int precision) {
  PE_CHECK(dtype == kF32 || dtype == kF16 || dtype == kBF16, fn, ": invalid dtype code ", dtype,
           " (0=float32, 1=float16, 2=bfloat16)");
  if (precision < 0 || precision >= kNumPrecisions) {
    std::string valid;
    for (int c = 0; c < kNumPrecisions; ++c) valid += cat(c ? ", " : "", c, "=", kStoreKernels[c].name);
    throw std::invalid_argument(cat(fn, ": invalid precision code ", precision, " (", valid, ")"));
  }
}

void check_matrix(const char* fn, const char* name, int64_t rows, int64_t D, int64_t ld) {
  PE_CHECK(rows > 0, fn, ": ", name, " needs at least one row, got ", rows);
  PE_CHECK(D > 0, fn, ": D must be > 0, got ", D);
  PE_CHECK(ld >= D, fn, ": row pitch ld=", ld, " of ", name, " must be >= D=", D);
  PE_CHECK(rows <= std::numeric_limits<int64_t>::max() / 8 / ld, fn, ": ", name, " is too large (", rows, " x ", ld,
           ")");
}

// The caller's output buffer (sized by its precision table) against what the precision's kernel writes.
void check_out(const char* fn, int64_t B, int64_t D, int precision, int64_t out_rows, int64_t out_cols,
               int64_t out_itemsize) {
  const StoreKernel& k = kStoreKernels[precision];
  const int64_t cols = k.packed_bits ? (D + 7) / 8 : D;
  const int64_t isz = k.elem_size;
  PE_CHECK(out_rows == B && out_cols == cols, fn, ": out must be [", B, ", ", cols, "] for D=", D, " and precision code ",
           precision, ", got [", out_rows, ", ", out_cols, "]");
  PE_CHECK(out_itemsize == isz, fn, ": out element size must be ", isz, " bytes for precision code ", precision, ", got ",
           out_itemsize);
}

bool needs_ranges(int precision) { return kStoreKernels[precision].needs_ranges; }

void check_ranges_ptr(const char* fn, int precision, uintptr_t ranges) {
  if (needs_ranges(precision)) {
    PE_CHECK(ranges != 0, fn, ": ranges is a null pointer (", kStoreKernels[precision].name,
             " needs the [2, D] per-dimension ranges)");
  }
}

// Host-side re-check of cu_seqlens (CPU path only: reading it is cheap there).
void check_cu_host(const char* fn, const int32_t* cu, int64_t B, int64_t total) {
  PE_CHECK(cu[0] == 0, fn, ": cu_seqlens[0] must be 0, got ", cu[0]);
  for (int64_t i = 0; i < B; ++i) {
    PE_CHECK(cu[i + 1] > cu[i], fn, ": cu_seqlens must be strictly increasing, but cu_seqlens[", i + 1, "]=", cu[i + 1],
             " <= cu_seqlens[", i, "]=", cu[i]);
  }
  PE_CHECK(cu[B] == total, fn, ": cu_seqlens[-1]=", cu[B], " must equal total_tokens=", total);
}

void check_ranges_host(const char* fn, const float* r, int64_t D) {
  for (int64_t d = 0; d < D; ++d) {
    const float lo = r[d], hi = r[D + d];
    PE_CHECK(std::isfinite(lo) && std::isfinite(hi) && hi > lo, fn, ": ranges[:, ", d, "] = (", lo, ", ", hi,
             ") must be finite with max > min");
  }
}

PoolArgs pool_args(const char* fn, uintptr_t hidden, uintptr_t cu, int64_t total_tokens, int64_t B, int64_t D,
                   int64_t ld, int dtype, int mode, bool normalize, int precision, uintptr_t ranges, uintptr_t out,
                   int64_t out_rows, int64_t out_cols, int64_t out_itemsize) {
  check_codes(fn, dtype, precision);
  PE_CHECK(mode == kMean || mode == kCls, fn, ": invalid mode code ", mode, " (0=mean, 1=cls)");
  PE_CHECK(B > 0, fn, ": B (number of sequences) must be > 0, got ", B);
  check_matrix(fn, "hidden", total_tokens, D, ld);
  PE_CHECK(total_tokens <= kI32Max, fn, ": total_tokens=", total_tokens, " does not fit int32 cu_seqlens");
  PE_CHECK(B <= total_tokens, fn, ": B=", B, " sequences need at least B tokens, got total_tokens=", total_tokens);
  check_out(fn, B, D, precision, out_rows, out_cols, out_itemsize);
  check_ptr(fn, "hidden", hidden);
  check_ptr(fn, "cu_seqlens", cu);
  check_ptr(fn, "out", out);
  check_ranges_ptr(fn, precision, ranges);
  PoolArgs a;
  a.hidden = reinterpret_cast<const void*>(hidden);
  a.cu = reinterpret_cast<const int32_t*>(cu);
  a.total_tokens = total_tokens;
  a.B = B;
  a.D = D;
  a.ld = ld;
  a.dtype = dtype;
  a.mode = mode;
  a.normalize = normalize;
  a.precision = precision;
  a.lo = needs_ranges(precision) ? reinterpret_cast<const float*>(ranges) : nullptr;
  a.hi = a.lo ? a.lo + D : nullptr;
  a.out = reinterpret_cast<void*>(out);
  a.out_cols = out_cols;
  a.out_row_bytes = out_cols * out_itemsize;
  return a;
}

QuantArgs quant_args(const char* fn, uintptr_t x, int64_t B, int64_t D, int64_t ld, int dtype, int precision,
                     uintptr_t ranges, uintptr_t out, int64_t out_rows, int64_t out_cols, int64_t out_itemsize) {
  check_codes(fn, dtype, precision);
  check_matrix(fn, "x", B, D, ld);
  PE_CHECK(B <= kI32Max, fn, ": B=", B, " rows is too many for one launch");
  check_out(fn, B, D, precision, out_rows, out_cols, out_itemsize);
  check_ptr(fn, "x", x);
  check_ptr(fn, "out", out);
  check_ranges_ptr(fn, precision, ranges);
  QuantArgs a;
  a.x = reinterpret_cast<const void*>(x);
  a.B = B;
  a.D = D;
  a.ld = ld;
  a.dtype = dtype;
  a.precision = precision;
  a.lo = needs_ranges(precision) ? reinterpret_cast<const float*>(ranges) : nullptr;
  a.hi = a.lo ? a.lo + D : nullptr;
  a.out = reinterpret_cast<void*>(out);
  a.out_cols = out_cols;
  a.out_row_bytes = out_cols * out_itemsize;
  return a;
}

void py_pool_cpu(uintptr_t hidden, uintptr_t cu, int64_t total_tokens, int64_t B, int64_t D, int64_t ld, int dtype,
                 int mode, bool normalize, int precision, uintptr_t ranges, uintptr_t out, int64_t out_rows,
                 int64_t out_cols, int64_t out_itemsize) {
  const char* fn = "pool_normalize_cpu";
  const PoolArgs a = pool_args(fn, hidden, cu, total_tokens, B, D, ld, dtype, mode, normalize, precision, ranges, out,
                               out_rows, out_cols, out_itemsize);
  check_cu_host(fn, a.cu, B, total_tokens);
  if (a.lo) check_ranges_host(fn, a.lo, D);
  py::gil_scoped_release nogil;
  pool_normalize_cpu(a);
}

void py_quant_cpu(uintptr_t x, int64_t B, int64_t D, int64_t ld, int dtype, int precision, uintptr_t ranges,
                  uintptr_t out, int64_t out_rows, int64_t out_cols, int64_t out_itemsize) {
  const char* fn = "quantize_cpu";
  const QuantArgs a = quant_args(fn, x, B, D, ld, dtype, precision, ranges, out, out_rows, out_cols, out_itemsize);
  if (a.lo) check_ranges_host(fn, a.lo, D);
  py::gil_scoped_release nogil;
  quantize_cpu(a);
}

void py_attention_cpu(uintptr_t q, int64_t sqt, int64_t sqh, uintptr_t k, int64_t skt, int64_t skh, uintptr_t v,
                      int64_t svt, int64_t svh, uintptr_t out, int64_t sot, int64_t soh, uintptr_t cu,
                      int64_t total_tokens, int64_t B, int64_t H, int64_t D, double scale, int num_threads,
                      int dtype) {
  const char* fn = "varlen_attention_cpu";
  check_float32_or_bf16(fn, dtype);
  for (auto [name, p] : {std::pair{"q", q}, {"k", k}, {"v", v}, {"out", out}, {"cu_seqlens", cu}}) check_ptr(fn, name, p);
  PE_CHECK(D == 16 || D == 32 || D == 64 || D == 128, fn, ": head_dim must be 16, 32, 64 or 128, got ", D);
  PE_CHECK(B > 0 && H > 0, fn, ": need B > 0 sequences and H > 0 heads, got B=", B, ", H=", H);
  PE_CHECK(total_tokens >= B && total_tokens <= kI32Max, fn, ": total_tokens=", total_tokens,
           " must be in [B, 2^31 - 1]");
  for (auto st : {sqt, sqh, skt, skh, svt, svh}) PE_CHECK(st >= 0, fn, ": negative stride ", st);
  // heads of a token, and tokens, must not overlap in out (a single head or token may have any stride)
  PE_CHECK((H == 1 || soh >= D) && (total_tokens == 1 || sot >= (H - 1) * soh + D), fn,
           ": out rows overlap (strides ", sot, ", ", soh, " for H=", H, ", D=", D, ")");
  PE_CHECK(std::isfinite(scale), fn, ": scale must be finite, got ", scale);
  PE_CHECK(num_threads >= 1, fn, ": num_threads must be >= 1, got ", num_threads);
  AttnArgs a;
  a.q = reinterpret_cast<const void*>(q);
  a.k = reinterpret_cast<const void*>(k);
  a.v = reinterpret_cast<const void*>(v);
  a.out = reinterpret_cast<void*>(out);
  a.dtype = dtype;
  a.sqt = sqt, a.sqh = sqh, a.skt = skt, a.skh = skh, a.svt = svt, a.svh = svh, a.sot = sot, a.soh = soh;
  a.cu = reinterpret_cast<const int32_t*>(cu);
  a.B = B, a.H = H, a.D = D;
  a.scale = static_cast<float>(scale);
  a.num_threads = num_threads;
  check_cu_host(fn, a.cu, B, total_tokens);
  py::gil_scoped_release nogil;
  varlen_attention_cpu(a);
}

void py_add_layernorm_cpu(uintptr_t x, int64_t ldx, uintptr_t residual, int64_t ldr, uintptr_t weight, uintptr_t bias,
                          uintptr_t out, int64_t ldo, int64_t rows, int64_t H, double eps, int num_threads,
                          int dtype) {
  const char* fn = "add_layernorm_cpu";
  check_float32_or_bf16(fn, dtype);
  for (auto [name, p] : {std::pair{"x", x}, {"residual", residual}, {"weight", weight}, {"bias", bias}, {"out", out}})
    check_ptr(fn, name, p);
  PE_CHECK(rows > 0 && H > 0, fn, ": need rows > 0 and H > 0, got rows=", rows, ", H=", H);
  PE_CHECK((ldx >= H || ldx == 0) && ldo >= H && (ldr >= H || ldr == 0), fn, ": row pitches must be >= H=", H,
           " (x and residual may be 0: one row for all), got ldx=", ldx, ", ldr=", ldr, ", ldo=", ldo);
  PE_CHECK(eps >= 0 && std::isfinite(eps), fn, ": eps must be finite and >= 0, got ", eps);
  PE_CHECK(num_threads >= 1, fn, ": num_threads must be >= 1, got ", num_threads);
  LayerNormArgs a;
  a.x = reinterpret_cast<const void*>(x);
  a.residual = reinterpret_cast<const void*>(residual);
  a.weight = reinterpret_cast<const void*>(weight);
  a.bias = reinterpret_cast<const void*>(bias);
  a.out = reinterpret_cast<void*>(out);
  a.dtype = dtype;
  a.rows = rows, a.H = H, a.ldx = ldx, a.ldr = ldr, a.ldo = ldo;
  a.eps = static_cast<float>(eps);
  a.num_threads = num_threads;
  py::gil_scoped_release nogil;
  add_layernorm_cpu(a);
}

void py_bias_gelu_cpu(uintptr_t x, int64_t ldx, uintptr_t bias, uintptr_t out, int64_t ldo, int64_t rows, int64_t F,
                      int dtype, int num_threads) {
  const char* fn = "bias_gelu_cpu";
  check_float32_or_bf16(fn, dtype);
  check_ptr(fn, "x", x);
  check_ptr(fn, "out", out);
  PE_CHECK(rows > 0 && F > 0, fn, ": need rows > 0 and F > 0, got rows=", rows, ", F=", F);
  PE_CHECK((ldx >= F || ldx == 0 || rows == 1) && (ldo >= F || rows == 1), fn, ": row pitches must be >= F=", F,
           " (x may be 0: one row for all), got ldx=", ldx, ", ldo=", ldo);
  PE_CHECK(num_threads >= 1, fn, ": num_threads must be >= 1, got ", num_threads);
  BiasGeluArgs a;
  a.x = reinterpret_cast<const void*>(x);
  a.bias = reinterpret_cast<const void*>(bias);
  a.out = reinterpret_cast<void*>(out);
  a.rows = rows, a.F = F, a.ldx = ldx, a.ldo = ldo;
  a.dtype = dtype;
  a.num_threads = num_threads;
  py::gil_scoped_release nogil;
  bias_gelu_cpu(a);
}

void py_topk_cpu(int kind, uintptr_t q, int64_t nq, int64_t ldq, uintptr_t db, int64_t N, int64_t lddb, int64_t cols,
                 uintptr_t db_bias, uintptr_t allow, int64_t k, uintptr_t out_scores, uintptr_t out_idx,
                 int num_threads) {
  const char* fn = "topk_cpu";
  PE_CHECK(kind == kTopkBinary || kind == kTopkInt8 || kind == kTopkFloat32 || kind == kTopkSignDot, fn,
           ": invalid kind ", kind, " (0=binary, 1=int8, 2=float32, 3=sign-dot)");
  for (auto [name, p] : {std::pair{"q", q}, {"db", db}, {"out_scores", out_scores}, {"out_idx", out_idx}})
    check_ptr(fn, name, p);
  PE_CHECK(nq > 0 && N > 0 && cols > 0, fn, ": need nq > 0, N > 0 and cols > 0, got nq=", nq, ", N=", N, ", cols=",
           cols);
  // sign-dot: int8 queries of 8 * cols dimensions against cols bytes of sign bits per row
  const int64_t q_cols = kind == kTopkSignDot ? 8 * cols : cols;
  PE_CHECK(ldq >= q_cols && lddb >= cols, fn, ": row pitches must be ldq >= ", q_cols, " and lddb >= cols=", cols,
           ", got ldq=", ldq, ", lddb=", lddb);
  PE_CHECK(k >= 1 && k <= N, fn, ": k must be in [1, N=", N, "], got ", k);
  PE_CHECK(kind != kTopkInt8 || cols <= 16384, fn, ": int8 dim ", cols, " > 16384 overflows int32 scores");
  // sign-dot: sum_d (q_d + 128) b_d <= 255 * 8 * cols must fit int32
  PE_CHECK(kind != kTopkSignDot || cols <= (int64_t{1} << 19), fn, ": ", cols, " bytes per row (", 8 * cols,
           " dimensions) overflow int32");
  PE_CHECK(kind != kTopkSignDot || db_bias == 0, fn, ": sign-dot takes no db_bias");
  PE_CHECK(num_threads >= 1, fn, ": num_threads must be >= 1, got ", num_threads);
  PE_CHECK(nq <= std::numeric_limits<int64_t>::max() / 64 / k, fn, ": nq * k is too large");
  TopkArgs a;
  a.kind = kind;
  a.q = reinterpret_cast<const void*>(q);
  a.nq = nq, a.ldq = ldq;
  a.db = reinterpret_cast<const void*>(db);
  a.N = N, a.lddb = lddb, a.cols = cols;
  a.db_bias = reinterpret_cast<const int32_t*>(db_bias);
  a.allow = reinterpret_cast<const uint8_t*>(allow);
  a.k = k;
  a.out_scores = reinterpret_cast<void*>(out_scores);
  a.out_idx = reinterpret_cast<int64_t*>(out_idx);
  a.num_threads = num_threads;
  py::gil_scoped_release nogil;
  topk_cpu(a);
}

// RaBitQ scan (kind 4): the sign-dot arguments plus per-row float32 and per-query float64 factors.
void py_rabitq_topk_cpu(uintptr_t q, int64_t nq, int64_t ldq, uintptr_t db, int64_t N, int64_t lddb, int64_t cols,
                        uintptr_t row_scale, uintptr_t row_add, uintptr_t q_scale, uintptr_t q_add, uintptr_t allow,
                        int64_t k, uintptr_t out_scores, uintptr_t out_idx, int num_threads) {
  const char* fn = "rabitq_topk_cpu";
  for (auto [name, p] : {std::pair{"q", q}, {"db", db}, {"row_scale", row_scale}, {"row_add", row_add},
                         {"q_scale", q_scale}, {"q_add", q_add}, {"out_scores", out_scores}, {"out_idx", out_idx}})
    check_ptr(fn, name, p);
  PE_CHECK(nq > 0 && N > 0 && cols > 0, fn, ": need nq > 0, N > 0 and cols > 0, got nq=", nq, ", N=", N, ", cols=",
           cols);
  PE_CHECK(ldq >= 8 * cols && lddb >= cols, fn, ": row pitches must be ldq >= ", 8 * cols, " and lddb >= cols=", cols,
           ", got ldq=", ldq, ", lddb=", lddb);
  PE_CHECK(k >= 1 && k <= N, fn, ": k must be in [1, N=", N, "], got ", k);
  PE_CHECK(cols <= (int64_t{1} << 19), fn, ": ", cols, " bytes per row overflow int32");
  PE_CHECK(num_threads >= 1, fn, ": num_threads must be >= 1, got ", num_threads);
  PE_CHECK(nq <= std::numeric_limits<int64_t>::max() / 64 / k, fn, ": nq * k is too large");
  TopkArgs a;
  a.kind = kTopkRaBitQ;
  a.q = reinterpret_cast<const void*>(q);
  a.nq = nq, a.ldq = ldq;
  a.db = reinterpret_cast<const void*>(db);
  a.N = N, a.lddb = lddb, a.cols = cols;
  a.db_bias = nullptr;
  a.allow = reinterpret_cast<const uint8_t*>(allow);
  a.k = k;
  a.out_scores = reinterpret_cast<void*>(out_scores);
  a.out_idx = reinterpret_cast<int64_t*>(out_idx);
  a.num_threads = num_threads;
  a.row_scale = reinterpret_cast<const float*>(row_scale);
  a.row_add = reinterpret_cast<const float*>(row_add);
  a.q_scale = reinterpret_cast<const double*>(q_scale);
  a.q_add = reinterpret_cast<const double*>(q_add);
  py::gil_scoped_release nogil;
  topk_cpu(a);
}

[[noreturn]] void no_cuda(const char* fn) {
  throw std::runtime_error(cat(fn, ": postembed_fast._C was built without CUDA kernels"));
}

void py_pool_cuda(uintptr_t hidden, uintptr_t cu, int64_t total_tokens, int64_t B, int64_t D, int64_t ld, int dtype,
                  int mode, bool normalize, int precision, uintptr_t ranges, uintptr_t out, int64_t out_rows,
                  int64_t out_cols, int64_t out_itemsize, int device, uintptr_t stream) {
  const char* fn = "pool_normalize_cuda";
  const PoolArgs a = pool_args(fn, hidden, cu, total_tokens, B, D, ld, dtype, mode, normalize, precision, ranges, out,
                               out_rows, out_cols, out_itemsize);
  PE_CHECK(device >= 0, fn, ": device index must be >= 0, got ", device);
#ifdef POSTEMBED_WITH_CUDA
  PE_CHECK(B <= kI32Max, fn, ": B=", B, " sequences is too many for one launch");
  PE_CHECK(D <= pool_normalize_cuda_max_dim(), fn, ": D=", D, " exceeds the CUDA kernel's limit of ",
           pool_normalize_cuda_max_dim());
  py::gil_scoped_release nogil;
  pool_normalize_cuda(a, stream, device);
#else
  (void)a;
  (void)stream;
  no_cuda(fn);
#endif
}

void py_quant_cuda(uintptr_t x, int64_t B, int64_t D, int64_t ld, int dtype, int precision, uintptr_t ranges,
                   uintptr_t out, int64_t out_rows, int64_t out_cols, int64_t out_itemsize, int device,
                   uintptr_t stream) {
  const char* fn = "quantize_cuda";
  const QuantArgs a = quant_args(fn, x, B, D, ld, dtype, precision, ranges, out, out_rows, out_cols, out_itemsize);
  PE_CHECK(device >= 0, fn, ": device index must be >= 0, got ", device);
#ifdef POSTEMBED_WITH_CUDA
  py::gil_scoped_release nogil;
  quantize_cuda(a, stream, device);
#else
  (void)a;
  (void)stream;
  no_cuda(fn);
#endif
}

// ---- WordPiece on ASCII texts (csrc/wordpiece_cpu.cpp) ------------------------------------------
// texts: a list of str. Pure-ASCII compact strings are read in place (CPython stores them as bytes);
// every other text gets length -1 and is left to the caller. The strings are referenced while the
// GIL is released, so a concurrent change to the list cannot free them.
py::tuple py_wordpiece_encode(const AsciiWordPiece& wp, const py::list& texts, int num_threads) {
  const int64_t n = static_cast<int64_t>(PyList_GET_SIZE(texts.ptr()));
  std::vector<py::object> keep;
  keep.reserve(n);
  std::vector<const char*> ptrs(n, nullptr);
  std::vector<int64_t> sizes(n, 0);
  for (int64_t i = 0; i < n; ++i) {
    PyObject* o = PyList_GET_ITEM(texts.ptr(), i);
    PE_CHECK(PyUnicode_Check(o), "AsciiWordPiece.encode: texts[", i, "] must be str");
    keep.push_back(py::reinterpret_borrow<py::object>(o));
    if (PyUnicode_IS_COMPACT_ASCII(o)) {
      ptrs[i] = static_cast<const char*>(PyUnicode_DATA(o));
      sizes[i] = static_cast<int64_t>(PyUnicode_GET_LENGTH(o));
    }
  }
  py::array_t<int64_t> lens(n);
  int64_t* lens_ptr = lens.mutable_data();
  auto ids = std::make_unique<std::vector<int32_t>>();
  {
    py::gil_scoped_release nogil;
    wp.encode(ptrs.data(), sizes.data(), n, lens_ptr, *ids, num_threads);
  }
  // The numpy array owns the vector's buffer (no copy).
  std::vector<int32_t>* raw = ids.release();
  py::capsule owner(raw, [](void* p) { delete static_cast<std::vector<int32_t>*>(p); });
  py::array_t<int32_t> ids_arr({static_cast<py::ssize_t>(raw->size())}, {sizeof(int32_t)}, raw->data(), owner);
  return py::make_tuple(lens, ids_arr);
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "postembed_fast compiled kernels (C++/OpenMP, optional CUDA)";
  m.def("cuda_compiled", &postembed::cuda_compiled,
        "True if the CUDA kernels were compiled into this module");
  m.def("cuda_device_count", &postembed::cuda_device_count,
        "CUDA devices visible to the driver (0 without a driver or GPU)");
#ifdef _OPENMP
  m.attr("openmp") = true;
#else
  m.attr("openmp") = false;
#endif

  m.def("cpu_f16c", &postembed::f16c_enabled, "True if CPU float32->float16 conversion uses F16C instructions");
  m.def("_set_cpu_f16c_allowed", &postembed::set_f16c_allowed, py::arg("allowed"),
        "Testing hook: allow/forbid the F16C path (not thread-safe); returns the previous setting");

  m.def("cpu_avx2", &postembed::avx2_enabled,
        "True if the CPU attention and add_layernorm kernels run their AVX2+FMA builds");
  // The ISA level table's C++ side (csrc/cpu_isa.h; Python mirror kernels/cpu_isa.py).
  m.def("cpu_isa", [] { return static_cast<int>(postembed::cpu_isa()); },
        "The ISA level the CPU kernels use now: 0 baseline, 1 avx2, 2 avx512, 3 amx (detected, capped)");
  m.def("cpu_isa_detected", [] { return static_cast<int>(postembed::cpu_isa_detected()); },
        "The best ISA level this CPU and OS support (0 baseline, 1 avx2, 2 avx512, 3 amx)");
  m.def("_set_cpu_isa_cap", [](int cap) {
          if (cap < 0 || cap >= postembed::kIsaLevels) throw std::invalid_argument("ISA cap must be 0..3");
          return static_cast<int>(postembed::set_cpu_isa_cap(static_cast<postembed::Isa>(cap)));
        }, py::arg("cap"),
        "Cap the ISA level of every CPU kernel (POSTEMBED_CPU_ISA; tests); returns the previous cap. Not thread-safe");
  m.def("topk_cpu_level", &postembed::topk_cpu_level,
        "The build the CPU scans (binary, int8, float32, sign-dot, rabitq) run now: 0 baseline, 1 avx2,\n"
        "2 avx512 (needs VPOPCNTDQ and VNNI besides F/BW/VL/DQ)");
  m.def("cpu_features", [] {
          py::dict d;
          d["avx512_bf16"] = postembed::cpu_has_avx512_bf16();
          d["avx512_vnni"] = postembed::cpu_has_avx512_vnni();
          d["avx512_vpopcntdq"] = postembed::cpu_has_avx512_vpopcntdq();
          d["amx_bf16"] = postembed::cpu_has_amx_bf16();
          d["amx_int8"] = postembed::cpu_has_amx_int8();
          return d;
        }, "Sub-features the kernels may use at the current ISA level (each false when capped below it)");
  m.def("_set_attention_pair_dot_emulated", &postembed::set_attention_pair_dot_emulated, py::arg("on"),
        "Testing hook: bf16 attention through the portable emulation of its AVX512-BF16 pair-dot build (not\n"
        "thread-safe); returns the previous setting");
  m.def("varlen_attention_cpu", &py_attention_cpu,
        "softmax(q k^T * scale) v over packed sequences; q/k/v/out: data_ptr() integers with\n"
        "(token, head) strides in elements (head_dim contiguous); cu: int32 [B+1] ending at total_tokens;\n"
        "dtype: DTYPE_CODES float32 or bfloat16 (q, k, v, out alike; fp32 math).",
        py::arg("q"), py::arg("sqt"), py::arg("sqh"), py::arg("k"), py::arg("skt"), py::arg("skh"), py::arg("v"),
        py::arg("svt"), py::arg("svh"), py::arg("out"), py::arg("sot"), py::arg("soh"), py::arg("cu_seqlens"),
        py::arg("total_tokens"), py::arg("B"), py::arg("H"), py::arg("D"), py::arg("scale"), py::arg("num_threads"),
        py::arg("dtype") = int(kF32));

  m.def("add_layernorm_cpu", &py_add_layernorm_cpu,
        "out = LayerNorm(x + residual) * weight + bias, row by row; pointers are data_ptr() integers,\n"
        "ld* row pitches in elements (ldr may be 0); out may be x or residual (in place); dtype: DTYPE_CODES\n"
        "float32 or bfloat16 (all five tensors; fp32 statistics).",
        py::arg("x"), py::arg("ldx"), py::arg("residual"), py::arg("ldr"), py::arg("weight"), py::arg("bias"),
        py::arg("out"), py::arg("ldo"), py::arg("rows"), py::arg("H"), py::arg("eps"), py::arg("num_threads"),
        py::arg("dtype") = int(kF32));

  m.def("bias_gelu_cpu", &py_bias_gelu_cpu,
        "out = GELU(x + bias) (exact erf GELU) over rows of F; x/out data_ptr() integers with row pitches in\n"
        "elements, bias [F] or 0; out may be x; dtype: DTYPE_CODES float32 or bfloat16 (fp32 math).",
        py::arg("x"), py::arg("ldx"), py::arg("bias"), py::arg("out"), py::arg("ldo"), py::arg("rows"), py::arg("F"),
        py::arg("dtype"), py::arg("num_threads"));

  m.def("signdot_rerank_cpu",
        [](uintptr_t q, int64_t nq, int64_t ldq, uintptr_t db, int64_t N, int64_t lddb, int64_t cols, uintptr_t cand,
           int64_t P, int64_t k, uintptr_t out_s, uintptr_t out_i, int num_threads) {
          const char* fn = "signdot_rerank_cpu";
          for (auto [name, p] : {std::pair{"q", q}, {"db", db}, {"cand", cand}, {"out_s", out_s}, {"out_i", out_i}})
            check_ptr(fn, name, p);
          PE_CHECK(nq > 0 && N > 0 && cols > 0 && P > 0 && k >= 1, fn, ": need nq, N, cols, P > 0 and k >= 1, got nq=",
                   nq, ", N=", N, ", cols=", cols, ", P=", P, ", k=", k);
          PE_CHECK(ldq >= 8 * cols && lddb >= cols, fn, ": row pitches must be ldq >= 8 * cols and lddb >= cols");
          PE_CHECK(cols <= (int64_t{1} << 14), fn, ": ", cols, " bytes per row is too many (int32 scores)");
          PE_CHECK(num_threads >= 1, fn, ": num_threads must be >= 1, got ", num_threads);
          py::gil_scoped_release release;
          postembed::signdot_rerank_cpu(reinterpret_cast<const int8_t*>(q), nq, ldq, reinterpret_cast<const uint8_t*>(db),
                                        N, lddb, cols, reinterpret_cast<const int64_t*>(cand), P, k,
                                        reinterpret_cast<int32_t*>(out_s), reinterpret_cast<int64_t*>(out_i), num_threads);
        },
        "sign_dot_rerank's C++ kernel: the k best of each query's P candidates (int64 [nq, P], -1 = none) by\n"
        "sum_d q_d * (bit d ? +1 : -1) of raw packed bits; out_s int32 / out_i int64 [nq, k], best first, ties by row.",
        py::arg("q"), py::arg("nq"), py::arg("ldq"), py::arg("db"), py::arg("N"), py::arg("lddb"), py::arg("cols"),
        py::arg("cand"), py::arg("P"), py::arg("k"), py::arg("out_s"), py::arg("out_i"), py::arg("num_threads"));
  m.def("float16_rerank_cpu",
        [](uintptr_t q, int64_t nq, int64_t ldq, uintptr_t vec, int64_t N, int64_t ldv, int64_t D, uintptr_t cand,
           int64_t P, int64_t k, uintptr_t out_s, uintptr_t out_i, int num_threads) {
          const char* fn = "float16_rerank_cpu";
          for (auto [name, p] : {std::pair{"q", q}, {"vec", vec}, {"cand", cand}, {"out_s", out_s}, {"out_i", out_i}})
            check_ptr(fn, name, p);
          PE_CHECK(nq > 0 && N > 0 && D > 0 && P > 0 && k >= 1, fn, ": need nq, N, D, P > 0 and k >= 1, got nq=", nq,
                   ", N=", N, ", D=", D, ", P=", P, ", k=", k);
          PE_CHECK(ldq >= D && ldv >= D, fn, ": row pitches must be ldq >= D and ldv >= D, got ldq=", ldq, ", ldv=", ldv);
          PE_CHECK(num_threads >= 1, fn, ": num_threads must be >= 1, got ", num_threads);
          (void)N;  // rows of cand are checked in [-1, N) by the launcher
          py::gil_scoped_release release;
          postembed::float16_rerank_cpu(reinterpret_cast<const float*>(q), nq, ldq, reinterpret_cast<const uint16_t*>(vec),
                                        ldv, D, reinterpret_cast<const int64_t*>(cand), P, k,
                                        reinterpret_cast<float*>(out_s), reinterpret_cast<int64_t*>(out_i), num_threads);
        },
        "float16_rerank's C++ kernel: the k best of each query's P candidates (int64 [nq, P], -1 = none) by the\n"
        "float32 dot product of q (float32 [nq, D]) with float16 vectors [N, D]; out_s float32 / out_i int64 [nq, k],\n"
        "best first, ties by row, -inf / -1 past the candidates.",
        py::arg("q"), py::arg("nq"), py::arg("ldq"), py::arg("vec"), py::arg("N"), py::arg("ldv"), py::arg("D"),
        py::arg("cand"), py::arg("P"), py::arg("k"), py::arg("out_s"), py::arg("out_i"), py::arg("num_threads"));
  m.def("gated_signdot_topk_cpu",
        [](uintptr_t q, int64_t nq, int64_t ldq, uintptr_t q_bits, uintptr_t gate, uintptr_t db, int64_t N, int64_t lddb,
           int64_t cols, uintptr_t allow, int64_t k, uintptr_t out_s, uintptr_t out_i, int num_threads) {
          const char* fn = "gated_signdot_topk_cpu";
          for (auto [name, p] : {std::pair{"q", q}, {"q_bits", q_bits}, {"gate", gate}, {"db", db}, {"out_s", out_s},
                                 {"out_i", out_i}})
            check_ptr(fn, name, p);
          PE_CHECK(nq > 0 && N > 0 && cols > 0, fn, ": need nq > 0, N > 0 and cols > 0, got nq=", nq, ", N=", N,
                   ", cols=", cols);
          PE_CHECK(ldq >= 8 * cols && lddb >= cols, fn, ": row pitches must be ldq >= ", 8 * cols,
                   " and lddb >= cols=", cols, ", got ldq=", ldq, ", lddb=", lddb);
          PE_CHECK(k >= 1 && k <= N, fn, ": k must be in [1, N=", N, "], got ", k);
          PE_CHECK(cols <= (int64_t{1} << 19), fn, ": ", cols, " bytes per row overflow int32");
          PE_CHECK(num_threads >= 1, fn, ": num_threads must be >= 1, got ", num_threads);
          PE_CHECK(nq <= std::numeric_limits<int64_t>::max() / 64 / k, fn, ": nq * k is too large");
          TopkArgs a;
          a.kind = kTopkGatedSignDot;
          a.q = reinterpret_cast<const void*>(q);
          a.nq = nq, a.ldq = ldq;
          a.db = reinterpret_cast<const void*>(db);
          a.N = N, a.lddb = lddb, a.cols = cols;
          a.db_bias = nullptr;
          a.allow = reinterpret_cast<const uint8_t*>(allow);
          a.k = k;
          a.out_scores = reinterpret_cast<void*>(out_s);
          a.out_idx = reinterpret_cast<int64_t*>(out_i);
          a.num_threads = num_threads;
          a.q_bits = reinterpret_cast<const uint8_t*>(q_bits);
          a.gate = reinterpret_cast<const int32_t*>(gate);
          py::gil_scoped_release release;
          topk_cpu(a);
        },
        "gated_sign_dot_topk's C++ kernel: the sign-dot top-k (as kind 3) over the rows whose binary score\n"
        "8 * cols - Hamming(q_bits[i], row) is >= gate[i] (int32 [nq]); q_bits uint8 [nq, cols] contiguous, coded as db.",
        py::arg("q"), py::arg("nq"), py::arg("ldq"), py::arg("q_bits"), py::arg("gate"), py::arg("db"), py::arg("N"),
        py::arg("lddb"), py::arg("cols"), py::arg("allow"), py::arg("k"), py::arg("out_s"), py::arg("out_i"),
        py::arg("num_threads"));
  m.def("hamming_kth_cpu",
        [](uintptr_t q, int64_t nq, int64_t ldq, uintptr_t db, int64_t N, int64_t lddb, int64_t cols, uintptr_t allow,
           int64_t k, uintptr_t out, int num_threads) {
          const char* fn = "hamming_kth_cpu";
          for (auto [name, p] : {std::pair{"q", q}, {"db", db}, {"out", out}}) check_ptr(fn, name, p);
          PE_CHECK(nq > 0 && N > 0 && cols > 0 && k >= 1, fn, ": need nq, N, cols > 0 and k >= 1, got nq=", nq, ", N=",
                   N, ", cols=", cols, ", k=", k);
          PE_CHECK(ldq >= cols && lddb >= cols, fn, ": row pitches must be ldq >= cols and lddb >= cols=", cols);
          PE_CHECK(cols <= (int64_t{1} << 16), fn, ": ", cols, " bytes per row is too many (a histogram per query)");
          PE_CHECK(num_threads >= 1, fn, ": num_threads must be >= 1, got ", num_threads);
          py::gil_scoped_release release;
          postembed::hamming_kth_cpu(reinterpret_cast<const uint8_t*>(q), nq, ldq, reinterpret_cast<const uint8_t*>(db),
                                     N, lddb, cols, reinterpret_cast<const uint8_t*>(allow), k,
                                     reinterpret_cast<int32_t*>(out), num_threads);
        },
        "hamming_kth_score's C++ kernel: per query the k-th best 8 * cols - Hamming over the allowed rows\n"
        "(allow uint8 [N] or 0), INT32_MIN where fewer; out int32 [nq].",
        py::arg("q"), py::arg("nq"), py::arg("ldq"), py::arg("db"), py::arg("N"), py::arg("lddb"), py::arg("cols"),
        py::arg("allow"), py::arg("k"), py::arg("out"), py::arg("num_threads"));
  m.def("topk_cpu", &py_topk_cpu,
        "Exact top-k scan: kind 0=binary (8*cols - Hamming), 1=int8 (q.x + db_bias[row]), 2=float32 (q.x),\n"
        "3=sign-dot (sum_d q_d * (bit d set ? +1 : -1); q int8 [nq, 8 * cols], db packed bits [N, cols] in\n"
        "numpy.packbits order); q [nq, cols] / db [N, cols] with row pitches ldq / lddb (elements); db_bias int32 [N] or 0; allow\n"
        "uint8 [N] or 0; out_scores [nq, k] int32 (float32 for kind 2), out_idx int64 [nq, k]: best first,\n"
        "ties by lower row, missing candidates -1 with the lowest score. Uses the AVX2+POPCNT build when\n"
        "cpu_avx2() is True.",
        py::arg("kind"), py::arg("q"), py::arg("nq"), py::arg("ldq"), py::arg("db"), py::arg("N"), py::arg("lddb"),
        py::arg("cols"), py::arg("db_bias"), py::arg("allow"), py::arg("k"), py::arg("out_scores"),
        py::arg("out_idx"), py::arg("num_threads"));

  m.def("rabitq_topk_cpu", &py_rabitq_topk_cpu,
        "RaBitQ top-k (kernels/rabitq_topk.py): float32 scores row_scale[r] * (q_scale[i] * S) + row_add[r] + q_add[i]\n"
        "in double (left to right), S the sign-dot of int8 q [nq, 8 * cols] and packed bits db [N, cols];\n"
        "row_scale/row_add float32 [N], q_scale/q_add float64 [nq]; allow uint8 [N] or 0; out_scores float32 [nq, k],\n"
        "out_idx int64 [nq, k]: best first, ties by lower row, missing -1 with -inf. AVX2 build when cpu_avx2().",
        py::arg("q"), py::arg("nq"), py::arg("ldq"), py::arg("db"), py::arg("N"), py::arg("lddb"), py::arg("cols"),
        py::arg("row_scale"), py::arg("row_add"), py::arg("q_scale"), py::arg("q_add"), py::arg("allow"), py::arg("k"),
        py::arg("out_scores"), py::arg("out_idx"), py::arg("num_threads"));

  py::class_<AsciiWordPiece>(m, "AsciiWordPiece",
                             "BERT WordPiece for pure-ASCII texts (csrc/wordpiece_cpu.cpp); other texts are left to the caller.")
      .def(py::init([](std::vector<std::string> vocab, int32_t unk_id, std::string continuing_prefix,
                       int64_t max_input_chars_per_word, bool lowercase, std::vector<int32_t> prefix_ids,
                       std::vector<int32_t> suffix_ids, int64_t max_length, bool truncate_left,
                       std::vector<std::string> added_tokens) {
             PE_CHECK(max_length >= 0, "AsciiWordPiece: max_length must be >= 0 (0: no truncation), got ", max_length);
             PE_CHECK(max_input_chars_per_word > 0, "AsciiWordPiece: max_input_chars_per_word must be > 0");
             WordPieceConfig c;
             c.vocab = std::move(vocab);
             c.unk_id = unk_id;
             c.continuing_prefix = std::move(continuing_prefix);
             c.max_input_chars_per_word = max_input_chars_per_word;
             c.lowercase = lowercase;
             c.prefix_ids = std::move(prefix_ids);
             c.suffix_ids = std::move(suffix_ids);
             c.max_length = max_length;
             c.truncate_left = truncate_left;
             c.added_tokens = std::move(added_tokens);
             return AsciiWordPiece(std::move(c));
           }),
           py::arg("vocab"), py::arg("unk_id"), py::arg("continuing_prefix"), py::arg("max_input_chars_per_word"),
           py::arg("lowercase"), py::arg("prefix_ids"), py::arg("suffix_ids"), py::arg("max_length"),
           py::arg("truncate_left"), py::arg("added_tokens"))
      .def("encode", &py_wordpiece_encode,
           "texts (list of str) -> (lens int64 [N], ids int32 [T]): lens[i] = -1 for a text not handled here\n"
           "(not ASCII, or containing an added token); ids = the handled texts' ids in order. GIL released.",
           py::arg("texts"), py::arg("num_threads") = 0);

  py::dict dtypes, modes, precisions, store_kernels;
  dtypes["float32"] = int(kF32);
  dtypes["float16"] = int(kF16);
  dtypes["bfloat16"] = int(kBF16);
  modes["mean"] = int(kMean);
  modes["cls"] = int(kCls);
  for (int c = 0; c < kNumPrecisions; ++c) {
    const StoreKernel& k = kStoreKernels[c];
    precisions[k.name] = c;
    py::dict facts;
    facts["code"] = c;
    facts["elem_size"] = k.elem_size;
    facts["packed_bits"] = k.packed_bits;
    facts["needs_ranges"] = k.needs_ranges;
    store_kernels[k.name] = facts;
  }
  m.attr("DTYPE_CODES") = dtypes;
  m.attr("MODE_CODES") = modes;
  m.attr("PRECISION_CODES") = precisions;
  // What each precision code's kernel writes and reads (csrc/embedding_math.h kStoreKernels)
  m.attr("PRECISION_KERNELS") = store_kernels;

  const char* pool_doc =
      "Pool (mean/cls), optionally L2-normalize and quantize packed hidden states.\n"
      "hidden: [total_tokens, D] with row pitch ld (elements); cu: int32 [B+1]; ranges: float32 [2, D] or 0;\n"
      "out: contiguous [out_rows, out_cols] with out_itemsize-byte elements. Pointers are data_ptr() integers.";
  m.def("pool_normalize_cpu", &py_pool_cpu, pool_doc, py::arg("hidden"), py::arg("cu_seqlens"),
        py::arg("total_tokens"), py::arg("B"), py::arg("D"), py::arg("ld"), py::arg("dtype"), py::arg("mode"),
        py::arg("normalize"), py::arg("precision"), py::arg("ranges"), py::arg("out"), py::arg("out_rows"),
        py::arg("out_cols"), py::arg("out_itemsize"));
  m.def("pool_normalize_cuda", &py_pool_cuda, pool_doc, py::arg("hidden"), py::arg("cu_seqlens"),
        py::arg("total_tokens"), py::arg("B"), py::arg("D"), py::arg("ld"), py::arg("dtype"), py::arg("mode"),
        py::arg("normalize"), py::arg("precision"), py::arg("ranges"), py::arg("out"), py::arg("out_rows"),
        py::arg("out_cols"), py::arg("out_itemsize"), py::arg("device"), py::arg("stream"));
  const char* quant_doc =
      "Quantize float embeddings x [B, D] (row pitch ld) into out (see pool_normalize_cpu).";
  m.def("quantize_cpu", &py_quant_cpu, quant_doc, py::arg("x"), py::arg("B"), py::arg("D"), py::arg("ld"),
        py::arg("dtype"), py::arg("precision"), py::arg("ranges"), py::arg("out"), py::arg("out_rows"),
        py::arg("out_cols"), py::arg("out_itemsize"));
  m.def("quantize_cuda", &py_quant_cuda, quant_doc, py::arg("x"), py::arg("B"), py::arg("D"), py::arg("ld"),
        py::arg("dtype"), py::arg("precision"), py::arg("ranges"), py::arg("out"), py::arg("out_rows"),
        py::arg("out_cols"), py::arg("out_itemsize"), py::arg("device"), py::arg("stream"));
}
