// Packed 1-bit and int8 linear layers on CPU.
//
// y[t, o] = row_scale[o] * (S[o, :] . x[t, :])        (S = +-1 from packed sign bits)
//         [+ col_shift . x[t, :]]                        (FBI: x is multiplied by col_scale first)
//         [+ u_scale[o] * u[o, :] . (v_scale * (v @ x[t, :]))]   (int8 low-rank correction)
//         [+ bias[o]]
//
// The sign product runs on integers: x (times col_scale) is quantized per token to int8
// (scale amax / 127, round half to even), and S . xq = 2 * sum_{bit=1} xq - sum(xq), so the
// inner loop only has to add up the activations whose weight bit is set. The correction,
// the FBI shift and the bias stay in fp32 (they are a few percent of the work).
//
// Three instruction-set paths share one binary: AVX-512 VNNI and AVX2 are compiled with
// function-level target attributes and chosen at runtime, so the library still loads and
// runs on a CPU without them (no -march flags). Work is split over output rows with
// at::parallel_for, i.e. torch's own OpenMP runtime (a second OpenMP runtime in the
// process would fight torch's threads).
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

namespace {

constexpr int64_t kPortable = 0;
constexpr int64_t kAvx2 = 1;
constexpr int64_t kAvx512 = 2;
constexpr int kTokTile = 8;      // tokens handled together: each weight byte is read once per tile
constexpr int64_t kRowTile = 64; // rows per tile: their bits stay in L1 while a token tile passes

int64_t best_isa() {
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vnni"))
    return kAvx512;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return kAvx2;
  return kPortable;
}

int64_t resolve_isa(int64_t isa) {
  const int64_t best = best_isa();
  if (isa < 0) return best;
  TORCH_CHECK(isa <= best, "dfplan kernels: instruction set level ", isa,
              " is not supported by this CPU (best available: ", best, ")");
  return isa;
}

inline int64_t round_up(int64_t a, int64_t m) { return (a + m - 1) / m * m; }

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

TokenQuant quantize_token_portable(const float* x, const float* col_scale, int64_t n, int8_t* q) {
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
__attribute__((target("avx2"))) TokenQuant quantize_token_avx2(const float* x,
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

TokenQuant quantize_token(int64_t isa, const float* x, const float* col_scale, int64_t n,
                          int8_t* q) {
  return isa >= kAvx2 ? quantize_token_avx2(x, col_scale, n, q)
                      : quantize_token_portable(x, col_scale, n, q);
}

// ---------------------------------------------------------------------------------------
// 1-bit kernels: P[t][o - o0] = sum over columns j with bit 1 of xq[t][j], for rows [o0, o1)
// and TB tokens. Zero-padded activations make the padding bits of the last byte harmless.

// Activation layout shared by the three paths: tokens are grouped in tiles of kTokTile,
// and inside a tile the data runs block by block, each block holding `bs` columns of every
// token of the tile in turn: offset(t, i) = t0 * nblk * bs + (i / bs) * tb * bs +
// (t - t0) * bs + pos(i % bs). All loads of one block are then a base pointer plus
// constants (no register pressure from many strided streams).
//   portable: bs = nb * 8 (one block), pos(c) = c
//   AVX-512:  bs = 64, pos(c) = c (natural order; 8 weight bytes = one 64-bit mask)
//   AVX2:     bs = 256, pos(c) = (c % 8) * 32 + c / 8 (bit-plane order, see below)
struct ActLayout {
  int64_t isa, bs, nblk;
  ActLayout(int64_t isa_, int64_t nb) : isa(isa_) {
    nb = std::max<int64_t>(nb, 1);
    if (isa == kAvx2) {
      bs = 256;
      nblk = (nb + 31) / 32;
    } else if (isa == kAvx512) {
      bs = 64;
      nblk = (nb + 7) / 8;
    } else {
      bs = nb * 8;
      nblk = 1;
    }
  }
  int64_t row_bytes() const { return bs * nblk; }
  // Scatter one token's quantized values (natural order, n of them) into place.
  void scatter(const int8_t* q, int64_t n, int64_t t, int64_t T, int8_t* base) const {
    const int64_t t0 = t / kTokTile * kTokTile;
    const int64_t tb = std::min<int64_t>(kTokTile, T - t0);
    int8_t* dst = base + t0 * row_bytes() + (t - t0) * bs;
    for (int64_t i0 = 0, blk = 0; i0 < n; i0 += bs, ++blk) {
      int8_t* d = dst + blk * tb * bs;
      const int64_t m = std::min(bs, n - i0);
      if (isa == kAvx2) {
        for (int64_t c = 0; c < m; ++c) d[(c & 7) * 32 + (c >> 3)] = q[i0 + c];
      } else {
        std::memcpy(d, q + i0, static_cast<size_t>(m));
      }
    }
  }
};

// Portable reference path (also the yardstick for the runtime self-check).
void bin_rows_portable(const uint8_t* bits, int64_t nb, int64_t o0, int64_t o1, int tb,
                       const int8_t* xq, int32_t* P, int64_t ld_p) {
  for (int64_t o = o0; o < o1; ++o) {
    const uint8_t* row = bits + o * nb;
    for (int t = 0; t < tb; ++t) {
      const int8_t* xt = xq + t * nb * 8;
      int32_t s = 0;
      for (int64_t j = 0; j < nb; ++j) {
        const unsigned b = row[j];
        const int8_t* xx = xt + 8 * j;
        for (int k = 0; k < 8; ++k) s += int32_t((b >> k) & 1u) * xx[k];
      }
      P[t * ld_p + (o - o0)] = s;
    }
  }
}

// AVX2: in bit-plane order, byte j of plane k holds column 8 j + k, so bit k of every
// weight byte lines up with plane k: shift, mask to 0/1, and maddubs adds pairs of
// selected activations into int16 lanes. Each lane gains at most 8 * 2 * 127 per 32-byte
// block, so lanes are widened to int32 every 8 blocks (16256 < 32767).
__attribute__((target("avx2"))) inline int32_t hsum_epi32_avx2(__m256i v) {
  __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4E));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xB1));
  return _mm_cvtsi128_si32(s);
}

