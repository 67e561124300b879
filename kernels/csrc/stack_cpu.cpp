// The CPU decode step's layer loop in one call (dfplan/runtime/leanstep.py).
//
// Per layer: residual += hidden, RMSNorm, in_proj (1-bit), fused SSM step, out_proj (1-bit).
// Done from Python, each layer paid ~60 us of interpreter and dispatch time around ~0.4 ms of
// kernels: F.rms_norm alone is ~18 us on a 2048-vector, and every kernel call converts ~14
// arguments through pybind. Here the arguments are bound once per decode (add_layer /
// set_linear) and the loop calls the same C++ kernels the Python path calls, so the numbers
// are those kernels' numbers; only the RMSNorm is a new loop (same formula as F.rms_norm,
// summed in another order: ~1e-7 relative).
#include <torch/extension.h>

#include "cpu_common.h"

#include <chrono>

at::Tensor binary_linear(const at::Tensor& x, const at::Tensor& bits,
                         const c10::optional<at::Tensor>& row_scale,
                         const c10::optional<at::Tensor>& col_scale,
                         const c10::optional<at::Tensor>& col_shift,
                         const c10::optional<at::Tensor>& u, const c10::optional<at::Tensor>& u_scale,
                         const c10::optional<at::Tensor>& v, const c10::optional<at::Tensor>& v_scale,
                         const c10::optional<at::Tensor>& bias, int64_t in_features, int64_t isa_req,
                         const c10::optional<at::Tensor>& out_buf, int64_t layout);
at::Tensor mamba2_step(const at::Tensor& zxbcdt, at::Tensor conv_state, at::Tensor ssm_state,
                       const at::Tensor& conv_weight, const c10::optional<at::Tensor>& conv_bias,
                       const at::Tensor& dt_bias, const at::Tensor& A_log, const at::Tensor& D,
                       const at::Tensor& norm_weight, double eps, int64_t ngroups, int64_t headdim,
                       int64_t d_state, bool norm_before_gate, bool use_avx2);

using dfplan_cpu::add_rms_norm;

namespace {

using Opt = c10::optional<at::Tensor>;

struct Linear {  // a BinaryLinear's tensors, as binary_linear takes them
  at::Tensor bits;
  Opt row_scale, col_scale, col_shift, u, u_scale, v, v_scale, bias;
  int64_t in_features = 0, layout = 0;
  bool set = false;

  at::Tensor operator()(const at::Tensor& x, int64_t isa) const {
    return binary_linear(x, bits, row_scale, col_scale, col_shift, u, u_scale, v, v_scale, bias,
                         in_features, isa, c10::nullopt, layout);
  }
};

struct Layer {
  at::Tensor norm_w;  // (d,) fp32
  double eps;
  Linear in, out;
  at::Tensor conv, ssm, conv_w;  // the cache's conv window and SSM state, updated in place
  Opt conv_b;
  at::Tensor dt_bias, A_log, D, gnorm_w;
  double gnorm_eps;
  int64_t ngroups, headdim, d_state;
  bool norm_before_gate;
};

// The same loop as an op, for the Python twin of LeanStack::run (tests compare the two bit
// for bit; the norm's summation order differs from torch's, and a last-bit difference can
// flip the 1-bit kernels' int8 rounding of the activations, so only an equal norm makes the
// rest of the loop comparable exactly). hidden, residual, w: contiguous fp32; residual (B, d)
// is written in place (ignored as input when first); returns the normed (B, d).
at::Tensor add_rms_norm_op(const at::Tensor& hidden, at::Tensor& residual, bool first,
                           const at::Tensor& w, double eps) {
  for (const at::Tensor* t : std::initializer_list<const at::Tensor*>{&hidden, &residual, &w})
    TORCH_CHECK(t->scalar_type() == at::kFloat && t->is_contiguous() && t->device().is_cpu(),
                "add_rms_norm_ takes contiguous fp32 CPU tensors");
  TORCH_CHECK(hidden.dim() == 2 && residual.sizes() == hidden.sizes() && w.dim() == 1 &&
                  w.size(0) == hidden.size(1),
              "add_rms_norm_: hidden and residual (B, d), w (d,)");
  auto out = at::empty_like(hidden);
  add_rms_norm(hidden.data_ptr<float>(), residual.data_ptr<float>(), first, w.data_ptr<float>(),
               float(eps), hidden.size(0), hidden.size(1), out.data_ptr<float>());
  return out;
}

class LeanStack {
 public:
  LeanStack(int64_t isa, bool use_avx2) : isa_(isa), use_avx2_(use_avx2) {}

