// Packed 1-bit linear layer on CPU (the int8 linear lives in int8_cpu.cpp, shared helpers
// in cpu_common.h; this file also holds the Python bindings).
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
#ifndef DFPLAN_LITE
#include <torch/extension.h>
#endif

#include "cpu_common.h"

#include <atomic>

namespace dfplan_cpu {
namespace {

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
    prefetch_ahead(row, nb);
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
    prefetch_ahead(row, nb);
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
// One dpbusd per token and 8 bytes would leave a single accumulator chain per token, and
// dpbusd's latency (4-5 cycles) would bound decode (TB = 1) at ~8 bytes per 5 cycles, a
// fraction of memory bandwidth: NA independent accumulators per token keep ~8 chains in
// flight whatever the token tile (NA * TB >= 8).
template <int TB>
__attribute__((target("avx512f,avx512bw,avx512vnni"))) void bin_rows_avx512(
    const uint8_t* bits, int64_t nb, int64_t o0, int64_t o1, const int8_t* xq, int32_t* P,
    int64_t ld_p) {
  constexpr int NA = (8 + TB - 1) / TB;
  const __m512i one8 = _mm512_set1_epi8(1);
  const int64_t nfull = nb / 8;
  const int64_t nq = (nb + 7) / 8;
  for (int64_t o = o0; o < o1; ++o) {
    const uint8_t* row = bits + o * nb;
    prefetch_ahead(row, nb);
    __m512i acc[TB][NA];
    for (int t = 0; t < TB; ++t)
      for (int a = 0; a < NA; ++a) acc[t][a] = _mm512_setzero_si512();
    int64_t q = 0;
    for (; q + NA <= nfull; q += NA) {
#pragma GCC unroll 8
      for (int a = 0; a < NA; ++a) {
        uint64_t w;
        std::memcpy(&w, row + (q + a) * 8, 8);
        const __m512i m = _mm512_maskz_mov_epi8(_cvtu64_mask64(w), one8);
        const int8_t* xb = xq + (q + a) * (TB * 64);
#pragma GCC unroll 8
        for (int t = 0; t < TB; ++t)
          acc[t][a] = _mm512_dpbusd_epi32(acc[t][a], m, _mm512_loadu_si512(xb + t * 64));
      }
    }
    for (; q < nq; ++q) {
      uint64_t w = 0;
      std::memcpy(&w, row + q * 8, q < nfull ? 8 : nb - q * 8);
      const __m512i m = _mm512_maskz_mov_epi8(_cvtu64_mask64(w), one8);
      const int8_t* xb = xq + q * (TB * 64);
      for (int t = 0; t < TB; ++t)
        acc[t][0] = _mm512_dpbusd_epi32(acc[t][0], m, _mm512_loadu_si512(xb + t * 64));
    }
    for (int t = 0; t < TB; ++t) {
      __m512i s = acc[t][0];
      for (int a = 1; a < NA; ++a) s = _mm512_add_epi32(s, acc[t][a]);
      P[t * ld_p + (o - o0)] = _mm512_reduce_add_epi32(s);
    }
  }
}

// ---------------------------------------------------------------------------------------
// Decode (one token) on the row-block layout: a lookup table instead of a bit expansion.
//
// Layout kRowBlocks (kernels/packing.py to_row_blocks): rows come in blocks of 64, and
// inside a block byte j of all its rows is contiguous: byte j of row o0 + r sits at
// o0 * nb + j * h + r (h = rows in the block, 64 except the last). One 32-byte load is then
// column byte j of 32 rows, and each half-byte of it selects 4 columns.
//
// For each group g of 4 columns, the 16 possible partial sums
//   tab[g][m] = sum over k < 4 with bit k of m set of xq[4 g + k]     (|tab| <= 508: int16)
// are computed once per call; pshufb then looks up 32 rows' sums per instruction. pshufb
// works on bytes, so each table is stored as its low bytes then its high bytes (16 + 16),
// and unpacking the two lookups interleaves them back into int16. Per 32 rows x 8 columns
// (256 weights) that is 4 lookups, 4 unpacks, 4 adds and 3 ops for the nibbles; the AVX2
// bit expansion above spends ~32 vector ops on 256 weights of one row, and the batch-1 GEMV
// was bound by vector ops, not by memory.

// tab (nb * 64 bytes): for column byte j, [lo(2j) | hi(2j) | lo(2j+1) | hi(2j+1)], 16 each.
__attribute__((target("avx2"))) void lut_tables_avx2(const int8_t* xq, int64_t nb, uint8_t* tab) {
  // lane m of bitk has all bits set when bit k of m is set
  const __m256i idx = _mm256_setr_epi16(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  __m256i bitk[4];
  for (int k = 0; k < 4; ++k) {
    const __m256i b = _mm256_set1_epi16(int16_t(1 << k));
    bitk[k] = _mm256_cmpeq_epi16(_mm256_and_si256(idx, b), b);
  }
  // per 128-bit lane: even bytes (low halves) first, then odd bytes (high halves)
  const __m256i split = _mm256_setr_epi8(0, 2, 4, 6, 8, 10, 12, 14, 1, 3, 5, 7, 9, 11, 13, 15,
                                         0, 2, 4, 6, 8, 10, 12, 14, 1, 3, 5, 7, 9, 11, 13, 15);
  for (int64_t g = 0; g < 2 * nb; ++g) {
    const int8_t* x = xq + 4 * g;
    __m256i e = _mm256_and_si256(_mm256_set1_epi16(x[0]), bitk[0]);
    for (int k = 1; k < 4; ++k)
      e = _mm256_add_epi16(e, _mm256_and_si256(_mm256_set1_epi16(x[k]), bitk[k]));
    // [lo 0-7 | hi 0-7 | lo 8-15 | hi 8-15] -> [lo 0-15 | hi 0-15]
    e = _mm256_permute4x64_epi64(_mm256_shuffle_epi8(e, split), 0xD8);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(tab + 32 * g), e);
  }
}

// P[r] = sum of xq over the set bits of row r of the full block at w. Each 64-byte column
// slice is two 32-row halves; int16 lanes gain at most 2 * 508 per column byte, so they are
// widened to int32 every 32 bytes. lut_block_avx512 below is the same in 512-bit registers.
constexpr int64_t kLutPrefetch2 = 16384;
__attribute__((target("avx2"))) void lut_block_avx2(const uint8_t* w, int64_t nb, const uint8_t* tab,
                                                    int32_t* P) {
  const __m256i low4 = _mm256_set1_epi8(0x0F);
  alignas(32) int32_t tot[2][4][8] = {};  // half, [accL lo, accL hi, accH lo, accH hi], lane
  for (int64_t j0 = 0; j0 < nb; j0 += 32) {
    const int64_t j1 = std::min(nb, j0 + 32);
    __m256i accL[2], accH[2];  // per half h: accL lane 8L + k = row 32h + 16L + k, accH + 8
    for (int h = 0; h < 2; ++h) accL[h] = accH[h] = _mm256_setzero_si256();
    for (int64_t j = j0; j < j1; ++j) {
      const uint8_t* t = tab + 64 * j;
      const __m256i tla = _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(t)));
      const __m256i tha = _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(t + 16)));
      const __m256i tlb = _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(t + 32)));
      const __m256i thb = _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(t + 48)));
      _mm_prefetch(reinterpret_cast<const char*>(w + j * 64) + kLutPrefetch2, _MM_HINT_T0);