template <int TB>
__attribute__((target("avx2"))) void bin_rows_avx2(const uint8_t* bits, int64_t nb, int64_t o0,
                                                   int64_t o1, const int8_t* xq, int32_t* P,
                                                   int64_t ld_p) {
  const __m256i one8 = _mm256_set1_epi8(1);
  const __m256i one16 = _mm256_set1_epi16(1);
  const int64_t nfull = nb / 32;
  const int64_t nblk = (nb + 31) / 32;
  alignas(32) uint8_t tail[32];
  for (int64_t o = o0; o < o1; ++o) {
    const uint8_t* row = bits + o * nb;
    // int32 totals live in memory (touched every 8 blocks) so the int16 accumulators,
    // the 8 masks and the constants fit the 16 ymm registers.
    alignas(32) int32_t acc32[TB][8] = {};
    __m256i acc16[TB];
    for (int t = 0; t < TB; ++t) acc16[t] = _mm256_setzero_si256();
    for (int64_t blk = 0; blk < nblk; ++blk) {
      __m256i b;
      if (blk < nfull) {
        b = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(row + blk * 32));
      } else {
        std::memset(tail, 0, 32);
        std::memcpy(tail, row + blk * 32, nb - blk * 32);
        b = _mm256_load_si256(reinterpret_cast<const __m256i*>(tail));
      }
      __m256i m[8];  // bit k of each byte as 0/1; bits leaking across bytes are masked
#pragma GCC unroll 8
      for (int k = 0; k < 8; ++k) {
        m[k] = _mm256_and_si256(b, one8);
        b = _mm256_srli_epi16(b, 1);
      }
      const int8_t* xb = xq + blk * (TB * 256);
#pragma GCC unroll 8
      for (int t = 0; t < TB; ++t) {
#pragma GCC unroll 8
        for (int k = 0; k < 8; ++k) {
          const __m256i xv =
              _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xb + t * 256 + k * 32));
          acc16[t] = _mm256_add_epi16(acc16[t], _mm256_maddubs_epi16(m[k], xv));
        }
      }
      if ((blk & 7) == 7 || blk == nblk - 1) {
        for (int t = 0; t < TB; ++t) {
          __m256i* a = reinterpret_cast<__m256i*>(acc32[t]);
          _mm256_store_si256(a, _mm256_add_epi32(_mm256_load_si256(a),
                                                 _mm256_madd_epi16(acc16[t], one16)));
          acc16[t] = _mm256_setzero_si256();
        }
      }
    }
    for (int t = 0; t < TB; ++t)
      P[t * ld_p + (o - o0)] =
          hsum_epi32_avx2(_mm256_load_si256(reinterpret_cast<const __m256i*>(acc32[t])));
  }
}