  void add_layer(const at::Tensor& norm_w, double eps, const at::Tensor& conv, const at::Tensor& ssm,
                 const at::Tensor& conv_w, const Opt& conv_b, const at::Tensor& dt_bias,
                 const at::Tensor& A_log, const at::Tensor& D, const at::Tensor& gnorm_w,
                 double gnorm_eps, int64_t ngroups, int64_t headdim, int64_t d_state,
                 bool norm_before_gate) {
    TORCH_CHECK(norm_w.scalar_type() == at::kFloat && norm_w.dim() == 1 && norm_w.is_contiguous(),
                "norm weight must be a contiguous fp32 vector");
    TORCH_CHECK(layers_.empty() || norm_w.size(0) == layers_.front().norm_w.size(0),
                "every layer must have the same width");
    layers_.push_back(Layer{norm_w, eps, {}, {}, conv, ssm, conv_w, conv_b, dt_bias, A_log, D,
                            gnorm_w, gnorm_eps, ngroups, headdim, d_state, norm_before_gate});
  }

  // which: 0 = the last added layer's in_proj, 1 = its out_proj
  void set_linear(int64_t which, const at::Tensor& bits, const Opt& row_scale, const Opt& col_scale,
                  const Opt& col_shift, const Opt& u, const Opt& u_scale, const Opt& v,
                  const Opt& v_scale, const Opt& bias, int64_t in_features, int64_t layout) {
    TORCH_CHECK(!layers_.empty(), "add_layer first");
    TORCH_CHECK(which == 0 || which == 1, "which is 0 (in_proj) or 1 (out_proj)");
    Linear& l = which == 0 ? layers_.back().in : layers_.back().out;
    l = Linear{bits, row_scale, col_scale, col_shift, u, u_scale, v, v_scale, bias, in_features,
               layout, true};
  }

  // hidden (B, d) fp32 -> (hidden, residual) after the last layer, as the Python loop returns
  std::tuple<at::Tensor, at::Tensor> run(const at::Tensor& hidden_in) {
    TORCH_CHECK(!layers_.empty(), "no layers");
    for (const auto& l : layers_) TORCH_CHECK(l.in.set && l.out.set, "a layer lacks its linears");
    const int64_t d = layers_.front().norm_w.size(0);
    TORCH_CHECK(hidden_in.scalar_type() == at::kFloat && hidden_in.dim() == 2 &&
                    hidden_in.size(1) == d && hidden_in.is_contiguous() && hidden_in.device().is_cpu(),
                "hidden must be a contiguous fp32 CPU tensor of shape (B, ", d, ")");
    const int64_t B = hidden_in.size(0);
    auto residual = at::empty({B, d}, hidden_in.options());
    auto normed = at::empty({B, d}, hidden_in.options());
    at::Tensor hidden = hidden_in;
    using clock = std::chrono::steady_clock;
    auto mark = clock::now();
    auto lap = [&](int k) {
      if (!timing_) return;
      const auto now = clock::now();
      seconds_[k] += std::chrono::duration<double>(now - mark).count();
      mark = now;
    };
    bool first = true;
    for (const auto& l : layers_) {
      add_rms_norm(hidden.data_ptr<float>(), residual.data_ptr<float>(), first,
                   l.norm_w.data_ptr<float>(), float(l.eps), B, d, normed.data_ptr<float>());
      first = false;
      lap(0);
      const at::Tensor zx = l.in(normed, isa_);
      lap(1);
      const at::Tensor y = mamba2_step(zx, l.conv, l.ssm, l.conv_w, l.conv_b, l.dt_bias, l.A_log, l.D,
                                       l.gnorm_w, l.gnorm_eps, l.ngroups, l.headdim, l.d_state,
                                       l.norm_before_gate, use_avx2_);
      lap(2);
      hidden = l.out(y, isa_);
      lap(3);
    }
    return {hidden, residual};
  }

  // seconds spent in [norms + residuals, in_proj, SSM step, out_proj] while timing was on
  void set_timing(bool on) { timing_ = on; }
  std::vector<double> seconds() const { return {seconds_, seconds_ + 4}; }
  int64_t size() const { return static_cast<int64_t>(layers_.size()); }

 private:
  int64_t isa_;
  bool use_avx2_;
  bool timing_ = false;
  double seconds_[4] = {0, 0, 0, 0};
  std::vector<Layer> layers_;
};

}  // namespace

void bind_stack(pybind11::module& m) {
  namespace py = pybind11;
  py::class_<LeanStack>(m, "LeanStack", "the decode step's layer loop, arguments bound once")
      .def(py::init<int64_t, bool>(), py::arg("isa"), py::arg("use_avx2"))
      .def("add_layer", &LeanStack::add_layer)
      .def("set_linear", &LeanStack::set_linear)
      .def("run", &LeanStack::run, py::call_guard<py::gil_scoped_release>())
      .def("set_timing", &LeanStack::set_timing)
      .def("seconds", &LeanStack::seconds)
      .def("__len__", &LeanStack::size);
  m.def("add_rms_norm_", &add_rms_norm_op, "residual = hidden (+ residual), in place; returns rmsnorm(residual) * w",
        py::arg("hidden"), py::arg("residual"), py::arg("first"), py::arg("w"), py::arg("eps"));
}
