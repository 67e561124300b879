// The torch-free decode library (dfplan/lite): a C ABI over the same kernels the torch
// extension runs, built with -DDFPLAN_LITE and loaded through ctypes.
//
// Why: torch alone is ~225 MiB of a process's RSS (its C++ heap, Python modules, libraries), more
// than the 1-bit weights of Mamba-2 1.3B. A packed pure-Mamba artifact with a tied head needs
// nothing from torch to decode, whatever its projections are (1-bit, row-wise IntN as int8
// codes, or float): this file holds the layer loop (stack_cpu.cpp's, on raw pointers), the
// embedding row, the final norm, the head and the sampler. The Python side (dfplan/lite/)
// reads the safetensors file into memory it owns and hands the pointers over; nothing here
// allocates weights.
//
// Prefill runs layer by layer over up to `chunk` tokens at a time: each layer's in_proj and
// out_proj read their weights once for the whole chunk (the kernels' multi-token path), and
// the SSM recurrence steps through the chunk's tokens in order, its state (2 MB a layer on
// 1.3B) staying in cache. It is the decode step's maths, token for token, in bounded memory.
#include "cpu_common.h"

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <exception>
#include <memory>
#include <numeric>
#include <string>
#include <vector>

namespace {

using namespace dfplan_cpu;

thread_local std::string g_error;

// A projection: 1-bit, or int8 codes per row (IntN row-wise symmetric, 2/3/4-bit codes
// unpacked to int8 at load as the torch runtime does) with an fp32 scale and optional bias.
struct Int8Weights {
  const int8_t* q = nullptr;  // (out, in)
  const float* scale = nullptr;
  const float* bias = nullptr;
  int64_t out = 0, in = 0;
};

// A float weight kept as stored (a layer the plan keeps, or a float embedding): fp32, fp16
// or bf16 rows, widened one row at a time into a per-thread fp32 buffer and dotted with
// every token. Decode reads each weight byte once; no fp32 copy of the matrix is kept.
struct FloatWeights {
  const void* w = nullptr;  // (out, in)
  int64_t dtype = 0;        // 0 fp32, 1 fp16, 2 bf16
  const float* bias = nullptr;
  int64_t out = 0, in = 0;
};

void widen_row(const FloatWeights& f, int64_t o, float* dst, bool vec) {
  if (f.dtype == 0)
    std::memcpy(dst, static_cast<const float*>(f.w) + o * f.in, static_cast<size_t>(f.in) * 4);
  else
    widen16(f.dtype == 2, vec, static_cast<const uint16_t*>(f.w) + o * f.in, dst, f.in);
}

// One token against a 16-bit row, converted in registers: the decode GEMV reads each weight
// byte once, 4 KiB ahead of use (the widen-then-dot path below ran the 1.3B fp16 head at
// ~11 GB/s, its first pass over each row waiting on DRAM).
template <bool BF16>
__attribute__((target("avx2,fma,f16c"))) inline __m256 load8_16(const uint16_t* w) {
  const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(w));
  return BF16 ? _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16)) : _mm256_cvtph_ps(h);
}

template <bool BF16>
__attribute__((target("avx2,fma,f16c"))) float dot16_avx2(const uint16_t* w, const float* x, int64_t n) {
  __m256 acc[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
  int64_t i = 0;
  for (; i + 32 <= n; i += 32) {
    _mm_prefetch(reinterpret_cast<const char*>(w + i) + 4096, _MM_HINT_T0);
    for (int k = 0; k < 4; ++k)
      acc[k] = _mm256_fmadd_ps(load8_16<BF16>(w + i + 8 * k), _mm256_loadu_ps(x + i + 8 * k), acc[k]);
  }
  for (; i + 8 <= n; i += 8) acc[0] = _mm256_fmadd_ps(load8_16<BF16>(w + i), _mm256_loadu_ps(x + i), acc[0]);
  const __m256 s = _mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3]));
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes, s);
  float r = 0.f;
  for (float l : lanes) r += l;
  for (; i < n; ++i) {
    float v;
    if (BF16) {
      const uint32_t b = uint32_t(w[i]) << 16;
      std::memcpy(&v, &b, 4);
    } else {
      v = half_to_float(w[i]);
    }
    r += v * x[i];
  }
  return r;
}