#pragma GCC unroll 2
      for (int h = 0; h < 2; ++h) {
        const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + j * 64 + 32 * h));
        const __m256i lo = _mm256_and_si256(v, low4);
        const __m256i hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), low4);
        const __m256i al = _mm256_shuffle_epi8(tla, lo), ah = _mm256_shuffle_epi8(tha, lo);
        const __m256i bl = _mm256_shuffle_epi8(tlb, hi), bh = _mm256_shuffle_epi8(thb, hi);
        accL[h] = _mm256_add_epi16(accL[h], _mm256_add_epi16(_mm256_unpacklo_epi8(al, ah),
                                                             _mm256_unpacklo_epi8(bl, bh)));
        accH[h] = _mm256_add_epi16(accH[h], _mm256_add_epi16(_mm256_unpackhi_epi8(al, ah),
                                                             _mm256_unpackhi_epi8(bl, bh)));
      }
    }
    for (int h = 0; h < 2; ++h) {
      const __m256i parts[4] = {
          _mm256_cvtepi16_epi32(_mm256_castsi256_si128(accL[h])),
          _mm256_cvtepi16_epi32(_mm256_extracti128_si256(accL[h], 1)),
          _mm256_cvtepi16_epi32(_mm256_castsi256_si128(accH[h])),
          _mm256_cvtepi16_epi32(_mm256_extracti128_si256(accH[h], 1))};
      for (int k = 0; k < 4; ++k) {
        __m256i* a = reinterpret_cast<__m256i*>(tot[h][k]);
        _mm256_store_si256(a, _mm256_add_epi32(_mm256_load_si256(a), parts[k]));
      }
    }
  }
  for (int h = 0; h < 2; ++h)
    for (int i = 0; i < 16; ++i) {  // int16 lane i of accL / accH: lane i / 8 of the half
      const int row = 32 * h + 16 * (i / 8) + i % 8;
      P[row] = tot[h][i / 8][i % 8];
      P[row + 8] = tot[h][2 + i / 8][i % 8];
    }
}