// AVX-512 VNNI: 8 packed bytes are exactly one __mmask64 over 64 naturally ordered
// activations (LSB first = mask bit order). The mask becomes 0/1 bytes once per 8 bytes
// and dpbusd multiplies them with each token's int8 activations.
template <int TB>
__attribute__((target("avx512f,avx512bw,avx512vnni"))) void bin_rows_avx512(
    const uint8_t* bits, int64_t nb, int64_t o0, int64_t o1, const int8_t* xq, int32_t* P,
    int64_t ld_p) {
  const __m512i one8 = _mm512_set1_epi8(1);
  const int64_t nfull = nb / 8;
  const int64_t nq = (nb + 7) / 8;
  for (int64_t o = o0; o < o1; ++o) {
    const uint8_t* row = bits + o * nb;
    __m512i acc[TB];
    for (int t = 0; t < TB; ++t) acc[t] = _mm512_setzero_si512();
    for (int64_t q = 0; q < nq; ++q) {
      uint64_t w = 0;
      if (q < nfull)
        std::memcpy(&w, row + q * 8, 8);
      else
        std::memcpy(&w, row + q * 8, nb - q * 8);
      const __m512i m = _mm512_maskz_mov_epi8(_cvtu64_mask64(w), one8);
      const int8_t* xb = xq + q * (TB * 64);
#pragma GCC unroll 8
      for (int t = 0; t < TB; ++t) {
        const __m512i xv = _mm512_loadu_si512(xb + t * 64);
        acc[t] = _mm512_dpbusd_epi32(acc[t], m, xv);
      }
    }
    for (int t = 0; t < TB; ++t) P[t * ld_p + (o - o0)] = _mm512_reduce_add_epi32(acc[t]);
  }
}

// ---------------------------------------------------------------------------------------
// int8 kernels: P[t][o - o0] = w[o, :] . xq[t, :] (int32), xq zero-padded to ld_x >= in.

void i8_rows_portable(const int8_t* w, int64_t in, int64_t o0, int64_t o1, int tb,
                      const int8_t* xq, int64_t ld_x, int32_t* P, int64_t ld_p) {
  for (int64_t o = o0; o < o1; ++o) {
    const int8_t* row = w + o * in;
    for (int t = 0; t < tb; ++t) {
      const int8_t* xt = xq + t * ld_x;
      int32_t s = 0;
      for (int64_t i = 0; i < in; ++i) s += int32_t(row[i]) * int32_t(xt[i]);
      P[t * ld_p + (o - o0)] = s;
    }
  }
}

// AVX2: maddubs needs one unsigned operand, so use |w| and move w's sign onto x
// (pairs stay within 2 * 128 * 127 < 32767); madd widens to int32 every step.
template <int TB>
__attribute__((target("avx2"))) void i8_rows_avx2(const int8_t* w, int64_t in, int64_t o0,
                                                  int64_t o1, const int8_t* xq, int64_t ld_x,
                                                  int32_t* P, int64_t ld_p) {
  const __m256i one16 = _mm256_set1_epi16(1);
  const int64_t nfull = in / 32;
  const int64_t nblk = (in + 31) / 32;
  alignas(32) int8_t tail[32];
  for (int64_t o = o0; o < o1; ++o) {
    const int8_t* row = w + o * in;
    __m256i acc[TB];
    for (int t = 0; t < TB; ++t) acc[t] = _mm256_setzero_si256();
    for (int64_t blk = 0; blk < nblk; ++blk) {
      __m256i wv;
      if (blk < nfull) {
        wv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(row + blk * 32));
      } else {
        std::memset(tail, 0, 32);
        std::memcpy(tail, row + blk * 32, in - blk * 32);
        wv = _mm256_load_si256(reinterpret_cast<const __m256i*>(tail));
      }
      const __m256i aw = _mm256_abs_epi8(wv);
#pragma GCC unroll 8
      for (int t = 0; t < TB; ++t) {
        const __m256i xv =
            _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq + t * ld_x + blk * 32));
        const __m256i p = _mm256_maddubs_epi16(aw, _mm256_sign_epi8(xv, wv));
        acc[t] = _mm256_add_epi32(acc[t], _mm256_madd_epi16(p, one16));
      }
    }
    for (int t = 0; t < TB; ++t) P[t * ld_p + (o - o0)] = hsum_epi32_avx2(acc[t]);
  }
}