// y (T, out) = x (T, in) @ w.T + bias. Rows go 8 at a time: widened once, then each token's
// x (in L1) meets all 8, so a prompt chunk's activations are read once per 8 rows, not per row.
// One token from 16-bit rows with AVX2 + F16C: dot16_avx2 instead, row by row.
void float_linear(const FloatWeights& f, bool avx2, const float* x, int64_t T, float* y) {
  static const bool f16c = __builtin_cpu_supports("f16c");
  if (T == 1 && f.dtype != 0 && avx2 && f16c) {
    const uint16_t* w = static_cast<const uint16_t*>(f.w);
    parallel_for(0, f.out, 64, [&](int64_t o0, int64_t o1) {
      for (int64_t o = o0; o < o1; ++o)
        y[o] = (f.dtype == 2 ? dot16_avx2<true>(w + o * f.in, x, f.in) : dot16_avx2<false>(w + o * f.in, x, f.in)) +
               (f.bias ? f.bias[o] : 0.f);
    });
    return;
  }
  constexpr int64_t R = 8;
  parallel_for(0, (f.out + R - 1) / R, 4, [&](int64_t b0, int64_t b1) {
    std::vector<float> rows(static_cast<size_t>(R * f.in));
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t o0 = b * R, h = std::min(R, f.out - o0);
      for (int64_t r = 0; r < h; ++r) widen_row(f, o0 + r, rows.data() + r * f.in, avx2);
      for (int64_t t = 0; t < T; ++t)
        for (int64_t r = 0; r < h; ++r)
          y[t * f.out + o0 + r] = dot_f32(avx2, rows.data() + r * f.in, x + t * f.in, f.in) +
                                  (f.bias ? f.bias[o0 + r] : 0.f);
    }
  });
}

struct Proj {
  int kind = 0;  // 0 1-bit, 1 int8, 2 float
  BinaryWeights bin;
  Int8Weights i8;
  FloatWeights fl;
  int64_t out() const { return kind == 0 ? bin.out : kind == 1 ? i8.out : fl.out; }
  int64_t in() const { return kind == 0 ? bin.in : kind == 1 ? i8.in : fl.in; }
  void operator()(int64_t isa, const float* x, int64_t T, float* y) const {
    if (kind == 0)
      binary_linear_raw(bin, isa, x, T, y);
    else if (kind == 1)
      int8_linear_raw(i8.q, i8.out, i8.in, i8.scale, i8.bias, isa, x, T, y);
    else
      float_linear(fl, isa >= kAvx2, x, T, y);
  }
};

Proj make_proj(const BinaryWeights* bin, const Int8Weights* i8, const FloatWeights* fl) {
  DF_CHECK((bin != nullptr) + (i8 != nullptr) + (fl != nullptr) == 1,
           "a projection is 1-bit, int8 or float: exactly one of the three");
  Proj p;
  p.kind = bin ? 0 : i8 ? 1 : 2;
  if (bin) p.bin = *bin;
  if (i8) p.i8 = *i8;
  if (fl) p.fl = *fl;
  return p;
}

struct Layer {
  const float* norm_w;  // (d,)
  float eps;
  Proj in, out;
  StepWeights step;
  std::vector<float> conv;     // (conv_dim, d_conv)
  std::vector<uint8_t> ssm;    // (H, P, N) in the state type
};

class LiteModel {
 public:
  LiteModel(int64_t d, int64_t vocab, int64_t isa, bool use_avx2, StateType st, int64_t chunk)
      : d_(d), vocab_(vocab), isa_(isa), use_avx2_(use_avx2), st_(st), chunk_(std::max<int64_t>(chunk, 1)) {}