// lut_block_avx2 in 512-bit registers: one load is the whole 64-row column slice, so a
// column byte costs half the instructions (4 lookups, 4 unpacks, 4 adds for 64 rows). In
// 128-bit lane L the unpacks give int16 lane 8L + k = row 16L + k (accL) and 16L + 8 + k
// (accH). 1.3B in_proj shape streamed, 1 thread, Zen 4: 0.062-0.066 ms against the AVX2
// kernel's 0.085-0.089 (both with the 16 KiB prefetch; README, CPU kernels).
constexpr int64_t kLutPrefetch512 = 16384;
__attribute__((target("avx512f,avx512bw"))) void lut_block_avx512(const uint8_t* w, int64_t nb,
                                                                   const uint8_t* tab, int32_t* P) {
  const __m512i low4 = _mm512_set1_epi8(0x0F);
  __m512i tot[4];  // [accL lanes 0-15, accL 16-31, accH 0-15, accH 16-31] as int32
  for (auto& t : tot) t = _mm512_setzero_si512();
  for (int64_t j0 = 0; j0 < nb; j0 += 32) {
    const int64_t j1 = std::min(nb, j0 + 32);
    __m512i accL = _mm512_setzero_si512(), accH = _mm512_setzero_si512();
    for (int64_t j = j0; j < j1; ++j) {
      const uint8_t* t = tab + 64 * j;
      const __m512i tla = _mm512_broadcast_i32x4(_mm_loadu_si128(reinterpret_cast<const __m128i*>(t)));
      const __m512i tha = _mm512_broadcast_i32x4(_mm_loadu_si128(reinterpret_cast<const __m128i*>(t + 16)));
      const __m512i tlb = _mm512_broadcast_i32x4(_mm_loadu_si128(reinterpret_cast<const __m128i*>(t + 32)));
      const __m512i thb = _mm512_broadcast_i32x4(_mm_loadu_si128(reinterpret_cast<const __m128i*>(t + 48)));
      _mm_prefetch(reinterpret_cast<const char*>(w + j * 64) + kLutPrefetch512, _MM_HINT_T0);
      const __m512i v = _mm512_loadu_si512(w + j * 64);
      const __m512i lo = _mm512_and_si512(v, low4);
      const __m512i hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), low4);
      const __m512i al = _mm512_shuffle_epi8(tla, lo), ah = _mm512_shuffle_epi8(tha, lo);
      const __m512i bl = _mm512_shuffle_epi8(tlb, hi), bh = _mm512_shuffle_epi8(thb, hi);
      accL = _mm512_add_epi16(accL, _mm512_add_epi16(_mm512_unpacklo_epi8(al, ah), _mm512_unpacklo_epi8(bl, bh)));
      accH = _mm512_add_epi16(accH, _mm512_add_epi16(_mm512_unpackhi_epi8(al, ah), _mm512_unpackhi_epi8(bl, bh)));
    }
    tot[0] = _mm512_add_epi32(tot[0], _mm512_cvtepi16_epi32(_mm512_castsi512_si256(accL)));
    tot[1] = _mm512_add_epi32(tot[1], _mm512_cvtepi16_epi32(_mm512_extracti64x4_epi64(accL, 1)));
    tot[2] = _mm512_add_epi32(tot[2], _mm512_cvtepi16_epi32(_mm512_castsi512_si256(accH)));
    tot[3] = _mm512_add_epi32(tot[3], _mm512_cvtepi16_epi32(_mm512_extracti64x4_epi64(accH, 1)));
  }
  alignas(64) int32_t lanes[4][16];
  for (int k = 0; k < 4; ++k) _mm512_store_si512(lanes[k], tot[k]);
  for (int i = 0; i < 32; ++i) {  // int16 lane i of accL / accH
    const int row = 16 * (i / 8) + i % 8;
    P[row] = lanes[i / 16][i % 16];
    P[row + 8] = lanes[2 + i / 16][i % 16];
  }
}

