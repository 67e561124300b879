// int8-weight linear on CPU: y[t, o] = scale[o] * (w[o, :] . x[t, :]) + bias[o], with x
// quantized per token to int8 like the 1-bit kernels (see linear_cpu.cpp). AVX-512 VNNI,
// AVX2 and portable paths, chosen at runtime; rows split over torch's OpenMP threads.
#include "cpu_common.h"

namespace dfplan_cpu {
namespace {

// ---------------------------------------------------------------------------------------
// int8 kernels: P[t][o - o0] = w[o, :] . xq[t, :] (int32), xq zero-padded to ld_x >= in.

void i8_rows_portable(const int8_t* w, int64_t in, int64_t o0, int64_t o1, int tb,
                      const int8_t* xq, int64_t ld_x, int32_t* P, int64_t ld_p) {
  for (int64_t o = o0; o < o1; ++o) {
    const int8_t* row = w + o * in;
    prefetch_ahead(row, in);
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
    if (TB > 1) prefetch_ahead(row, in);
    __m256i acc[TB];
    for (int t = 0; t < TB; ++t) acc[t] = _mm256_setzero_si256();
    for (int64_t blk = 0; blk < nblk; ++blk) {
      // one token: the prefetches spread over the row (one per 64 bytes, 2 KiB ahead) keep
      // a steady number of lines in flight; a burst at the row's start stalled on them
      if (TB == 1 && blk % 2 == 0) _mm_prefetch(reinterpret_cast<const char*>(row + blk * 32) + 2048, _MM_HINT_T0);
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
// the padded weights are zero. At small batch NA accumulators per token (NA * TB >= 8)
// keep enough dpbusd chains in flight to hide its latency (see the 1-bit path).
template <int TB>
__attribute__((target("avx512f,avx512bw,avx512vnni"))) void i8_rows_avx512(
    const int8_t* w, int64_t in, int64_t o0, int64_t o1, const uint8_t* xu, int64_t ld_x,
    int32_t* P, int64_t ld_p) {
  constexpr int NA = (8 + TB - 1) / TB;
  const __m512i one8 = _mm512_set1_epi8(1);
  const int64_t nfull = in / 64;
  const int64_t nblk = (in + 63) / 64;
  for (int64_t o = o0; o < o1; ++o) {
    const int8_t* row = w + o * in;
    prefetch_ahead(row, in);
    __m512i acc[TB][NA];
    __m512i rs[NA];
    for (int a = 0; a < NA; ++a) {
      rs[a] = _mm512_setzero_si512();
      for (int t = 0; t < TB; ++t) acc[t][a] = _mm512_setzero_si512();
    }
    int64_t blk = 0;
    for (; blk + NA <= nfull; blk += NA) {
#pragma GCC unroll 8
      for (int a = 0; a < NA; ++a) {
        const __m512i wv = _mm512_loadu_si512(row + (blk + a) * 64);
        rs[a] = _mm512_dpbusd_epi32(rs[a], one8, wv);
#pragma GCC unroll 8
        for (int t = 0; t < TB; ++t)
          acc[t][a] = _mm512_dpbusd_epi32(
              acc[t][a], _mm512_loadu_si512(xu + t * ld_x + (blk + a) * 64), wv);
      }
    }
    for (; blk < nblk; ++blk) {
      const int64_t rem = in - blk * 64;
      const __mmask64 lm = rem >= 64 ? ~__mmask64(0) : ((__mmask64(1) << rem) - 1);
      const __m512i wv = _mm512_maskz_loadu_epi8(lm, row + blk * 64);
      rs[0] = _mm512_dpbusd_epi32(rs[0], one8, wv);
      for (int t = 0; t < TB; ++t)
        acc[t][0] = _mm512_dpbusd_epi32(acc[t][0], _mm512_loadu_si512(xu + t * ld_x + blk * 64), wv);
    }
    for (int a = 1; a < NA; ++a) rs[0] = _mm512_add_epi32(rs[0], rs[a]);
    const int32_t r = _mm512_reduce_add_epi32(rs[0]);
    for (int t = 0; t < TB; ++t) {
      __m512i s = acc[t][0];
      for (int a = 1; a < NA; ++a) s = _mm512_add_epi32(s, acc[t][a]);
      P[t * ld_p + (o - o0)] = _mm512_reduce_add_epi32(s) - 128 * r;
    }
  }
}

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

}  // namespace
}  // namespace dfplan_cpu

namespace dfplan_cpu {

void int8_linear_raw(const int8_t* wp, int64_t out, int64_t in, const float* sc, const float* bs,
                     int64_t isa, const float* xp, int64_t T, float* yp) {
  if (T == 0 || out == 0) return;
  const int64_t ld_x = round_up(std::max<int64_t>(in, 1), 64);
  std::vector<int8_t> xq(static_cast<size_t>(T * ld_x), 0);
  std::vector<TokenQuant> tq(T);
  parallel_for(0, T, 4, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      int8_t* dst = xq.data() + t * ld_x;
      tq[t] = quantize_token(isa, xp + t * in, nullptr, in, dst);
      if (isa == kAvx512)  // offset to unsigned for dpbusd; 0x80 ^ q == q + 128 as a byte
        for (int64_t i = 0; i < ld_x; ++i) dst[i] = static_cast<int8_t>(uint8_t(dst[i]) ^ 0x80u);
    }
  });

  parallel_for(0, out, kRowTile, [&](int64_t r0, int64_t r1) {
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
}

}  // namespace dfplan_cpu

#ifndef DFPLAN_LITE
using namespace dfplan_cpu;

at::Tensor int8_linear(const at::Tensor& x, const at::Tensor& qweight,
                          const at::Tensor& scale, const c10::optional<at::Tensor>& bias,
                          int64_t isa_req, const c10::optional<at::Tensor>& out_buf) {
  const int64_t isa = resolve_isa(isa_req);
  TORCH_CHECK(qweight.device().is_cpu() && qweight.scalar_type() == at::kChar &&
                  qweight.dim() == 2 && qweight.is_contiguous(),
              "qweight must be a contiguous 2-D int8 CPU tensor");
  const int64_t out = qweight.size(0), in = qweight.size(1), T = x.size(0);
  check_x(x, in);
  std::vector<at::Tensor> keep;
  const float* sc = opt_f32(scale, out, "scale", keep);
  const float* bs = opt_f32(bias, out, "bias", keep);
  auto y = output(out_buf, T, out);
  int8_linear_raw(qweight.data_ptr<int8_t>(), out, in, sc, bs, isa, x.data_ptr<float>(), T,
                  y.data_ptr<float>());
  return y;
}
#endif  // DFPLAN_LITE

