// Mamba-2 decode step on CPU: one token of the mixer between in_proj and out_proj, fused.
//
// The unfused torch version materialises several (B, H, P, N) temporaries per layer (2 MB
// each for Mamba-2 1.3B), which makes the recurrent state update, not the weights, the
// largest cost of a decoded token. Here every state element is read once and written once:
//   conv:  window shift + new input, depthwise taps + bias, SiLU          (per channel)
//   ssm:   s = s * exp(dt A) + dt x B;  y = s . C + D x;  y *= silu(z)     (per head, row)
//   norm:  RMSNorm per SSM group, times the norm weight
// Same maths as kernels/ref.py mamba2_step_ref (fp32 throughout); the AVX2 path differs from
// it only by fused multiply-adds, summation order and a polynomial exp (rel. error ~1e-7).
#include "cpu_common.h"

#include <immintrin.h>

#include <cmath>
#include <cstdlib>
#include <cstdint>
#include <cstring>
#include <vector>

namespace {

inline float silu(float v) { return v / (1.0f + std::exp(-v)); }
inline float softplus(float v) { return v > 20.0f ? v : std::log1p(std::exp(v)); }

// exp(x) = 2^n * e^r with n = round(x / ln 2), |r| <= ln2 / 2; e^r by its Taylor series to
// r^7 (truncation error < 1e-8 there). ln 2 is split in two parts so r stays exact.
__attribute__((target("avx2,fma"))) inline __m256 exp_avx2(__m256 x) {
  x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.0f)), _mm256_set1_ps(88.0f));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.0f / 5040);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 720));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 120));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 24));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 6));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(0.5f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}

__attribute__((target("avx2,fma"))) inline __m256 silu_avx2(__m256 v) {
  const __m256 one = _mm256_set1_ps(1.0f);
  return _mm256_div_ps(v, _mm256_add_ps(one, exp_avx2(_mm256_sub_ps(_mm256_setzero_ps(), v))));
}

__attribute__((target("avx2,fma"))) inline float hsum_avx2(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// One head-row: s[n] = s[n] * dA + dtx * B[n]; returns sum_n s[n] * C[n].
float ssm_row_portable(float* s, const float* B, const float* C, float dA, float dtx, int64_t N) {
  float y = 0.f;
  for (int64_t n = 0; n < N; ++n) {
    const float v = s[n] * dA + dtx * B[n];
    s[n] = v;
    y += v * C[n];
  }
  return y;
}

__attribute__((target("avx2,fma"))) float ssm_row_avx2(float* s, const float* B, const float* C,
                                                       float dA, float dtx, int64_t N) {
  const __m256 vdA = _mm256_set1_ps(dA), vdtx = _mm256_set1_ps(dtx);
  __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
  int64_t n = 0;
  for (; n + 16 <= N; n += 16) {
    __m256 a = _mm256_fmadd_ps(_mm256_loadu_ps(s + n), vdA, _mm256_mul_ps(vdtx, _mm256_loadu_ps(B + n)));
    __m256 b = _mm256_fmadd_ps(_mm256_loadu_ps(s + n + 8), vdA,
                               _mm256_mul_ps(vdtx, _mm256_loadu_ps(B + n + 8)));
    _mm256_storeu_ps(s + n, a);
    _mm256_storeu_ps(s + n + 8, b);
    acc0 = _mm256_fmadd_ps(a, _mm256_loadu_ps(C + n), acc0);
    acc1 = _mm256_fmadd_ps(b, _mm256_loadu_ps(C + n + 8), acc1);
  }
  float y = hsum_avx2(_mm256_add_ps(acc0, acc1));
  for (; n < N; ++n) {
    const float v = s[n] * dA + dtx * B[n];
    s[n] = v;
    y += v * C[n];
  }
  return y;
}

// v[i] *= silu(z[i])
__attribute__((target("avx2,fma"))) void gate_avx2(float* v, const float* z, int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    _mm256_storeu_ps(v + i, _mm256_mul_ps(_mm256_loadu_ps(v + i), silu_avx2(_mm256_loadu_ps(z + i))));
  for (; i < n; ++i) v[i] *= silu(z[i]);
}

void gate_portable(float* v, const float* z, int64_t n) {
  for (int64_t i = 0; i < n; ++i) v[i] *= silu(z[i]);
}

__attribute__((target("avx2,fma"))) void silu_inplace_avx2(float* v, int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) _mm256_storeu_ps(v + i, silu_avx2(_mm256_loadu_ps(v + i)));
  for (; i < n; ++i) v[i] = silu(v[i]);
}