  void add_layer(const float* norm_w, double eps, const Proj& in, const Proj& out,
                 const StepWeights& step) {
    DF_CHECK(in.in() == d_ && out.out() == d_, "layer ", layers_.size(), ": in_proj takes ", in.in(),
             " and out_proj gives ", out.out(), " features, the model width is ", d_);
    const int64_t d_inner = step.H * step.P;
    DF_CHECK(in.out() == 2 * d_inner + 2 * step.G * step.N + step.H && out.in() == d_inner,
             "layer ", layers_.size(), ": projection widths do not match the mixer");
    DF_CHECK(step.conv_dim == d_inner + 2 * step.G * step.N, "conv width does not match the mixer");
    Layer l{norm_w, float(eps), in, out, step, {}, {}};
    l.conv.assign(static_cast<size_t>(step.conv_dim * step.d_conv), 0.f);
    l.ssm.assign(static_cast<size_t>(step.H * step.P * step.N * (st_ == StateType::f32 ? 4 : 2)), 0);
    zx_w_ = std::max(zx_w_, in.out());
    y_w_ = std::max(y_w_, d_inner);
    layers_.push_back(std::move(l));
  }

  // the tied embedding: int8 codes with a scale per row (q, scale), or float rows (fl)
  void set_head(const int8_t* q, const float* scale, const FloatWeights* fl, const float* norm_w,
                double eps) {
    DF_CHECK((q != nullptr) != (fl != nullptr), "the embedding is int8 or float, exactly one");
    DF_CHECK(!q || scale, "an int8 embedding needs its row scales");
    emb_q_ = q;
    emb_scale_ = scale;
    if (fl) {
      DF_CHECK(fl->out == vocab_ && fl->in == d_, "the float embedding must be (vocab, d_model)");
      emb_f_ = *fl;
    }
    norm_f_ = norm_w;
    norm_eps_ = float(eps);
  }

  void reset() {
    for (auto& l : layers_) {
      std::fill(l.conv.begin(), l.conv.end(), 0.f);
      std::fill(l.ssm.begin(), l.ssm.end(), 0);
    }
  }

  int64_t state_bytes() const {
    int64_t n = 0;
    for (const auto& l : layers_) n += int64_t(l.conv.size() * 4 + l.ssm.size());
    return n;
  }

  // ids (T,) -> logits (vocab,) of the last token; states advanced by T tokens
  void forward(const int32_t* ids, int64_t T, float* logits) {
    DF_CHECK(!layers_.empty() && (emb_q_ || emb_f_.w), "the model has no layers or no head yet");
    DF_CHECK(T > 0, "forward needs at least one token");
    for (int64_t i = 0; i < T; ++i)
      DF_CHECK(ids[i] >= 0 && ids[i] < vocab_, "token id ", ids[i], " is outside [0, ", vocab_, ")");
    const int64_t C = std::min(T, chunk_);
    hidden_.resize(static_cast<size_t>(C * d_));
    residual_.resize(static_cast<size_t>(C * d_));
    normed_.resize(static_cast<size_t>(C * d_));
    zx_.resize(static_cast<size_t>(C * zx_w_));
    y_.resize(static_cast<size_t>(C * y_w_));
    for (int64_t t0 = 0; t0 < T; t0 += C) {
      const int64_t n = std::min(C, T - t0);
      for (int64_t t = 0; t < n; ++t) {  // int8 row times its scale, as int8_embedding does
        float* h = hidden_.data() + t * d_;
        if (!emb_q_) {
          widen_row(emb_f_, ids[t0 + t], h, use_avx2_);
          continue;
        }
        const int8_t* q = emb_q_ + int64_t(ids[t0 + t]) * d_;
        const float s = emb_scale_[ids[t0 + t]];
        for (int64_t i = 0; i < d_; ++i) h[i] = float(q[i]) * s;
      }
      bool first = true;
      for (auto& l : layers_) {
        add_rms_norm(hidden_.data(), residual_.data(), first, l.norm_w, l.eps, n, d_, normed_.data());
        first = false;
        l.in(isa_, normed_.data(), n, zx_.data());
        const int64_t d_inner = l.step.H * l.step.P;
        for (int64_t t = 0; t < n; ++t)
          mamba2_step_raw(l.step, zx_.data() + t * l.in.out(), 1, l.conv.data(), l.ssm.data(), st_,
                          use_avx2_, y_.data() + t * d_inner);
        l.out(isa_, y_.data(), n, hidden_.data());
      }
      if (t0 + n < T) continue;
      // head on the last token: residual += hidden, final norm, int8 logits
      const int64_t last = n - 1;
      add_rms_norm(hidden_.data() + last * d_, residual_.data() + last * d_, false, norm_f_, norm_eps_,
                   1, d_, normed_.data());
      if (emb_q_)
        int8_linear_raw(emb_q_, vocab_, d_, emb_scale_, nullptr, isa_, normed_.data(), 1, logits);
      else
        float_linear(emb_f_, isa_ >= kAvx2, normed_.data(), 1, logits);
    }
  }