// AVX-512 VNNI: dpbusd wants unsigned x, so feed xu = xq + 128 and subtract 128 * sum(w),
// whose dpbusd against ones is shared by the token tile. xu is padded with anything:
// the padded weights are zero.
template <int TB>
__attribute__((target("avx512f,avx512bw,avx512vnni"))) void i8_rows_avx512(
    const int8_t* w, int64_t in, int64_t o0, int64_t o1, const uint8_t* xu, int64_t ld_x,
    int32_t* P, int64_t ld_p) {
  const __m512i one8 = _mm512_set1_epi8(1);
  const int64_t nblk = (in + 63) / 64;
  for (int64_t o = o0; o < o1; ++o) {
    const int8_t* row = w + o * in;
    __m512i acc[TB];
    __m512i rs = _mm512_setzero_si512();
    for (int t = 0; t < TB; ++t) acc[t] = _mm512_setzero_si512();
    for (int64_t blk = 0; blk < nblk; ++blk) {
      const int64_t rem = in - blk * 64;
      const __mmask64 lm = rem >= 64 ? ~__mmask64(0) : ((__mmask64(1) << rem) - 1);
      const __m512i wv = _mm512_maskz_loadu_epi8(lm, row + blk * 64);
      rs = _mm512_dpbusd_epi32(rs, one8, wv);
#pragma GCC unroll 8
      for (int t = 0; t < TB; ++t) {
        const __m512i xv = _mm512_loadu_si512(xu + t * ld_x + blk * 64);
        acc[t] = _mm512_dpbusd_epi32(acc[t], xv, wv);
      }
    }
    const int32_t r = _mm512_reduce_add_epi32(rs);
    for (int t = 0; t < TB; ++t) P[t * ld_p + (o - o0)] = _mm512_reduce_add_epi32(acc[t]) - 128 * r;
  }
}

// ---------------------------------------------------------------------------------------
// fp32 side terms: FBI shift dot, the correction's t = v @ x and y += u @ t. Small next to
// the sign product, but scalar code (no reassociation without -ffast-math) would still
// double the GEMV time, hence AVX2/FMA versions.

float dot_f32_portable(const float* a, const float* b, int64_t n) {
  float s = 0.f;
  for (int64_t i = 0; i < n; ++i) s += a[i] * b[i];
  return s;
}

float dot_i8f32_portable(const int8_t* a, const float* b, int64_t n) {
  float s = 0.f;
  for (int64_t i = 0; i < n; ++i) s += float(a[i]) * b[i];
  return s;
}

__attribute__((target("avx2,fma"))) inline float hsum_ps_avx2(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

__attribute__((target("avx2,fma"))) float dot_f32_avx2(const float* a, const float* b, int64_t n) {
  __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc0);
    acc1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 8), _mm256_loadu_ps(b + i + 8), acc1);
  }
  float s = hsum_ps_avx2(_mm256_add_ps(acc0, acc1));
  for (; i < n; ++i) s += a[i] * b[i];
  return s;
}

__attribute__((target("avx2,fma"))) inline __m256 load8_i8_as_ps(const int8_t* p) {
  return _mm256_cvtepi32_ps(
      _mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
}

__attribute__((target("avx2,fma"))) float dot_i8f32_avx2(const int8_t* a, const float* b,
                                                         int64_t n) {
  __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    acc0 = _mm256_fmadd_ps(load8_i8_as_ps(a + i), _mm256_loadu_ps(b + i), acc0);
    acc1 = _mm256_fmadd_ps(load8_i8_as_ps(a + i + 8), _mm256_loadu_ps(b + i + 8), acc1);
  }
  float s = hsum_ps_avx2(_mm256_add_ps(acc0, acc1));
  for (; i < n; ++i) s += float(a[i]) * b[i];
  return s;
}