// Eight channels of the width-4 causal conv at once: shift each window by one and append
// the new input, out[c] = sum_k win[c][k] * w[c][k]. Windows and weights are (channel, tap)
// rows of 16 bytes; two 4x4 transposes (one per 128-bit lane: channels c..c+3 and c+4..c+7)
// make each register one tap of eight channels, so the shift is a register rename. The
// scalar loop it replaces moved each window with a memmove call and then read it back with
// a 16-byte load the narrower stores could not forward: ~2.5 of the ~10 ms a 1.3B token
// spent in the fused step on one AVX2 core. Same taps in the same order as the scalar
// loop, with fused multiply-adds (as the rest of the AVX2 step); the windows are exact.
__attribute__((target("avx2,fma"))) inline void transpose4_lanes(__m256& a, __m256& b, __m256& c, __m256& d) {
  const __m256 t0 = _mm256_unpacklo_ps(a, b), t1 = _mm256_unpackhi_ps(a, b);
  const __m256 t2 = _mm256_unpacklo_ps(c, d), t3 = _mm256_unpackhi_ps(c, d);
  a = _mm256_castpd_ps(_mm256_unpacklo_pd(_mm256_castps_pd(t0), _mm256_castps_pd(t2)));
  b = _mm256_castpd_ps(_mm256_unpackhi_pd(_mm256_castps_pd(t0), _mm256_castps_pd(t2)));
  c = _mm256_castpd_ps(_mm256_unpacklo_pd(_mm256_castps_pd(t1), _mm256_castps_pd(t3)));
  d = _mm256_castpd_ps(_mm256_unpackhi_pd(_mm256_castps_pd(t1), _mm256_castps_pd(t3)));
}
__attribute__((target("avx2,fma"))) inline __m256 load_rows(const float* p, int64_t r) {
  // rows r and r + 4 of a (8, 4) block: [row r | row r + 4]
  return _mm256_insertf128_ps(_mm256_castps128_ps256(_mm_loadu_ps(p + 4 * r)), _mm_loadu_ps(p + 4 * (r + 4)), 1);
}
__attribute__((target("avx2,fma"))) void conv4x8_avx2(float* win, const float* w, const float* xnew,
                                                      const float* bias, float* out) {
  __m256 t0 = load_rows(win, 0), t1 = load_rows(win, 1), t2 = load_rows(win, 2), t3 = load_rows(win, 3);
  __m256 w0 = load_rows(w, 0), w1 = load_rows(w, 1), w2 = load_rows(w, 2), w3 = load_rows(w, 3);
  transpose4_lanes(t0, t1, t2, t3);  // t_k = tap k of channels [0..3 | 4..7]
  transpose4_lanes(w0, w1, w2, w3);
  __m256 x = _mm256_loadu_ps(xnew);
  __m256 acc = _mm256_mul_ps(t1, w0);
  acc = _mm256_fmadd_ps(t2, w1, acc);
  acc = _mm256_fmadd_ps(t3, w2, acc);
  acc = _mm256_fmadd_ps(x, w3, acc);
  if (bias) acc = _mm256_add_ps(acc, _mm256_loadu_ps(bias));
  _mm256_storeu_ps(out, acc);
  transpose4_lanes(t1, t2, t3, x);   // back to windows [t1, t2, t3, new]: rows [c | c + 4]
  const __m256 rows[4] = {t1, t2, t3, x};
  for (int r = 0; r < 4; ++r) {
    _mm_storeu_ps(win + 4 * r, _mm256_castps256_ps128(rows[r]));
    _mm_storeu_ps(win + 4 * (r + 4), _mm256_extractf128_ps(rows[r], 1));
  }
}

bool has_avx2() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
}

