// Shared pieces of the CPU linear kernels: instruction-set selection, per-token activation
// quantization (must match kernels/ref.py quantize_activations_ref bit for bit), small SIMD
// helpers and argument checks. Everything is inline: included by linear_cpu.cpp and int8_cpu.cpp.
#pragma once

//
// Two builds share these sources. The torch extension (kernels/cpu.py) splits work with
// at::parallel_for and reports bad arguments with TORCH_CHECK. The torch-free library
// (dfplan/lite, built with -DDFPLAN_LITE) has neither: parallel_for runs on OpenMP there and
// DF_CHECK throws std::runtime_error. The kernels themselves are the same code in both.
#ifdef DFPLAN_LITE
#include <omp.h>

#include <sstream>
#include <stdexcept>
#include <string>
#else
// Only the ATen pieces used here: torch/extension.h (pybind11, the whole C++ API) takes
// several times longer to compile and is needed only by the file with the bindings.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#endif

#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>


namespace dfplan_cpu {

#ifdef DFPLAN_LITE
template <typename... A>
std::string cat(const A&... a) {
  std::ostringstream s;
  (s << ... << a);
  return s.str();
}
#define DF_CHECK(cond, ...) \
  do { if (!(cond)) throw std::runtime_error(::dfplan_cpu::cat(__VA_ARGS__)); } while (0)

// at::parallel_for's contract: f(b, e) over disjoint chunks covering [begin, end), inline
// when there is less than one grain of work or one thread; never nested.
template <typename F>
void parallel_for(int64_t begin, int64_t end, int64_t grain, const F& f) {
  const int64_t n = end - begin;
  if (n <= 0) return;
  const int64_t most = std::max<int64_t>(1, (n + std::max<int64_t>(grain, 1) - 1) / std::max<int64_t>(grain, 1));
  const int64_t nt = omp_in_parallel() ? 1 : std::min<int64_t>(omp_get_max_threads(), most);
  if (nt <= 1) {
    f(begin, end);
    return;
  }
  const int64_t chunk = (n + nt - 1) / nt;
#pragma omp parallel num_threads(static_cast<int>(nt))
  {
    const int64_t b = begin + omp_get_thread_num() * chunk;
    const int64_t e = std::min(end, b + chunk);
    if (b < e) f(b, e);
  }
}
#else
#define DF_CHECK TORCH_CHECK
template <typename F>
void parallel_for(int64_t begin, int64_t end, int64_t grain, const F& f) {
  at::parallel_for(begin, end, grain, f);
}
#endif

constexpr int64_t kPortable = 0;
constexpr int64_t kAvx2 = 1;
constexpr int64_t kAvx512 = 2;
constexpr int kTokTile = 8;      // tokens handled together: each weight byte is read once per tile
constexpr int64_t kRowTile = 64; // rows per tile: their bits stay in L1 while a token tile passes
// 1-bit weight layouts (kernels/packing.py): plain rows, or blocks of kRowTile rows stored
// column byte by column byte (what the one-token lookup kernel reads)
constexpr int64_t kRows = 0;
constexpr int64_t kRowBlocks = 1;

inline int64_t best_isa() {
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vnni"))
    return kAvx512;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return kAvx2;
  return kPortable;
}

inline int64_t resolve_isa(int64_t isa) {
  const int64_t best = best_isa();
  if (isa < 0) return best;
  DF_CHECK(isa <= best, "dfplan kernels: instruction set level ", isa,
              " is not supported by this CPU (best available: ", best, ")");
  return isa;
}

inline int64_t round_up(int64_t a, int64_t m) { return (a + m - 1) / m * m; }

// Software prefetch of the weight stream: each row asks for the bytes kPrefetch ahead of it.
// At batch 1 the hardware prefetcher alone left the GEMVs short of DRAM bandwidth where they
// are not compute-bound: 1.3B's int8 head (50,288 x 2,048) 5.4 -> 3.5 ms on one thread; the
// 1-bit in_proj (8512 x 2048) on two threads 0.10-0.24 -> 0.07-0.15 ms (one thread: no
// difference, it is compute-bound there). 2, 8 and 16 KiB ahead measured the same as 4.
// A prefetch is a hint: past the end of the tensor it is dropped, never a fault.
constexpr int64_t kPrefetch = 4096;
inline void prefetch_ahead(const void* row, int64_t n) {
  const char* p = static_cast<const char*>(row) + kPrefetch;
  for (int64_t i = 0; i < n; i += 64) _mm_prefetch(p + i, _MM_HINT_T0);
}

// ---------------------------------------------------------------------------------------
// Activation quantization (portable; O(tokens * in), small next to the weight pass).
// Must match kernels/ref.py quantize_activations_ref bit for bit.
struct TokenQuant {
  float scale;   // amax / 127
  int32_t qsum;  // sum of the quantized values (for the 2P - sum trick)
};

// Round half to even without a libm call: adding 1.5 * 2**23 pushes the fraction out of
// the mantissa under the default rounding mode (|v| <= 127 here).
inline float round_even(float v) {
  const float magic = 12582912.0f;
  const float t = v + magic;  // not folded away: without -ffast-math this is not v
  return t - magic;
}

inline TokenQuant quantize_token_portable(const float* x, const float* col_scale, int64_t n,
                                          int8_t* q) {
  float amax = 0.f;
  for (int64_t i = 0; i < n; ++i) {
    const float v = col_scale ? x[i] * col_scale[i] : x[i];
    amax = std::max(amax, std::fabs(v));
  }
  const float inv = amax > 0.f ? 127.0f / amax : 0.0f;
  int32_t s = 0;
  for (int64_t i = 0; i < n; ++i) {
    const float v = col_scale ? x[i] * col_scale[i] : x[i];
    float r = round_even(v * inv);
    r = std::min(127.0f, std::max(-127.0f, r));
    q[i] = static_cast<int8_t>(r);
    s += q[i];
  }
  return {amax / 127.0f, s};
}

// Same results as the portable version: max is order-free, cvtps rounds half to even.
__attribute__((target("avx2"))) inline TokenQuant quantize_token_avx2(const float* x,
                                                               const float* col_scale,
                                                               int64_t n, int8_t* q) {
  const __m256 sign = _mm256_set1_ps(-0.0f);
  __m256 vmax = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    __m256 v = _mm256_loadu_ps(x + i);
    if (col_scale) v = _mm256_mul_ps(v, _mm256_loadu_ps(col_scale + i));
    vmax = _mm256_max_ps(vmax, _mm256_andnot_ps(sign, v));
  }
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes, vmax);
  float amax = 0.f;
  for (float l : lanes) amax = std::max(amax, l);
  for (; i < n; ++i) amax = std::max(amax, std::fabs(col_scale ? x[i] * col_scale[i] : x[i]));
  const float inv = amax > 0.f ? 127.0f / amax : 0.0f;
  const __m256 vinv = _mm256_set1_ps(inv);
  const __m256i lo = _mm256_set1_epi32(-127), hi = _mm256_set1_epi32(127);
  __m256i vs = _mm256_setzero_si256();
  alignas(32) int32_t qi[8];
  for (i = 0; i + 8 <= n; i += 8) {
    __m256 v = _mm256_loadu_ps(x + i);
    if (col_scale) v = _mm256_mul_ps(v, _mm256_loadu_ps(col_scale + i));
    __m256i r = _mm256_cvtps_epi32(_mm256_mul_ps(v, vinv));
    r = _mm256_min_epi32(hi, _mm256_max_epi32(lo, r));
    vs = _mm256_add_epi32(vs, r);
    _mm256_store_si256(reinterpret_cast<__m256i*>(qi), r);
    for (int k = 0; k < 8; ++k) q[i + k] = static_cast<int8_t>(qi[k]);
  }
  _mm256_store_si256(reinterpret_cast<__m256i*>(qi), vs);
  int32_t s = 0;
  for (int k = 0; k < 8; ++k) s += qi[k];
  for (; i < n; ++i) {
    const float v = col_scale ? x[i] * col_scale[i] : x[i];
    float r = round_even(v * inv);
    r = std::min(127.0f, std::max(-127.0f, r));
    q[i] = static_cast<int8_t>(r);
    s += q[i];
  }
  return {amax / 127.0f, s};
}