// C[t][o - o0] = u[o, :] . tv[t, :] for rows [o0, o1) and tb tokens (ld_c = kRowTile).
void lowrank_rows_portable(const int8_t* u, int64_t r, int64_t o0, int64_t o1, const float* tv,
                           int tb, float* C, int64_t ld_c) {
  for (int64_t o = o0; o < o1; ++o)
    for (int t = 0; t < tb; ++t) C[t * ld_c + (o - o0)] = dot_i8f32_portable(u + o * r, tv + t * r, r);
}

// Eight rows at a time: their int8 rows become floats once (shared by the token tile), each
// token's eight dot products are summed across lanes together by a hadd tree.
__attribute__((target("avx2,fma"))) void lowrank_rows_avx2(const int8_t* u, int64_t r,
                                                           int64_t o0, int64_t o1,
                                                           const float* tv, int tb, float* C,
                                                           int64_t ld_c) {
  if (r % 8 != 0) {
    for (int64_t o = o0; o < o1; ++o)
      for (int t = 0; t < tb; ++t) C[t * ld_c + (o - o0)] = dot_i8f32_avx2(u + o * r, tv + t * r, r);
    return;
  }
  std::vector<float> uf(static_cast<size_t>(8 * r));
  int64_t o = o0;
  for (; o + 8 <= o1; o += 8) {
    for (int64_t k = 0; k < 8 * r; k += 8) _mm256_storeu_ps(uf.data() + k, load8_i8_as_ps(u + o * r + k));
    for (int t = 0; t < tb; ++t) {
      const float* tt = tv + t * r;
      __m256 s[8];
      for (int k = 0; k < 8; ++k) s[k] = _mm256_setzero_ps();
      for (int64_t j = 0; j < r; j += 8) {
        const __m256 tj = _mm256_loadu_ps(tt + j);
#pragma GCC unroll 8
        for (int k = 0; k < 8; ++k) s[k] = _mm256_fmadd_ps(_mm256_loadu_ps(uf.data() + k * r + j), tj, s[k]);
      }
      const __m256 a = _mm256_hadd_ps(_mm256_hadd_ps(s[0], s[1]), _mm256_hadd_ps(s[2], s[3]));
      const __m256 b = _mm256_hadd_ps(_mm256_hadd_ps(s[4], s[5]), _mm256_hadd_ps(s[6], s[7]));
      const __m256 sum = _mm256_add_ps(_mm256_permute2f128_ps(a, b, 0x20),
                                       _mm256_permute2f128_ps(a, b, 0x31));
      _mm256_storeu_ps(C + t * ld_c + (o - o0), sum);
    }
  }
  for (; o < o1; ++o)
    for (int t = 0; t < tb; ++t) C[t * ld_c + (o - o0)] = dot_i8f32_avx2(u + o * r, tv + t * r, r);
}

// ---------------------------------------------------------------------------------------
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
template <int TB> struct BinAvx2 {
  static void run(const uint8_t* b, int64_t nb, int64_t o0, int64_t o1, const int8_t* x,
                  int32_t* P, int64_t ldp) {
    bin_rows_avx2<TB>(b, nb, o0, o1, x, P, ldp);
  }
};
template <int TB> struct BinAvx512 {
  static void run(const uint8_t* b, int64_t nb, int64_t o0, int64_t o1, const int8_t* x,
                  int32_t* P, int64_t ldp) {
    bin_rows_avx512<TB>(b, nb, o0, o1, x, P, ldp);
  }
};
template <int TB> struct I8Avx2 {
  static void run(const int8_t* w, int64_t in, int64_t o0, int64_t o1, const int8_t* x,
                  int64_t ldx, int32_t* P, int64_t ldp) {
    i8_rows_avx2<TB>(w, in, o0, o1, x, ldx, P, ldp);
  }
};
template <int TB> struct I8Avx512 {
  static void run(const int8_t* w, int64_t in, int64_t o0, int64_t o1, const uint8_t* x,
                  int64_t ldx, int32_t* P, int64_t ldp) {
    i8_rows_avx512<TB>(w, in, o0, o1, x, ldx, P, ldp);
  }
};

// ---------------------------------------------------------------------------------------
// Argument checks (the Python side raises friendlier errors first; these keep the C++
// entry points safe on their own).