// Low-precision SSM state (bf16 / fp16, halving the state's memory traffic): each (token,
// head) block of P x N state is widened into a float buffer, updated by the fp32 code, and
// rounded back to nearest even; y is computed from the fp32 values (as the reference does).
void widen_bf16(const uint16_t* src, float* dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    const uint32_t u = uint32_t(src[i]) << 16;
    std::memcpy(dst + i, &u, 4);
  }
}
void narrow_bf16(const float* src, uint16_t* dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    uint32_t u;
    std::memcpy(&u, src + i, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) { dst[i] = uint16_t((u >> 16) | 0x40); continue; }  // NaN
    u += 0x7fffu + ((u >> 16) & 1u);
    dst[i] = uint16_t(u >> 16);
  }
}
__attribute__((target("avx2,fma"))) void widen_bf16_avx2(const uint16_t* src, float* dst, int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256i v = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i)));
    _mm256_storeu_ps(dst + i, _mm256_castsi256_ps(_mm256_slli_epi32(v, 16)));
  }
  widen_bf16(src + i, dst + i, n - i);
}
__attribute__((target("avx2,fma"))) void narrow_bf16_avx2(const float* src, uint16_t* dst, int64_t n) {
  int64_t i = 0;
  const __m256i bias = _mm256_set1_epi32(0x7fff), one = _mm256_set1_epi32(1);
  for (; i + 16 <= n; i += 16) {  // finite states only on this path (NaN rounds like a number)
    __m256i a = _mm256_castps_si256(_mm256_loadu_ps(src + i));
    __m256i b = _mm256_castps_si256(_mm256_loadu_ps(src + i + 8));
    a = _mm256_srli_epi32(_mm256_add_epi32(a, _mm256_add_epi32(bias, _mm256_and_si256(_mm256_srli_epi32(a, 16), one))), 16);
    b = _mm256_srli_epi32(_mm256_add_epi32(b, _mm256_add_epi32(bias, _mm256_and_si256(_mm256_srli_epi32(b, 16), one))), 16);
    const __m256i packed = _mm256_permute4x64_epi64(_mm256_packus_epi32(a, b), 0xD8);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + i), packed);
  }
  narrow_bf16(src + i, dst + i, n - i);
}
__attribute__((target("avx2,fma,f16c"))) void widen_f16_avx2(const uint16_t* src, float* dst, int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i))));
  for (; i < n; ++i) dst[i] = dfplan_cpu::half_to_float(src[i]);
}
__attribute__((target("avx2,fma,f16c"))) void narrow_f16_avx2(const float* src, uint16_t* dst, int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + i),
                     _mm256_cvtps_ph(_mm256_loadu_ps(src + i), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  for (; i < n; ++i) dst[i] = dfplan_cpu::float_to_half(src[i]);
}
void widen_f16(const uint16_t* src, float* dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = dfplan_cpu::half_to_float(src[i]);
}
void narrow_f16(const float* src, uint16_t* dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = dfplan_cpu::float_to_half(src[i]);
}