// Row-major copy of one interleaved block (h rows) for the kernels that read whole rows.
void deinterleave_block(const uint8_t* src, int64_t h, int64_t nb, uint8_t* dst) {
  for (int64_t j = 0; j < nb; ++j) {
    const uint8_t* s = src + j * h;
    for (int64_t r = 0; r < h; ++r) dst[r * nb + j] = s[r];
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
  if (tb == 1) {  // one token: convert in registers, nothing to share through a buffer
    int64_t o = o0;
    for (; o + 8 <= o1; o += 8) {
      __m256 s[8];
      for (int k = 0; k < 8; ++k) s[k] = _mm256_setzero_ps();
      for (int64_t j = 0; j < r; j += 8) {
        const __m256 tj = _mm256_loadu_ps(tv + j);
#pragma GCC unroll 8
        for (int k = 0; k < 8; ++k) s[k] = _mm256_fmadd_ps(load8_i8_as_ps(u + (o + k) * r + j), tj, s[k]);
      }
      const __m256 a = _mm256_hadd_ps(_mm256_hadd_ps(s[0], s[1]), _mm256_hadd_ps(s[2], s[3]));
      const __m256 b = _mm256_hadd_ps(_mm256_hadd_ps(s[4], s[5]), _mm256_hadd_ps(s[6], s[7]));
      _mm256_storeu_ps(C + (o - o0), _mm256_add_ps(_mm256_permute2f128_ps(a, b, 0x20),
                                                    _mm256_permute2f128_ps(a, b, 0x31)));
    }
    for (; o < o1; ++o) C[o - o0] = dot_i8f32_avx2(u + o * r, tv, r);
    return;
  }
  thread_local std::vector<float> uf;  // one per thread, not one allocation per row tile
  if (uf.size() < static_cast<size_t>(8 * r)) uf.resize(static_cast<size_t>(8 * r));
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

// Per-row vectors (row_scale, u_scale, bias) as stored: fp32, or fp16 read through F16C in
// the AVX2 epilogue. Converting an fp16 vector to an fp32 tensor on every call cost an
// allocation and a pass per vector (two per 1-bit linear with a correction, 96 linears a
// token on 1.3B).
__attribute__((target("avx2,f16c"))) inline __m256 load8_rowvec(const RowVec& v, int64_t o) {
  return v.f32 ? _mm256_loadu_ps(v.f32 + o)
               : _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(v.f16 + o)));
}