const float* opt_f32(const c10::optional<torch::Tensor>& t, int64_t n, const char* name,
                     std::vector<torch::Tensor>& keep) {
  if (!t.has_value()) return nullptr;
  const auto& v = *t;
  TORCH_CHECK(v.device().is_cpu(), name, " must be a CPU tensor");
  TORCH_CHECK(v.is_floating_point(), name, " must be a floating-point tensor, got ", v.scalar_type());
  TORCH_CHECK(v.dim() == 1 && v.size(0) == n, name, " must have shape (", n, "), got ", v.sizes());
  keep.push_back(v.to(torch::kFloat).contiguous());
  return keep.back().data_ptr<float>();
}

// The result tensor: a fresh one, or the caller's (tests pass a poisoned one to prove that
// every element is written).
torch::Tensor output(const c10::optional<torch::Tensor>& buf, int64_t T, int64_t out) {
  if (!buf.has_value()) return torch::empty({T, out}, torch::dtype(torch::kFloat));
  const auto& y = *buf;
  TORCH_CHECK(y.device().is_cpu() && y.scalar_type() == torch::kFloat && y.dim() == 2 &&
                  y.size(0) == T && y.size(1) == out && y.is_contiguous(),
              "out must be a contiguous float32 CPU tensor of shape (", T, ", ", out, ")");
  return y;
}

void check_x(const torch::Tensor& x, int64_t in) {
  TORCH_CHECK(x.device().is_cpu(), "x must be a CPU tensor");
  TORCH_CHECK(x.scalar_type() == torch::kFloat, "x must be float32, got ", x.scalar_type());
  TORCH_CHECK(x.dim() == 2 && x.size(1) == in, "x must have shape (tokens, ", in, "), got ", x.sizes());
  TORCH_CHECK(x.is_contiguous(), "x must be contiguous");
}

}  // namespace

// ---------------------------------------------------------------------------------------