// One head-row with the state stored in 16 bits, converted in registers (no extra pass):
// s[n] = round16(s[n] * dA + dtx * B[n]); returns sum_n (fp32 update) * C[n], as the reference.
__attribute__((target("avx2,fma"))) inline __m256i round_bf16_avx2(__m256 v) {
  const __m256i u = _mm256_castps_si256(v);
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
  return _mm256_srli_epi32(_mm256_add_epi32(u, _mm256_add_epi32(_mm256_set1_epi32(0x7fff), lsb)), 16);
}
__attribute__((target("avx2,fma"))) float ssm_row_bf16_avx2(uint16_t* s, const float* B, const float* C,
                                                            float dA, float dtx, int64_t N) {
  const __m256 vdA = _mm256_set1_ps(dA), vdtx = _mm256_set1_ps(dtx);
  __m256 acc = _mm256_setzero_ps(), acc2 = _mm256_setzero_ps();
  int64_t n = 0;
  // 16 at a time: two independent C-dot chains, and one 256-bit pack + lane fix-up for both
  // halves instead of an extract + 128-bit pack per 8
  for (; n + 16 <= N; n += 16) {
    const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(s + n));
    const __m256 o0 = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm256_castsi256_si128(raw)), 16));
    const __m256 o1 = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm256_extracti128_si256(raw, 1)), 16));
    const __m256 v0 = _mm256_fmadd_ps(o0, vdA, _mm256_mul_ps(vdtx, _mm256_loadu_ps(B + n)));
    const __m256 v1 = _mm256_fmadd_ps(o1, vdA, _mm256_mul_ps(vdtx, _mm256_loadu_ps(B + n + 8)));
    acc = _mm256_fmadd_ps(v0, _mm256_loadu_ps(C + n), acc);
    acc2 = _mm256_fmadd_ps(v1, _mm256_loadu_ps(C + n + 8), acc2);
    // packus interleaves 128-bit lanes: [v0 lo, v1 lo, v0 hi, v1 hi] -> reorder the qwords
    const __m256i packed = _mm256_permute4x64_epi64(
        _mm256_packus_epi32(round_bf16_avx2(v0), round_bf16_avx2(v1)), 0xD8);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(s + n), packed);
  }
  for (; n + 8 <= N; n += 8) {
    const __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(s + n));
    const __m256 old = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(raw), 16));
    const __m256 v = _mm256_fmadd_ps(old, vdA, _mm256_mul_ps(vdtx, _mm256_loadu_ps(B + n)));
    acc = _mm256_fmadd_ps(v, _mm256_loadu_ps(C + n), acc);
    const __m256i r = round_bf16_avx2(v);
    const __m128i packed = _mm_packus_epi32(_mm256_castsi256_si128(r), _mm256_extracti128_si256(r, 1));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(s + n), packed);
  }
  float y = hsum_avx2(_mm256_add_ps(acc, acc2));
  for (; n < N; ++n) {
    float old;
    const uint32_t u = uint32_t(s[n]) << 16;
    std::memcpy(&old, &u, 4);
    const float v = old * dA + dtx * B[n];
    narrow_bf16(&v, s + n, 1);
    y += v * C[n];
  }
  return y;
}
// The bf16 row again, with fewer shuffles and shifts (the AVX2 row above is bound by them,
// not by memory). 16 states are one 256-bit load of 8 dwords, each [s_2k | s_2k+1]: the
// dword shifted left by 16 is the fp32 of s_2k, the dword with its low half cleared that of
// s_2k+1. So the row is worked on in even/odd order, against copies of B and C in that
// order (eo_order, made once per (token, group) and shared by all its heads' rows), and
// packed back by one blend: no widening shuffles and no lane fix-up. Same rounding (nearest
// even) and the same fp32 update as ssm_row_bf16_avx2; y sums in another order.
// eo: per 16-block, elements 0, 2, ..., 14 then 1, 3, ..., 15 (n16 = N rounded down to 16)
void eo_order(const float* src, int64_t n16, float* dst) {
  for (int64_t n = 0; n < n16; n += 16)
    for (int k = 0; k < 8; ++k) {
      dst[n + k] = src[n + 2 * k];
      dst[n + 8 + k] = src[n + 2 * k + 1];
    }
}
__attribute__((target("avx2,fma"))) inline __m256i round_bf16_hi_avx2(__m256 v) {  // bf16 in the high half
  const __m256i u = _mm256_castps_si256(v);
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
  return _mm256_add_epi32(u, _mm256_add_epi32(_mm256_set1_epi32(0x7fff), lsb));
}
__attribute__((target("avx2,fma"))) float ssm_row_bf16_eo_avx2(uint16_t* s, const float* Beo, const float* Ceo,
                                                               const float* B, const float* C, float dA,
                                                               float dtx, int64_t N) {
  const __m256 vdA = _mm256_set1_ps(dA), vdtx = _mm256_set1_ps(dtx);
  const __m256i hi16 = _mm256_set1_epi32(int32_t(0xFFFF0000u));
  __m256 acc = _mm256_setzero_ps(), acc2 = _mm256_setzero_ps();
  int64_t n = 0;
  for (; n + 16 <= N; n += 16) {
    const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(s + n));
    const __m256 oe = _mm256_castsi256_ps(_mm256_slli_epi32(raw, 16));
    const __m256 oo = _mm256_castsi256_ps(_mm256_and_si256(raw, hi16));
    const __m256 ve = _mm256_fmadd_ps(oe, vdA, _mm256_mul_ps(vdtx, _mm256_loadu_ps(Beo + n)));
    const __m256 vo = _mm256_fmadd_ps(oo, vdA, _mm256_mul_ps(vdtx, _mm256_loadu_ps(Beo + n + 8)));
    acc = _mm256_fmadd_ps(ve, _mm256_loadu_ps(Ceo + n), acc);
    acc2 = _mm256_fmadd_ps(vo, _mm256_loadu_ps(Ceo + n + 8), acc2);
    // even bf16 to the low half of its dword, odd stays in the high half
    const __m256i packed = _mm256_blend_epi16(_mm256_srli_epi32(round_bf16_hi_avx2(ve), 16),
                                              round_bf16_hi_avx2(vo), 0xAA);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(s + n), packed);
  }
  float y = hsum_avx2(_mm256_add_ps(acc, acc2));
  if (n < N) y += ssm_row_bf16_avx2(s + n, B + n, C + n, dA, dtx, N - n);
  return y;
}
__attribute__((target("avx2,fma,f16c"))) float ssm_row_f16_avx2(uint16_t* s, const float* B, const float* C,
                                                                float dA, float dtx, int64_t N) {
  const __m256 vdA = _mm256_set1_ps(dA), vdtx = _mm256_set1_ps(dtx);
  __m256 acc = _mm256_setzero_ps();
  int64_t n = 0;
  for (; n + 8 <= N; n += 8) {
    const __m256 old = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(s + n)));
    const __m256 v = _mm256_fmadd_ps(old, vdA, _mm256_mul_ps(vdtx, _mm256_loadu_ps(B + n)));
    acc = _mm256_fmadd_ps(v, _mm256_loadu_ps(C + n), acc);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(s + n), _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  }
  float y = hsum_avx2(acc);
  for (; n < N; ++n) {
    const float v = dfplan_cpu::half_to_float(s[n]) * dA + dtx * B[n];
    s[n] = dfplan_cpu::float_to_half(v);
    y += v * C[n];
  }
  return y;
}