// One token's outputs for rows [o0, o1): y = (2 P - qsum) * scale * rs [+ shift] [+ us * C]
// [+ bias]. The same operations in the same order as the scalar epilogue, and no fma in this
// target, so the two agree bit for bit (the self-check and the tests compare paths exactly).
__attribute__((target("avx2,f16c"))) void epilogue_avx2(const int32_t* P, const float* C, int32_t qsum,
                                                        float scale, const RowVec& rs, const float* shift,
                                                        const RowVec& us, const RowVec& bs, int64_t o0,
                                                        int64_t o1, float* y) {
  const __m256i vq = _mm256_set1_epi32(qsum);
  const __m256 vs = _mm256_set1_ps(scale);
  int64_t o = o0;
  for (; o + 8 <= o1; o += 8) {
    const __m256i p = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(P + (o - o0)));
    const __m256i acc = _mm256_sub_epi32(_mm256_add_epi32(p, p), vq);
    __m256 val = _mm256_mul_ps(_mm256_cvtepi32_ps(acc), rs ? _mm256_mul_ps(vs, load8_rowvec(rs, o)) : vs);
    if (shift) val = _mm256_add_ps(val, _mm256_set1_ps(*shift));
    if (C) val = _mm256_add_ps(val, _mm256_mul_ps(load8_rowvec(us, o), _mm256_loadu_ps(C + (o - o0))));
    if (bs) val = _mm256_add_ps(val, load8_rowvec(bs, o));
    _mm256_storeu_ps(y + o, val);
  }
  for (; o < o1; ++o) {
    const int32_t acc = 2 * P[o - o0] - qsum;
    float val = float(acc) * (rs ? scale * rs.at(o) : scale);
    if (shift) val += *shift;
    if (C) val += us.at(o) * C[o - o0];
    if (bs) val += bs.at(o);
    y[o] = val;
  }
}

// Adapters for with_tb (cpu_common.h).
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

}  // namespace
}  // namespace dfplan_cpu

using namespace dfplan_cpu;

// ---------------------------------------------------------------------------------------