 private:
  int64_t d_, vocab_, isa_;
  bool use_avx2_;
  StateType st_;
  int64_t chunk_;
  int64_t zx_w_ = 0, y_w_ = 0;
  std::vector<Layer> layers_;
  const int8_t* emb_q_ = nullptr;
  const float* emb_scale_ = nullptr;
  FloatWeights emb_f_;
  const float* norm_f_ = nullptr;
  float norm_eps_ = 1e-5f;
  std::vector<float> hidden_, residual_, normed_, zx_, y_;
};

template <typename F>
int guarded(F&& f) {
  try {
    f();
    return 0;
  } catch (const std::exception& e) {
    g_error = e.what();
  } catch (...) {
    g_error = "unknown C++ exception";
  }
  return -1;
}

}  // namespace

extern "C" {

const char* dfl_last_error() { return g_error.c_str(); }

// sizeof of the structs the Python side mirrors with ctypes: a mismatch stops the load
int64_t dfl_abi(int64_t which) {
  switch (which) {
    case 0: return 5;  // ABI version
    case 1: return int64_t(sizeof(BinaryWeights));
    case 2: return int64_t(sizeof(StepWeights));
    case 3: return int64_t(sizeof(RowVec));
    case 4: return int64_t(sizeof(Int8Weights));
    case 5: return int64_t(sizeof(FloatWeights));
    default: return -1;
  }
}

int64_t dfl_best_isa() { return best_isa(); }
int dfl_has_f16c() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("f16c") ? 1 : 0;
}
void dfl_set_threads(int n) { omp_set_num_threads(std::max(1, n)); }

// n fp16 (bf16 when bf16 != 0) values -> fp32, exactly (the fixed tensors, once at load)
void dfl_widen16(const uint16_t* src, float* dst, int64_t n, int bf16) {
  widen16(bf16 != 0, best_isa() >= kAvx2, src, dst, n);
}
// Row-wise IntN codes (formats/quant.py pack_intn: offset binary, an LSB-first bitstream
// per row of ceil(n * bits / 8) bytes) -> int8 values code - 2^(bits - 1), (rows, n).
void dfl_unpack_intn(const uint8_t* src, int64_t rows, int64_t n, int bits, int8_t* dst) {
  const int64_t nbytes = (n * bits + 7) / 8;
  const int offset = 1 << (bits - 1), mask = (1 << bits) - 1;
  for (int64_t r = 0; r < rows; ++r) {
    const uint8_t* row = src + r * nbytes;
    for (int64_t j = 0; j < n; ++j) {
      const int64_t bit = j * bits;
      uint32_t w = row[bit >> 3];
      if ((bit & 7) + bits > 8) w |= uint32_t(row[(bit >> 3) + 1]) << 8;
      dst[r * n + j] = static_cast<int8_t>(int((w >> (bit & 7)) & uint32_t(mask)) - offset);
    }
  }
}

void dfl_reorder_row_blocks(uint8_t* bits, int64_t out, int64_t nb) {
  reorder_row_blocks_raw(bits, out, nb, true);
}

void* dfl_create(int64_t d_model, int64_t vocab, int64_t isa_req, int use_avx2, int state_type,
                 int64_t chunk) {
  LiteModel* m = nullptr;
  const int rc = guarded([&] {
    DF_CHECK(state_type >= 0 && state_type <= 2, "state type is 0 (fp32), 1 (bf16) or 2 (fp16)");
    m = new LiteModel(d_model, vocab, resolve_isa(isa_req), use_avx2 != 0,
                      static_cast<StateType>(state_type), chunk);
  });
  return rc == 0 ? m : nullptr;
}