// AVX-512 rows for the 16-bit states (16 lanes, two accumulators so the C-dot chain does
// not bound the row): the state is widened and rounded back in registers, with the same
// round-to-nearest-even as the AVX2 rows (bf16: integer rounding, not VCVTNEPS2BF16, which
// treats denormal inputs as zero). The last N % 32 elements go through the AVX2 row. An fp32
// twin measured slower than the AVX2 row (see mamba2_step) and is not kept.
enum StateKind { kBF16 = 1, kF16 = 2 };

template <int K>
__attribute__((target("avx512f,avx512bw,avx2,fma,f16c"))) inline __m512 load_state16(const uint16_t* s) {
  const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(s));
  if constexpr (K == kBF16)
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16));
  else
    return _mm512_cvtph_ps(raw);
}

template <int K>
__attribute__((target("avx512f,avx512bw,avx2,fma,f16c"))) inline void store_state16(uint16_t* s, __m512 v) {
  if constexpr (K == kBF16) {
    const __m512i u = _mm512_castps_si512(v);
    const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
    const __m512i r = _mm512_srli_epi32(_mm512_add_epi32(u, _mm512_add_epi32(_mm512_set1_epi32(0x7fff), lsb)), 16);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(s), _mm512_cvtepi32_epi16(r));
  } else {
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(s),
                        _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  }
}

template <int K>
__attribute__((target("avx512f,avx512bw,avx2,fma,f16c"))) float ssm_row16_avx512(uint16_t* s, const float* B,
                                                                             const float* C, float dA,
                                                                             float dtx, int64_t N) {
  const __m512 vdA = _mm512_set1_ps(dA), vdtx = _mm512_set1_ps(dtx);
  __m512 acc0 = _mm512_setzero_ps(), acc1 = _mm512_setzero_ps();
  int64_t n = 0;
  for (; n + 32 <= N; n += 32) {
    const __m512 a = _mm512_fmadd_ps(load_state16<K>(s + n), vdA,
                                     _mm512_mul_ps(vdtx, _mm512_loadu_ps(B + n)));
    const __m512 b = _mm512_fmadd_ps(load_state16<K>(s + n + 16), vdA,
                                     _mm512_mul_ps(vdtx, _mm512_loadu_ps(B + n + 16)));
    store_state16<K>(s + n, a);
    store_state16<K>(s + n + 16, b);
    acc0 = _mm512_fmadd_ps(a, _mm512_loadu_ps(C + n), acc0);
    acc1 = _mm512_fmadd_ps(b, _mm512_loadu_ps(C + n + 16), acc1);
  }
  float y = _mm512_reduce_add_ps(_mm512_add_ps(acc0, acc1));
  if (n < N) {
    if constexpr (K == kBF16)
      y += ssm_row_bf16_avx2(s + n, B + n, C + n, dA, dtx, N - n);
    else
      y += ssm_row_f16_avx2(s + n, B + n, C + n, dA, dtx, N - n);
  }
  return y;
}

bool has_avx512() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("f16c");
}

bool has_f16c() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("f16c");
}


}  // namespace

