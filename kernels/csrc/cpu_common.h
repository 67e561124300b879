// Shared pieces of the CPU linear kernels: instruction-set selection, per-token activation
// quantization (must match kernels/ref.py quantize_activations_ref bit for bit), small SIMD
// helpers and argument checks. Everything is inline: included by linear_cpu.cpp and int8_cpu.cpp.
#pragma once

// Only the ATen pieces used here: torch/extension.h (pybind11, the whole C++ API) takes
// several times longer to compile and is needed only by the file with the bindings.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>

#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>


namespace dfplan_cpu {

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
  TORCH_CHECK(isa <= best, "dfplan kernels: instruction set level ", isa,
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

}  // namespace dfplan_cpu