torch::Tensor binary_linear(const torch::Tensor& x, const torch::Tensor& bits,
                            const c10::optional<torch::Tensor>& row_scale,
                            const c10::optional<torch::Tensor>& col_scale,
                            const c10::optional<torch::Tensor>& col_shift,
                            const c10::optional<torch::Tensor>& u,
                            const c10::optional<torch::Tensor>& u_scale,
                            const c10::optional<torch::Tensor>& v,
                            const c10::optional<torch::Tensor>& v_scale,
                            const c10::optional<torch::Tensor>& bias, int64_t in_features,
                            int64_t isa_req, const c10::optional<torch::Tensor>& out_buf) {
  const int64_t isa = resolve_isa(isa_req);
  check_x(x, in_features);
  TORCH_CHECK(bits.device().is_cpu() && bits.scalar_type() == torch::kUInt8 && bits.dim() == 2,
              "bits must be a 2-D uint8 CPU tensor");
  TORCH_CHECK(bits.is_contiguous(), "bits must be contiguous");
  const int64_t out = bits.size(0), nb = bits.size(1), T = x.size(0);
  TORCH_CHECK(nb == (in_features + 7) / 8, "bits has ", nb, " bytes per row, expected ",
              (in_features + 7) / 8, " for in_features=", in_features);
  TORCH_CHECK(col_scale.has_value() == col_shift.has_value(), "col_scale and col_shift go together");
  std::vector<torch::Tensor> keep;
  const float* rs = opt_f32(row_scale, out, "row_scale", keep);
  const float* cs = opt_f32(col_scale, in_features, "col_scale", keep);
  const float* csh = opt_f32(col_shift, in_features, "col_shift", keep);
  const float* bs = opt_f32(bias, out, "bias", keep);
  const bool corr = u.has_value();
  TORCH_CHECK(corr == v.has_value() && corr == u_scale.has_value() && corr == v_scale.has_value(),
              "u, u_scale, v, v_scale go together");
  int64_t r = 0;
  const int8_t* up = nullptr;
  const int8_t* vp = nullptr;
  const float *usp = nullptr, *vsp = nullptr;
  if (corr) {
    TORCH_CHECK(u->scalar_type() == torch::kInt8 && u->dim() == 2 && u->size(0) == out &&
                    u->is_contiguous() && u->device().is_cpu(),
                "u must be a contiguous int8 CPU tensor of shape (", out, ", r)");
    r = u->size(1);
    TORCH_CHECK(v->scalar_type() == torch::kInt8 && v->dim() == 2 && v->size(0) == r &&
                    v->size(1) == in_features && v->is_contiguous() && v->device().is_cpu(),
                "v must be a contiguous int8 CPU tensor of shape (", r, ", ", in_features, ")");
    up = u->data_ptr<int8_t>();
    vp = v->data_ptr<int8_t>();
    usp = opt_f32(u_scale, out, "u_scale", keep);
    vsp = opt_f32(v_scale, r, "v_scale", keep);
  }

  auto y = output(out_buf, T, out);
  if (T == 0 || out == 0) return y;
  const float* xp = x.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  const uint8_t* bp = bits.data_ptr<uint8_t>();

  // Per-token activation prep: quantized x in the layout the chosen path reads,
  // the FBI shift dot and the correction's v @ x (fp32).
  const ActLayout lay(isa, nb);
  std::vector<int8_t> xq(static_cast<size_t>(T * lay.row_bytes() + 64), 0);
  std::vector<TokenQuant> tq(T);
  std::vector<float> shift(csh ? T : 0), tv(static_cast<size_t>(T * r));
  at::parallel_for(0, T, 4, [&](int64_t t0, int64_t t1) {
    std::vector<int8_t> nat(static_cast<size_t>(in_features));
    for (int64_t t = t0; t < t1; ++t) {
      const float* xt = xp + t * in_features;
      tq[t] = quantize_token(isa, xt, cs, in_features, nat.data());
      lay.scatter(nat.data(), in_features, t, T, xq.data());
      if (csh)
        shift[t] = isa >= kAvx2 ? dot_f32_avx2(csh, xt, in_features)
                                : dot_f32_portable(csh, xt, in_features);
      for (int64_t j = 0; j < r; ++j) {
        const int8_t* vj = vp + j * in_features;
        tv[t * r + j] = vsp[j] * (isa >= kAvx2 ? dot_i8f32_avx2(vj, xt, in_features)
                                               : dot_i8f32_portable(vj, xt, in_features));
      }
    }
  });

  at::parallel_for(0, out, kRowTile, [&](int64_t r0, int64_t r1) {
    int32_t P[kTokTile * kRowTile];
    float C[kTokTile * kRowTile];
    for (int64_t o0 = r0; o0 < r1; o0 += kRowTile) {
      const int64_t o1 = std::min(r1, o0 + kRowTile);
      for (int64_t t0 = 0; t0 < T; t0 += kTokTile) {
        const int tb = static_cast<int>(std::min<int64_t>(kTokTile, T - t0));
        const int8_t* xt = xq.data() + t0 * lay.row_bytes();
        if (isa == kAvx2)
          with_tb<BinAvx2>(tb, bp, nb, o0, o1, xt, P, kRowTile);
        else if (isa == kAvx512)
          with_tb<BinAvx512>(tb, bp, nb, o0, o1, xt, P, kRowTile);
        else
          bin_rows_portable(bp, nb, o0, o1, tb, xt, P, kRowTile);
        if (corr) {
          const float* tvt = tv.data() + t0 * r;
          if (isa >= kAvx2)
            lowrank_rows_avx2(up, r, o0, o1, tvt, tb, C, kRowTile);
          else
            lowrank_rows_portable(up, r, o0, o1, tvt, tb, C, kRowTile);
        }
        for (int t = 0; t < tb; ++t) {
          const TokenQuant q = tq[t0 + t];
          float* yt = yp + (t0 + t) * out;
          for (int64_t o = o0; o < o1; ++o) {
            const int32_t acc = 2 * P[t * kRowTile + (o - o0)] - q.qsum;
            float val = float(acc) * (rs ? q.scale * rs[o] : q.scale);
            if (csh) val += shift[t0 + t];
            if (corr) val += usp[o] * C[t * kRowTile + (o - o0)];
            if (bs) val += bs[o];
            yt[o] = val;
          }
        }
      }
    }
  });
  return y;
}