void dfl_destroy(void* m) { delete static_cast<LiteModel*>(m); }

// in_proj and out_proj: each 1-bit, int8 or float (that one's weights given, the other two null)
int dfl_add_layer(void* m, const float* norm_w, double eps, const BinaryWeights* in_bin,
                  const Int8Weights* in_i8, const FloatWeights* in_f, const BinaryWeights* out_bin,
                  const Int8Weights* out_i8, const FloatWeights* out_f, const StepWeights* step) {
  return guarded([&] {
    static_cast<LiteModel*>(m)->add_layer(norm_w, eps, make_proj(in_bin, in_i8, in_f),
                                          make_proj(out_bin, out_i8, out_f), *step);
  });
}

int dfl_set_head(void* m, const int8_t* q, const float* scale, const FloatWeights* fl,
                 const float* norm_w, double eps) {
  return guarded([&] { static_cast<LiteModel*>(m)->set_head(q, scale, fl, norm_w, eps); });
}

void dfl_reset(void* m) { static_cast<LiteModel*>(m)->reset(); }
int64_t dfl_state_bytes(void* m) { return static_cast<LiteModel*>(m)->state_bytes(); }

int dfl_forward(void* m, const int32_t* ids, int64_t T, float* logits) {
  return guarded([&] { static_cast<LiteModel*>(m)->forward(ids, T, logits); });
}

// One token from logits[0:n]: argmax when temperature <= 0; else softmax(logits / T) cut to
// the top_k largest (0: all) and then to the smallest set of largest ones whose mass reaches
// top_p, and the token where the cumulative mass (in the kept set's order) passes u * (kept
// mass), u uniform in [0, 1). Nothing is sorted: the top-p boundary is found by a weighted
// quickselect, O(n). (A full sort of 50k logits took 3.8 ms, a quarter of a 1.3B decode step;
// growing partial sorts, on a random-init model's flat distribution, more.)
int64_t dfl_sample(const float* logits, int64_t n, double temperature, int64_t top_k,
                   double top_p, double u) {
  if (n <= 0) return -1;
  const int64_t best = std::max_element(logits, logits + n) - logits;
  if (temperature <= 0.0) return best;
  std::vector<int32_t> idx(static_cast<size_t>(n));
  std::iota(idx.begin(), idx.end(), 0);
  auto desc = [&](int32_t a, int32_t b) { return logits[a] > logits[b] || (logits[a] == logits[b] && a < b); };
  if (top_k > 0 && top_k < n) {
    std::nth_element(idx.begin(), idx.begin() + top_k, idx.end(), desc);
    idx.resize(static_cast<size_t>(top_k));
  }
  std::vector<double> w(static_cast<size_t>(n));  // unnormalised probabilities, by token id
  double total = 0.0;
  for (int32_t i : idx) total += (w[i] = std::exp((logits[i] - double(logits[best])) / temperature));
  size_t keep = idx.size();
  if (top_p < 1.0) {
    // idx[0:lo) are the lo largest, of mass acc < need; the boundary token lies in [lo, hi)
    const double need = top_p * total;
    size_t lo = 0, hi = idx.size();
    double acc = 0.0;
    while (hi - lo > 1) {
      const size_t mid = lo + (hi - lo) / 2;
      std::nth_element(idx.begin() + lo, idx.begin() + mid, idx.begin() + hi, desc);
      double s = 0.0;
      for (size_t i = lo; i < mid; ++i) s += w[idx[i]];
      if (acc + s >= need) {
        hi = mid;
      } else {
        acc += s;
        lo = mid;
      }
    }
    keep = lo + 1;
  }
  double kept = 0.0;
  for (size_t i = 0; i < keep; ++i) kept += w[idx[i]];
  const double target = u * kept;
  double c = 0.0;
  for (size_t i = 0; i < keep; ++i) {
    c += w[idx[i]];
    if (target < c) return idx[i];
  }
  return idx[keep - 1];
}

}  // extern "C"