inline TokenQuant quantize_token(int64_t isa, const float* x, const float* col_scale, int64_t n,
                          int8_t* q) {
  return isa >= kAvx2 ? quantize_token_avx2(x, col_scale, n, q)
                      : quantize_token_portable(x, col_scale, n, q);
}

__attribute__((target("avx2"))) inline int32_t hsum_epi32_avx2(__m256i v) {
  __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4E));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xB1));
  return _mm_cvtsi128_si32(s);
}

// Template dispatch on the token tile size (register-resident accumulators).
template <template <int> class F, typename... A>
void with_tb(int tb, A... a) {
  switch (tb) {
    case 1: F<1>::run(a...); break;
    case 2: F<2>::run(a...); break;
    case 3: F<3>::run(a...); break;
    case 4: F<4>::run(a...); break;
    case 5: F<5>::run(a...); break;
    case 6: F<6>::run(a...); break;
    case 7: F<7>::run(a...); break;
    default: F<8>::run(a...); break;
  }
}

// ---------------------------------------------------------------------------------------
// The kernels' pointer-level entry points: the torch bindings check tensors and call these;
// the torch-free library (lite_cpu.cpp) calls them on the packed file's bytes directly.

// IEEE half -> float, exactly (c10::Half's conversion, without c10).
inline float half_to_float(uint16_t h) {
  const uint32_t sign = uint32_t(h & 0x8000u) << 16;
  const uint32_t exp = (h >> 10) & 0x1fu, man = h & 0x3ffu;
  uint32_t bits;
  if (exp == 0x1f) {
    bits = sign | 0x7f800000u | (man << 13);               // inf / nan
  } else if (exp != 0) {
    bits = sign | ((exp + 112) << 23) | (man << 13);       // normal: rebias 15 -> 127
  } else if (man == 0) {
    bits = sign;                                           // +-0
  } else {                                                 // subnormal: normalise
    int e = -1;
    uint32_t m = man;
    do { m <<= 1; ++e; } while (!(m & 0x400u));
    bits = sign | uint32_t(112 - e) << 23 | ((m & 0x3ffu) << 13);
  }
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

// float -> IEEE half, round to nearest even (the FP16 library's exact method: the float
// multiplies do the rounding).
inline uint16_t float_to_half(float f) {
  uint32_t w;
  std::memcpy(&w, &f, 4);
  const uint32_t shl1 = w + w, sign = w & 0x80000000u;
  uint32_t bias = shl1 & 0xff000000u;
  if (bias < 0x71000000u) bias = 0x71000000u;
  const float to_inf = 0x1.0p+112f, to_zero = 0x1.0p-110f;
  float base = (std::fabs(f) * to_inf) * to_zero;
  const uint32_t bb = (bias >> 1) + 0x07800000u;
  float bf;
  std::memcpy(&bf, &bb, 4);
  base = bf + base;
  uint32_t b;
  std::memcpy(&b, &base, 4);
  const uint32_t nonsign = ((b >> 13) & 0x7c00u) + (b & 0x0fffu);
  return static_cast<uint16_t>((sign >> 16) | (shl1 > 0xff000000u ? 0x7e00u : nonsign));
}

// A per-row vector kept fp32, or fp16 where the AVX2 epilogue converts it in registers.
struct RowVec {
  const float* f32 = nullptr;
  const uint16_t* f16 = nullptr;
  explicit operator bool() const { return f32 || f16; }
  float at(int64_t o) const { return f32 ? f32[o] : half_to_float(f16[o]); }
};

// y (T, out) = the 1-bit linear of x (T, in): see linear_cpu.cpp for the formula.
struct BinaryWeights {
  const uint8_t* bits = nullptr;  // (out, nb): rows, or row blocks (layout)
  int64_t out = 0, in = 0, nb = 0, layout = 0;
  RowVec row_scale, bias, u_scale;
  const float* col_scale = nullptr;  // FBI (in,), with col_shift
  const float* col_shift = nullptr;
  const int8_t* u = nullptr;  // (out, r) int8 correction, with v (r, in) and v_scale (r,)
  const int8_t* v = nullptr;
  const float* v_scale = nullptr;
  int64_t r = 0;
};
void binary_linear_raw(const BinaryWeights& w, int64_t isa, const float* x, int64_t T, float* y);
// a . b over n floats (AVX2 + FMA, or portable)
float dot_f32(bool avx2, const float* a, const float* b, int64_t n);
// bits (out, nb) rows <-> row blocks, in place
void reorder_row_blocks_raw(uint8_t* bits, int64_t out, int64_t nb, bool to_blocks);

// y (T, out) = scale[o] * (q[o, :] . quantized x[t, :]) [+ bias[o]]
void int8_linear_raw(const int8_t* q, int64_t out, int64_t in, const float* scale,
                     const float* bias, int64_t isa, const float* x, int64_t T, float* y);

// n fp16 (or bf16) values -> fp32, exactly; vec: the AVX2 (F16C) conversion (step_cpu.cpp)
void widen16(bool bf16, bool vec, const uint16_t* src, float* dst, int64_t n);

// One Mamba-2 mixer token for B rows between in_proj and out_proj (step_cpu.cpp).
enum class StateType { f32 = 0, bf16 = 1, f16 = 2 };
struct StepWeights {
  const float* conv_w = nullptr;  // (conv_dim, d_conv)
  const float* conv_b = nullptr;  // (conv_dim,) or null
  const float *dt_bias = nullptr, *A_log = nullptr, *D = nullptr, *norm_w = nullptr;
  double eps = 1e-5;
  int64_t H = 0, P = 0, N = 0, G = 1, conv_dim = 0, d_conv = 0;
  bool d_per_channel = false, norm_before_gate = false;
};
// zx (B, d_inner + conv_dim + H); conv (B, conv_dim, d_conv) fp32 and ssm (B, H, P, N) in
// `st` updated in place; y (B, d_inner = H * P)
void mamba2_step_raw(const StepWeights& w, const float* zx, int64_t B, float* conv, void* ssm,
                     StateType st, bool use_avx2, float* y);

// residual += hidden (or = hidden on the first layer), then out = rmsnorm(residual) * w; the
// decode loops' norm (stack_cpu.cpp, lite_cpu.cpp). Same formula as F.rms_norm, summed in
// 8 independent lanes (the loop vectorizes): equal to torch's to ~1e-7, not bit for bit.
inline void add_rms_norm(const float* hidden, float* residual, bool first, const float* w,
                         float eps, int64_t B, int64_t d, float* out) {
  for (int64_t b = 0; b < B; ++b) {
    const float* h = hidden + b * d;
    float* r = residual + b * d;
    float part[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    for (int64_t i = 0; i < d; ++i) {
      const float v = first ? h[i] : h[i] + r[i];
      r[i] = v;
      part[i % 8] += v * v;
    }
    float ss = 0.f;
    for (float p : part) ss += p;
    const float inv = 1.0f / std::sqrt(ss / float(d) + eps);
    float* o = out + b * d;
    for (int64_t i = 0; i < d; ++i) o[i] = r[i] * inv * w[i];
  }
}

#ifndef DFPLAN_LITE
// ---------------------------------------------------------------------------------------
// Argument checks (the Python side raises friendlier errors first; these keep the C++
// entry points safe on their own).

inline const float* opt_f32(const c10::optional<at::Tensor>& t, int64_t n, const char* name,
                            std::vector<at::Tensor>& keep) {
  if (!t.has_value()) return nullptr;
  const auto& v = *t;
  TORCH_CHECK(v.device().is_cpu(), name, " must be a CPU tensor");
  TORCH_CHECK(v.is_floating_point(), name, " must be a floating-point tensor, got ", v.scalar_type());
  TORCH_CHECK(v.dim() == 1 && v.size(0) == n, name, " must have shape (", n, "), got ", v.sizes());
  keep.push_back(v.to(at::kFloat).contiguous());
  return keep.back().data_ptr<float>();
}

// The result tensor: a fresh one, or the caller's (tests pass a poisoned one to prove that
// every element is written).
inline at::Tensor output(const c10::optional<at::Tensor>& buf, int64_t T, int64_t out) {
  if (!buf.has_value()) return at::empty({T, out}, at::TensorOptions().dtype(at::kFloat));
  const auto& y = *buf;
  TORCH_CHECK(y.device().is_cpu() && y.scalar_type() == at::kFloat && y.dim() == 2 &&
                  y.size(0) == T && y.size(1) == out && y.is_contiguous(),
              "out must be a contiguous float32 CPU tensor of shape (", T, ", ", out, ")");
  return y;
}

inline void check_x(const at::Tensor& x, int64_t in) {
  TORCH_CHECK(x.device().is_cpu(), "x must be a CPU tensor");
  TORCH_CHECK(x.scalar_type() == at::kFloat, "x must be float32, got ", x.scalar_type());
  TORCH_CHECK(x.dim() == 2 && x.size(1) == in, "x must have shape (tokens, ", in, "), got ", x.sizes());
  TORCH_CHECK(x.is_contiguous(), "x must be contiguous");
}

#endif  // DFPLAN_LITE

}  // namespace dfplan_cpu