torch::Tensor int8_linear(const torch::Tensor& x, const torch::Tensor& qweight,
                          const torch::Tensor& scale, const c10::optional<torch::Tensor>& bias,
                          int64_t isa_req, const c10::optional<torch::Tensor>& out_buf) {
  const int64_t isa = resolve_isa(isa_req);
  TORCH_CHECK(qweight.device().is_cpu() && qweight.scalar_type() == torch::kInt8 &&
                  qweight.dim() == 2 && qweight.is_contiguous(),
              "qweight must be a contiguous 2-D int8 CPU tensor");
  const int64_t out = qweight.size(0), in = qweight.size(1), T = x.size(0);
  check_x(x, in);
  std::vector<torch::Tensor> keep;
  const float* sc = opt_f32(scale, out, "scale", keep);
  const float* bs = opt_f32(bias, out, "bias", keep);
  auto y = output(out_buf, T, out);
  if (T == 0 || out == 0) return y;
  const float* xp = x.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  const int8_t* wp = qweight.data_ptr<int8_t>();

  const int64_t ld_x = round_up(std::max<int64_t>(in, 1), 64);
  std::vector<int8_t> xq(static_cast<size_t>(T * ld_x), 0);
  std::vector<TokenQuant> tq(T);
  at::parallel_for(0, T, 4, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      int8_t* dst = xq.data() + t * ld_x;
      tq[t] = quantize_token(isa, xp + t * in, nullptr, in, dst);
      if (isa == kAvx512)  // offset to unsigned for dpbusd; 0x80 ^ q == q + 128 as a byte
        for (int64_t i = 0; i < ld_x; ++i) dst[i] = static_cast<int8_t>(uint8_t(dst[i]) ^ 0x80u);
    }
  });

  at::parallel_for(0, out, kRowTile, [&](int64_t r0, int64_t r1) {
    int32_t P[kTokTile * kRowTile];
    for (int64_t o0 = r0; o0 < r1; o0 += kRowTile) {
      const int64_t o1 = std::min(r1, o0 + kRowTile);
      for (int64_t t0 = 0; t0 < T; t0 += kTokTile) {
        const int tb = static_cast<int>(std::min<int64_t>(kTokTile, T - t0));
        const int8_t* xt = xq.data() + t0 * ld_x;
        if (isa == kAvx2)
          with_tb<I8Avx2>(tb, wp, in, o0, o1, xt, ld_x, P, kRowTile);
        else if (isa == kAvx512)
          with_tb<I8Avx512>(tb, wp, in, o0, o1, reinterpret_cast<const uint8_t*>(xt), ld_x, P,
                            kRowTile);
        else
          i8_rows_portable(wp, in, o0, o1, tb, xt, ld_x, P, kRowTile);
        for (int t = 0; t < tb; ++t) {
          const float s = tq[t0 + t].scale;
          float* yt = yp + (t0 + t) * out;
          for (int64_t o = o0; o < o1; ++o) {
            float val = float(P[t * kRowTile + (o - o0)]) * (s * sc[o]);
            if (bs) val += bs[o];
            yt[o] = val;
          }
        }
      }
    }
  });
  return y;
}

// step_cpu.cpp
torch::Tensor mamba2_step(const torch::Tensor& zxbcdt, torch::Tensor conv_state,
                          torch::Tensor ssm_state, const torch::Tensor& conv_weight,
                          const c10::optional<torch::Tensor>& conv_bias,
                          const torch::Tensor& dt_bias, const torch::Tensor& A_log,
                          const torch::Tensor& D, const torch::Tensor& norm_weight, double eps,
                          int64_t ngroups, int64_t headdim, int64_t d_state,
                          bool norm_before_gate, bool use_avx2);
bool step_has_avx2();

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("best_isa", &best_isa, "best instruction-set level: 0 portable, 1 AVX2, 2 AVX-512 VNNI");
  m.def("binary_linear", &binary_linear, "packed 1-bit linear (+ FBI, int8 low-rank, bias)",
        py::arg("x"), py::arg("bits"), py::arg("row_scale"), py::arg("col_scale"),
        py::arg("col_shift"), py::arg("u"), py::arg("u_scale"), py::arg("v"), py::arg("v_scale"),
        py::arg("bias"), py::arg("in_features"), py::arg("isa"), py::arg("out") = py::none());
  m.def("int8_linear", &int8_linear, "int8 weight linear with per-token int8 activations",
        py::arg("x"), py::arg("qweight"), py::arg("scale"), py::arg("bias"), py::arg("isa"),
        py::arg("out") = py::none());
  m.def("mamba2_step", &mamba2_step, "fused Mamba-2 decode step (fp32 states, updated in place)");
  m.def("step_has_avx2", &step_has_avx2);
}