namespace dfplan_cpu {

void widen16(bool bf16, bool vec, const uint16_t* src, float* dst, int64_t n) {
  if (bf16)
    vec ? widen_bf16_avx2(src, dst, n) : widen_bf16(src, dst, n);
  else
    vec && has_f16c() ? widen_f16_avx2(src, dst, n) : widen_f16(src, dst, n);
}

void mamba2_step_raw(const StepWeights& w, const float* zx, int64_t Bsz, float* cs, void* ssm,
                     StateType st_type, bool use_avx2, float* yp) {
  const int64_t H = w.H, P = w.P, N = w.N, G = w.G, conv_dim = w.conv_dim, d_conv = w.d_conv;
  const int64_t d_inner = H * P;
  const float *cw = w.conv_w, *cb = w.conv_b, *dtb = w.dt_bias, *alog = w.A_log, *dp = w.D,
              *nw = w.norm_w;
  const double eps = w.eps;
  const bool d_per_channel = w.d_per_channel, norm_before_gate = w.norm_before_gate;
  const bool low = st_type != StateType::f32;
  float* ss = low ? nullptr : static_cast<float*>(ssm);
  uint16_t* ss16 = low ? static_cast<uint16_t*>(ssm) : nullptr;
  const bool f16c = use_avx2 && has_f16c();
  // use_avx2 means "vector paths"; the widest this CPU has is taken (DFPLAN_NO_AVX512=1 keeps
  // AVX2, for comparing the two)
  static const bool avx512_ok = [] {
    const char* no = std::getenv("DFPLAN_NO_AVX512");
    return has_avx512() && !(no && no[0] == '1');
  }();
  const bool avx512 = use_avx2 && avx512_ok;
  DF_CHECK(!use_avx2 || has_avx2(), "AVX2/FMA requested but not supported by this CPU");
  std::vector<float> xbc(static_cast<size_t>(Bsz * conv_dim));
  const int64_t zw = d_inner + conv_dim + H;

  // conv over (token, channel)
  const bool conv8 = use_avx2 && d_conv == 4;
  dfplan_cpu::parallel_for(0, Bsz * conv_dim, 1024, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1;) {
      const int64_t b = i / conv_dim, c = i % conv_dim;
      float* win = cs + i * d_conv;
      const float* w = cw + c * d_conv;
      if (conv8 && c + 8 <= conv_dim && i + 8 <= i1) {
        conv4x8_avx2(win, w, zx + b * zw + d_inner + c, cb ? cb + c : nullptr, xbc.data() + i);
        i += 8;
        continue;
      }
      float acc = 0.f;  // shift, append, dot: each tap read once, from a register
      for (int64_t k = 0; k + 1 < d_conv; ++k) {
        const float v = win[k + 1];
        win[k] = v;
        acc += v * w[k];
      }
      const float v = zx[b * zw + d_inner + c];
      win[d_conv - 1] = v;
      acc += v * w[d_conv - 1];
      xbc[i] = cb ? acc + cb[c] : acc;
      ++i;
    }
    if (use_avx2)
      silu_inplace_avx2(xbc.data() + i0, i1 - i0);
    else
      for (int64_t i = i0; i < i1; ++i) xbc[i] = silu(xbc[i]);
  });

  // ssm over (token, head): every state element read and written once
  // 16-bit state converted in registers by the AVX2 rows; otherwise (no AVX2, or fp16
  // without F16C) widened into an fp32 scratch per head and narrowed back
  const bool fused16 = low && use_avx2 && (st_type == StateType::bf16 || f16c);
  // While a head's rows are updated, the next head's same rows are asked for: its state
  // block (16 KB in bf16, 32 KB in fp32 on 1.3B) starts a new stream the hardware
  // prefetcher would only pick up after a few misses.
  const int64_t row_bytes = N * (low ? 2 : 4);
  const char* st_base = static_cast<const char*>(ssm);
  auto prefetch_next = [&](int64_t j, int64_t p) {
    if (j + 1 >= Bsz * H) return;
    const char* r = st_base + ((j + 1) * P + p) * row_bytes;
    for (int64_t k = 0; k < row_bytes; k += 64) _mm_prefetch(r + k, _MM_HINT_T0);
  };
  dfplan_cpu::parallel_for(0, Bsz * H, 1, [&](int64_t j0, int64_t j1) {
    std::vector<float> wide(low && !avx512 && !fused16 ? static_cast<size_t>(P * N) : 0);
    const bool eo = fused16 && !avx512 && st_type == StateType::bf16;
    const int64_t n16 = N / 16 * 16;
    std::vector<float> bc_eo(eo ? static_cast<size_t>(2 * n16) : 0);  // B, C in even/odd order
    int64_t eo_for = -1;                                              // of (token, group)
    for (int64_t j = j0; j < j1; ++j) {
      const int64_t b = j / H, h = j % H, g = h / (H / G);
      const float* xr = xbc.data() + b * conv_dim;
      const float* x = xr + h * P;
      const float* Bv = xr + d_inner + g * N;
      const float* Cv = xr + d_inner + G * N + g * N;
      const float dt = softplus(zx[b * zw + d_inner + conv_dim + h] + dtb[h]);
      const float dA = std::exp(dt * -std::exp(alog[h]));
      float* st = low ? wide.data() : ss + j * P * N;
      uint16_t* st16 = low ? ss16 + j * P * N : nullptr;
      float* yo = yp + b * d_inner + h * P;
      // fp32 stays on the AVX2 row: its 512-bit version measured slower on the one AVX-512
      // machine tried (1.3B, 48 layers, 1 thread: 11.3-13.0 ms against 6.9-11.3 ms); the
      // 16-bit states gain from the wider conversions (bf16 5.5-6.7 against 7.8-10.6 ms)
      if (avx512 && low) {
        for (int64_t p = 0; p < P; ++p) {
          prefetch_next(j, p);
          const float dtx = dt * x[p];
          const float v = st_type == StateType::bf16 ? ssm_row16_avx512<kBF16>(st16 + p * N, Bv, Cv, dA, dtx, N)
                                                   : ssm_row16_avx512<kF16>(st16 + p * N, Bv, Cv, dA, dtx, N);
          yo[p] = v + x[p] * (d_per_channel ? dp[h * P + p] : dp[h]);
        }
        continue;
      }
      if (eo) {
        if (eo_for != b * G + g) {
          eo_order(Bv, n16, bc_eo.data());
          eo_order(Cv, n16, bc_eo.data() + n16);
          eo_for = b * G + g;
        }
        for (int64_t p = 0; p < P; ++p) {
          prefetch_next(j, p);
          const float v = ssm_row_bf16_eo_avx2(st16 + p * N, bc_eo.data(), bc_eo.data() + n16, Bv, Cv,
                                               dA, dt * x[p], N);
          yo[p] = v + x[p] * (d_per_channel ? dp[h * P + p] : dp[h]);
        }
        continue;
      }
      if (fused16) {
        for (int64_t p = 0; p < P; ++p) {
          prefetch_next(j, p);
          const float dtx = dt * x[p];
          const float v = st_type == StateType::bf16
                              ? ssm_row_bf16_avx2(st16 + p * N, Bv, Cv, dA, dtx, N)
                              : ssm_row_f16_avx2(st16 + p * N, Bv, Cv, dA, dtx, N);
          yo[p] = v + x[p] * (d_per_channel ? dp[h * P + p] : dp[h]);
        }
        continue;
      }
      if (low) {
        if (st_type == StateType::bf16)
          use_avx2 ? widen_bf16_avx2(st16, st, P * N) : widen_bf16(st16, st, P * N);
        else
          f16c ? widen_f16_avx2(st16, st, P * N) : widen_f16(st16, st, P * N);
      }
      for (int64_t p = 0; p < P; ++p) {
        if (!low) prefetch_next(j, p);
        const float dtx = dt * x[p];
        const float v = use_avx2 ? ssm_row_avx2(st + p * N, Bv, Cv, dA, dtx, N)
                                 : ssm_row_portable(st + p * N, Bv, Cv, dA, dtx, N);
        yo[p] = v + x[p] * (d_per_channel ? dp[h * P + p] : dp[h]);
      }
      if (low) {
        if (st_type == StateType::bf16)
          use_avx2 ? narrow_bf16_avx2(st, st16, P * N) : narrow_bf16(st, st16, P * N);
        else
          f16c ? narrow_f16_avx2(st, st16, P * N) : narrow_f16(st, st16, P * N);
      }
    }
  });

  // gated RMSNorm per (token, group)
  const int64_t gs = d_inner / G;
  dfplan_cpu::parallel_for(0, Bsz * G, 1, [&](int64_t k0, int64_t k1) {
    for (int64_t k = k0; k < k1; ++k) {
      const int64_t b = k / G, g = k % G;
      float* v = yp + b * d_inner + g * gs;
      const float* z = zx + b * zw + g * gs;
      if (!norm_before_gate) use_avx2 ? gate_avx2(v, z, gs) : gate_portable(v, z, gs);
      double ssq = 0.0;
      for (int64_t i = 0; i < gs; ++i) ssq += double(v[i]) * v[i];
      const float r = 1.0f / std::sqrt(float(ssq / gs) + float(eps));
      for (int64_t i = 0; i < gs; ++i) v[i] = v[i] * r * nw[g * gs + i];
      if (norm_before_gate) use_avx2 ? gate_avx2(v, z, gs) : gate_portable(v, z, gs);
    }
  });
}

}  // namespace dfplan_cpu