namespace dfplan_cpu {

float dot_f32(bool avx2, const float* a, const float* b, int64_t n) {
  return avx2 ? dot_f32_avx2(a, b, n) : dot_f32_portable(a, b, n);
}

void binary_linear_raw(const BinaryWeights& w, int64_t isa, const float* xp, int64_t T, float* yp) {
  if (T == 0 || w.out == 0) return;
  const int64_t out = w.out, nb = w.nb, in_features = w.in, r = w.r, layout = w.layout;
  const uint8_t* bp = w.bits;
  const RowVec rs = w.row_scale, bs = w.bias, usp = w.u_scale;
  const float *cs = w.col_scale, *csh = w.col_shift, *vsp = w.v_scale;
  const int8_t *up = w.u, *vp = w.v;
  const bool corr = up != nullptr;

  // Decode on the row-block layout goes through the lookup tables (AVX2 and up: the
  // AVX-512 bit expansion's batch-1 GEMV was bound by vector ops too, so it replaces it).
  const bool lut = layout == kRowBlocks && T == 1 && isa >= kAvx2;

  // Per-token activation prep: quantized x in the layout the chosen path reads,
  // the FBI shift dot and the correction's v @ x (fp32).
  const ActLayout lay(isa, nb);
  std::vector<int8_t> xq(static_cast<size_t>(T * lay.row_bytes() + 64), 0);
  std::vector<int8_t> xnat(lut ? static_cast<size_t>(nb * 8) : 0, 0);  // zero-padded
  std::vector<TokenQuant> tq(T);
  std::vector<float> shift(csh ? T : 0), tv(static_cast<size_t>(T * r));
  parallel_for(0, T, 4, [&](int64_t t0, int64_t t1) {
    std::vector<int8_t> nat(lut ? 0 : static_cast<size_t>(in_features));
    for (int64_t t = t0; t < t1; ++t) {
      const float* xt = xp + t * in_features;
      int8_t* q = lut ? xnat.data() : nat.data();
      tq[t] = quantize_token(isa, xt, cs, in_features, q);
      if (!lut) lay.scatter(q, in_features, t, T, xq.data());
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
  std::vector<uint8_t> tab(lut ? static_cast<size_t>(nb * 64) : 0);
  if (lut) lut_tables_avx2(xnat.data(), nb, tab.data());

  // Work is split over whole 64-row tiles, which are the blocks of the row-block layout.
  const int64_t ntile = (out + kRowTile - 1) / kRowTile;
  parallel_for(0, ntile, 1, [&](int64_t b0, int64_t b1) {
    int32_t P[kTokTile * kRowTile];
    float C[kTokTile * kRowTile];
    thread_local std::vector<uint8_t> rows;  // one block, row-major (row-block layout, T > 1)
    for (int64_t blk = b0; blk < b1; ++blk) {
      const int64_t o0 = blk * kRowTile;
      const int64_t o1 = std::min(out, o0 + kRowTile);
      const int64_t h = o1 - o0;
      const uint8_t* rb = bp + o0 * nb;  // rows o0..o1: row-major, or one interleaved block
      const bool lut_here = lut && h == kRowTile;
      if (layout == kRowBlocks && !lut_here) {
        if (rows.size() < static_cast<size_t>(h * nb)) rows.resize(static_cast<size_t>(h * nb));
        deinterleave_block(rb, h, nb, rows.data());
        rb = rows.data();
      }
      // The tile's correction rows (64 x r bytes) are a short stream between two long ones
      // of sign bits: the hardware prefetcher left them to miss, one DRAM latency after
      // another (in_proj+r16 at batch 1: 0.27 ms without the correction, 0.39 with it).
      // Asked for now, they arrive while the bits are summed.
      if (corr) {
        const char* ub = reinterpret_cast<const char*>(up + o0 * r);
        for (int64_t k = 0; k < h * r; k += 64) _mm_prefetch(ub + k, _MM_HINT_T0);
      }
      for (int64_t t0 = 0; t0 < T; t0 += kTokTile) {
        const int tb = static_cast<int>(std::min<int64_t>(kTokTile, T - t0));
        const int8_t* xt = xq.data() + t0 * lay.row_bytes();
        if (lut_here && isa == kAvx512) {
          lut_block_avx512(rb, nb, tab.data(), P);
        } else if (lut_here) {
          lut_block_avx2(rb, nb, tab.data(), P);
        } else if (lut) {  // the last, partial block: read the tables' source row by row
          bin_rows_portable(rb, nb, 0, h, 1, xnat.data(), P, kRowTile);
        } else if (isa == kAvx2) {
          with_tb<BinAvx2>(tb, rb, nb, 0, h, xt, P, kRowTile);
        } else if (isa == kAvx512) {
          with_tb<BinAvx512>(tb, rb, nb, 0, h, xt, P, kRowTile);
        } else {
          bin_rows_portable(rb, nb, 0, h, tb, xt, P, kRowTile);
        }
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
          const int32_t* Pt = P + t * kRowTile;
          const float* Ct = corr ? C + t * kRowTile : nullptr;
          const float* sh = csh ? &shift[t0 + t] : nullptr;
          if (isa >= kAvx2) {
            epilogue_avx2(Pt, Ct, q.qsum, q.scale, rs, sh, usp, bs, o0, o1, yt);
            continue;
          }
          for (int64_t o = o0; o < o1; ++o) {
            const int32_t acc = 2 * Pt[o - o0] - q.qsum;
            float val = float(acc) * (rs ? q.scale * rs.at(o) : q.scale);
            if (sh) val += *sh;
            if (Ct) val += usp.at(o) * Ct[o - o0];
            if (bs) val += bs.at(o);
            yt[o] = val;
          }
        }
      }
    }
  });
}

// In-place change of byte order, rows <-> row blocks (kernels/packing.py), block by block
// through a per-thread 64-row scratch: no matrix-sized temporary.
void reorder_row_blocks_raw(uint8_t* bp, int64_t out, int64_t nb, bool to_blocks) {
  parallel_for(0, (out + kRowTile - 1) / kRowTile, 1, [&](int64_t b0, int64_t b1) {
    std::vector<uint8_t> tmp(static_cast<size_t>(kRowTile * nb));
    for (int64_t blk = b0; blk < b1; ++blk) {
      const int64_t o0 = blk * kRowTile, h = std::min(kRowTile, out - o0);
      uint8_t* p = bp + o0 * nb;
      if (to_blocks) {
        std::memcpy(tmp.data(), p, static_cast<size_t>(h * nb));
        for (int64_t r = 0; r < h; ++r)
          for (int64_t j = 0; j < nb; ++j) p[j * h + r] = tmp[r * nb + j];
      } else {
        deinterleave_block(p, h, nb, tmp.data());
        std::memcpy(p, tmp.data(), static_cast<size_t>(h * nb));
      }
    }
  });
}

}  // namespace dfplan_cpu

#ifndef DFPLAN_LITE
torch::Tensor binary_linear(const torch::Tensor& x, const torch::Tensor& bits,
                            const c10::optional<torch::Tensor>& row_scale,
                            const c10::optional<torch::Tensor>& col_scale,
                            const c10::optional<torch::Tensor>& col_shift,
                            const c10::optional<torch::Tensor>& u,
                            const c10::optional<torch::Tensor>& u_scale,
                            const c10::optional<torch::Tensor>& v,
                            const c10::optional<torch::Tensor>& v_scale,
                            const c10::optional<torch::Tensor>& bias, int64_t in_features,
                            int64_t isa_req, const c10::optional<torch::Tensor>& out_buf,
                            int64_t layout) {
  const int64_t isa = resolve_isa(isa_req);
  check_x(x, in_features);
  TORCH_CHECK(layout == kRows || layout == kRowBlocks, "bits layout must be 0 (rows) or 1 (row blocks), got ", layout);
  TORCH_CHECK(bits.device().is_cpu() && bits.scalar_type() == torch::kUInt8 && bits.dim() == 2,
              "bits must be a 2-D uint8 CPU tensor");
  TORCH_CHECK(bits.is_contiguous(), "bits must be contiguous");
  const int64_t out = bits.size(0), nb = bits.size(1), T = x.size(0);
  TORCH_CHECK(nb == (in_features + 7) / 8, "bits has ", nb, " bytes per row, expected ",
              (in_features + 7) / 8, " for in_features=", in_features);
  TORCH_CHECK(col_scale.has_value() == col_shift.has_value(), "col_scale and col_shift go together");
  std::vector<torch::Tensor> keep;
  // fp16 per-row vectors stay fp16 where the AVX2 epilogue reads them (F16C)
  static const bool f16c = __builtin_cpu_supports("f16c");
  const bool f16_ok = isa >= kAvx2 && f16c;
  auto row_vec = [&](const c10::optional<torch::Tensor>& t, const char* name) {
    RowVec rv;
    if (f16_ok && t.has_value() && t->scalar_type() == torch::kHalf && t->is_contiguous()) {
      TORCH_CHECK(t->device().is_cpu(), name, " must be a CPU tensor");
      TORCH_CHECK(t->dim() == 1 && t->size(0) == out, name, " must have shape (", out, "), got ", t->sizes());
      rv.f16 = reinterpret_cast<const uint16_t*>(t->data_ptr<at::Half>());
    } else {
      rv.f32 = opt_f32(t, out, name, keep);
    }
    return rv;
  };
  const RowVec rs = row_vec(row_scale, "row_scale");
  const float* cs = opt_f32(col_scale, in_features, "col_scale", keep);
  const float* csh = opt_f32(col_shift, in_features, "col_shift", keep);
  const RowVec bs = row_vec(bias, "bias");
  const bool corr = u.has_value();
  TORCH_CHECK(corr == v.has_value() && corr == u_scale.has_value() && corr == v_scale.has_value(),
              "u, u_scale, v, v_scale go together");
  int64_t r = 0;
  const int8_t* up = nullptr;
  const int8_t* vp = nullptr;
  RowVec usp;
  const float* vsp = nullptr;
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
    usp = row_vec(u_scale, "u_scale");
    vsp = opt_f32(v_scale, r, "v_scale", keep);
  }

  auto y = output(out_buf, T, out);
  BinaryWeights w;
  w.bits = bits.data_ptr<uint8_t>();
  w.out = out;
  w.in = in_features;
  w.nb = nb;
  w.layout = layout;
  w.row_scale = rs;
  w.bias = bs;
  w.u_scale = usp;
  w.col_scale = cs;
  w.col_shift = csh;
  w.u = up;
  w.v = vp;
  w.v_scale = vsp;
  w.r = r;
  binary_linear_raw(w, isa, x.data_ptr<float>(), T, y.data_ptr<float>());
  return y;
}

void reorder_row_blocks_(torch::Tensor& bits, bool to_blocks) {
  TORCH_CHECK(bits.device().is_cpu() && bits.scalar_type() == torch::kUInt8 && bits.dim() == 2 &&
                  bits.is_contiguous(),
              "bits must be a contiguous 2-D uint8 CPU tensor");
  reorder_row_blocks_raw(bits.data_ptr<uint8_t>(), bits.size(0), bits.size(1), to_blocks);
}

// int8_cpu.cpp
torch::Tensor int8_linear(const torch::Tensor& x, const torch::Tensor& qweight,
                          const torch::Tensor& scale, const c10::optional<torch::Tensor>& bias,
                          int64_t isa_req, const c10::optional<torch::Tensor>& out_buf);

// step_cpu.cpp
torch::Tensor mamba2_step(const torch::Tensor& zxbcdt, torch::Tensor conv_state,
                          torch::Tensor ssm_state, const torch::Tensor& conv_weight,
                          const c10::optional<torch::Tensor>& conv_bias,
                          const torch::Tensor& dt_bias, const torch::Tensor& A_log,
                          const torch::Tensor& D, const torch::Tensor& norm_weight, double eps,
                          int64_t ngroups, int64_t headdim, int64_t d_state,
                          bool norm_before_gate, bool use_avx2);
bool step_has_avx2();

// stack_cpu.cpp
void bind_stack(pybind11::module& m);

// How many of torch's threads an at::parallel_for in this library really runs on. Built
// without -fopenmp, ATen's inline parallel_for drops its omp pragma and runs serially
// whatever torch.set_num_threads says (every kernel here was once single-threaded that way);
// the test suite checks this returns the thread count.
int64_t parallel_width(int64_t n) {
  std::atomic<int> widest{0};
  at::parallel_for(0, n, 1, [&](int64_t, int64_t) {
    const int t = at::get_thread_num() + 1;
    int cur = widest.load();
    while (t > cur && !widest.compare_exchange_weak(cur, t)) {
    }
  });
  return widest.load();
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("parallel_width", &parallel_width, "threads an at::parallel_for over n items runs on");
  m.def("best_isa", &best_isa, "best instruction-set level: 0 portable, 1 AVX2, 2 AVX-512 VNNI");
  m.def("binary_linear", &binary_linear, "packed 1-bit linear (+ FBI, int8 low-rank, bias)",
        py::arg("x"), py::arg("bits"), py::arg("row_scale"), py::arg("col_scale"),
        py::arg("col_shift"), py::arg("u"), py::arg("u_scale"), py::arg("v"), py::arg("v_scale"),
        py::arg("bias"), py::arg("in_features"), py::arg("isa"), py::arg("out") = py::none(),
        py::arg("layout") = 0);
  m.def("reorder_row_blocks_", &reorder_row_blocks_, "bits rows <-> row blocks, in place",
        py::arg("bits"), py::arg("to_blocks"));
  m.def("int8_linear", &int8_linear, "int8 weight linear with per-token int8 activations",
        py::arg("x"), py::arg("qweight"), py::arg("scale"), py::arg("bias"), py::arg("isa"),
        py::arg("out") = py::none());
  m.def("mamba2_step", &mamba2_step, "fused Mamba-2 decode step (fp32 states, updated in place)");
  m.def("step_has_avx2", &step_has_avx2);
  bind_stack(m);
}
#endif  // DFPLAN_LITE