#ifndef DFPLAN_LITE
namespace {
const float* f32_ptr(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kFloat && t.is_contiguous(), name,
              " must be a contiguous float32 CPU tensor");
  return t.data_ptr<float>();
}
}  // namespace

at::Tensor mamba2_step(const at::Tensor& zxbcdt, at::Tensor conv_state,
                          at::Tensor ssm_state, const at::Tensor& conv_weight,
                          const c10::optional<at::Tensor>& conv_bias,
                          const at::Tensor& dt_bias, const at::Tensor& A_log,
                          const at::Tensor& D, const at::Tensor& norm_weight, double eps,
                          int64_t ngroups, int64_t headdim, int64_t d_state,
                          bool norm_before_gate, bool use_avx2) {
  const int64_t Bsz = zxbcdt.size(0);
  const int64_t H = dt_bias.size(0), P = headdim, N = d_state, G = ngroups;
  const int64_t d_inner = H * P;
  TORCH_CHECK(conv_state.dim() == 3 && ssm_state.dim() == 4, "bad state ranks");
  const int64_t conv_dim = conv_state.size(1), d_conv = conv_state.size(2);
  TORCH_CHECK(conv_dim == d_inner + 2 * G * N, "conv_state width does not match the mixer");
  TORCH_CHECK(zxbcdt.dim() == 2 && zxbcdt.size(1) == d_inner + conv_dim + H,
              "zxbcdt must be (B, d_inner + conv_dim + nheads)");
  TORCH_CHECK(ssm_state.size(0) == Bsz && ssm_state.size(1) == H && ssm_state.size(2) == P &&
                  ssm_state.size(3) == N, "ssm_state must be (B, nheads, headdim, d_state)");
  TORCH_CHECK(H % G == 0 && d_inner % G == 0, "nheads must be a multiple of ngroups");
  TORCH_CHECK(conv_weight.numel() == conv_dim * d_conv, "conv_weight must have conv_dim * d_conv elements");
  TORCH_CHECK(D.numel() == H || D.numel() == d_inner, "D must have nheads or d_inner elements");
  const float* zx = f32_ptr(zxbcdt, "zxbcdt");
  float* cs = const_cast<float*>(f32_ptr(conv_state, "conv_state"));
  const auto st_type = ssm_state.scalar_type();
  TORCH_CHECK(ssm_state.device().is_cpu() && ssm_state.is_contiguous() &&
                  (st_type == at::kFloat || st_type == at::kBFloat16 || st_type == at::kHalf),
              "ssm_state must be a contiguous float32 / bfloat16 / float16 CPU tensor");
  const float* cw = f32_ptr(conv_weight, "conv_weight");
  const float* cb = conv_bias.has_value() ? f32_ptr(*conv_bias, "conv_bias") : nullptr;
  const float* dtb = f32_ptr(dt_bias, "dt_bias");
  const float* alog = f32_ptr(A_log, "A_log");
  const float* dp = f32_ptr(D, "D");
  const float* nw = f32_ptr(norm_weight, "norm_weight");
  TORCH_CHECK(!use_avx2 || has_avx2(), "AVX2/FMA requested but not supported by this CPU");
  const bool d_per_channel = D.numel() == d_inner;

  auto y = at::empty({Bsz, d_inner}, zxbcdt.options());
  dfplan_cpu::StepWeights w;
  w.conv_w = cw;
  w.conv_b = cb;
  w.dt_bias = dtb;
  w.A_log = alog;
  w.D = dp;
  w.norm_w = nw;
  w.eps = eps;
  w.H = H;
  w.P = P;
  w.N = N;
  w.G = G;
  w.conv_dim = conv_dim;
  w.d_conv = d_conv;
  w.d_per_channel = d_per_channel;
  w.norm_before_gate = norm_before_gate;
  const auto st = st_type == at::kFloat ? dfplan_cpu::StateType::f32
                  : st_type == at::kBFloat16 ? dfplan_cpu::StateType::bf16
                                             : dfplan_cpu::StateType::f16;
  dfplan_cpu::mamba2_step_raw(w, zx, Bsz, cs, ssm_state.data_ptr(), st, use_avx2, y.data_ptr<float>());
  return y;
}

bool step_has_avx2() { return has_avx2(); }
#endif  // DFPLAN_LITE
