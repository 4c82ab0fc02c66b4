// The optimizer step on CPU in one pass over memory: plain or rotational AdamW, Lion or SGDM.
//
// The CPU counterpart of the Triton kernel in fused.py, built on first use by cpu_fused.py.
// The eager step makes about 20 passes over a tensor (each foreach op and each per-neuron sum
// reads it again). Here a thread owns whole neurons. For a row neuron (neuron axis 0 of a
// contiguous tensor), one loop reads w, g and the moments. It writes the moments and keeps u in
// a scratch row while it takes the five sums. A second loop then writes w = a*w + b*u + c from
// L1. A block of column neurons (GPT-2's Conv1D, neuron axis 1) goes the same way, 16 columns at
// a time, with the scratch in L2. Either way memory traffic is that of the plain step. On a
// measured step the same loops also sum the rotation tracker's float64 |w_t|^2, <w_t, dw>, |dw|^2
// and |g|^2 per neuron, for plain tensors too (walked by neurons then).
//
// The algebra mirrors `_rotation_coefficients` (rotational.py) and `_coefficients` (fused.py)
// term for term, in float32, so the three paths agree to rounding: tests/test_optim_cpu_fused.py.

#include <torch/extension.h>

#include <algorithm>
#include <cmath>
#include <vector>

namespace {

constexpr float kTiny = 1.1754943508222875e-38f;  // float32's smallest normal, as _TINY
constexpr int64_t kColumnBlock = 16;               // column neurons per task: one 64-byte line per row

enum Rule { kAdamW = 0, kLion = 1, kSgdm = 2 };

struct Hyper {
  float lr, wd, beta1, beta2, eps, scale, eta, decay, decay_bias, rot_eps;
  bool zero_mean;
};

// The inner rule at one element: returns u (no lr, no scale) and advances m (and v).
// SGDM's plain decay is coupled (L2 through the momentum); the rotational step has no decay.
template <int RULE, bool ROTATIONAL>
inline float direction(float w, float g, float& m, float& v, const Hyper& h) {
  if constexpr (RULE == kAdamW) {
    m = m + (1.0f - h.beta1) * (g - m);
    v = v * h.beta2 + (1.0f - h.beta2) * g * g;
    return m / (std::sqrt(v) + h.eps);
  } else if constexpr (RULE == kLion) {
    const float mix = m + (1.0f - h.beta1) * (g - m);
    m = m + (1.0f - h.beta2) * (g - m);
    return static_cast<float>((mix > 0.0f) - (mix < 0.0f));  // sign(NaN) = 0, as torch.sign
  } else {
    if constexpr (!ROTATIONAL) g = g + h.wd * w;
    m = m * h.beta1 + g;
    return m;
  }
}

struct Sums {
  float w_sq = 0, u_sq = 0, dot = 0, w_sum = 0, u_sum = 0;
};

struct Coefficients {
  float a, b, c, avg;
};

Coefficients coefficients(const Sums& s, float width, float norm, float avg, const Hyper& h) {
  const float alpha = s.dot / std::max(s.w_sq, kTiny);
  float u2_sq = s.u_sq - alpha * s.dot;
  float mu = 0.0f, nu = 0.0f;
  if (h.zero_mean) {
    const float u1_sum = s.u_sum - alpha * s.w_sum;
    mu = u1_sum / width;
    nu = s.w_sum / width;
    u2_sq -= mu * u1_sum;
  }
  u2_sq = std::max(u2_sq, 0.0f);
  avg = avg * h.decay + ((1.0f - h.decay) * h.scale * h.scale) * u2_sq;
  const float beta = (h.eta * h.scale) * norm / (std::sqrt(avg / h.decay_bias) + h.rot_eps);
  float w1_sq = s.w_sq + beta * beta * u2_sq;
  if (h.zero_mean) w1_sq -= s.w_sum * (nu - 2.0f * beta * mu);
  const float r = norm / std::sqrt(std::max(w1_sq, kTiny));
  return {r + r * beta * alpha, -r * beta, h.zero_mean ? r * (beta * mu - nu) : 0.0f, avg};
}

// Plain rule over a flat range of one tensor.
template <int RULE>
void plain_range(float* w, const float* g, float* m, float* v, int64_t begin, int64_t end, const Hyper& h) {
  const float keep = RULE == kSgdm ? 1.0f : 1.0f - h.lr * h.wd;
  const float step = RULE == kSgdm ? h.lr : h.lr * h.scale;
#pragma omp simd
  for (int64_t k = begin; k < end; ++k) {
    float mk = m[k], vk = RULE == kAdamW ? v[k] : 0.0f;
    const float u = direction<RULE, false>(w[k], g[k], mk, vk, h);
    m[k] = mk;
    if constexpr (RULE == kAdamW) v[k] = vk;
    w[k] = w[k] * keep - step * u;
  }
}

// The tracker's sums of one element moving from w0 to w1, in float64 (dw is exact there).
inline void add_delta(double& w_sq, double& dot, double& dw_sq, float w0, float w1) {
  const double w = w0, dw = static_cast<double>(w1) - w;
  w_sq += w * w;
  dot += w * dw;
  dw_sq += dw * dw;
}

// One row neuron: w, g, m, v point at its first element; u is `width` floats of scratch (RV only).
// TRACK: also write the rotation tracker's float64 |w_t|^2, <w_t, dw>, |dw|^2, |g|^2 to `track`.
template <int RULE, bool ROTATIONAL, bool TRACK>
void neuron_row(float* w, const float* g, float* m, float* v, float* u, int64_t width, float norm, float* avg,
                double* track, const Hyper& h) {
  const float keep = RULE == kSgdm ? 1.0f : 1.0f - h.lr * h.wd;  // the plain step's decay and lr
  const float rate = RULE == kSgdm ? h.lr : h.lr * h.scale;
  float w_sq = 0, u_sq = 0, dot = 0, w_sum = 0, u_sum = 0;
  double t_w = 0, t_dot = 0, t_dw = 0, t_g = 0;
#pragma omp simd reduction(+ : w_sq, u_sq, dot, w_sum, u_sum, t_w, t_dot, t_dw, t_g)
  for (int64_t k = 0; k < width; ++k) {
    float mk = m[k], vk = RULE == kAdamW ? v[k] : 0.0f;
    const float wk = w[k], gk = g[k];
    const float uk = direction<RULE, ROTATIONAL>(wk, gk, mk, vk, h);
    m[k] = mk;
    if constexpr (RULE == kAdamW) v[k] = vk;
    if constexpr (ROTATIONAL) {
      u[k] = uk;
      w_sq += wk * wk;
      u_sq += uk * uk;
      dot += uk * wk;
      w_sum += wk;
      u_sum += uk;
    } else {
      const float nw = wk * keep - rate * uk;
      w[k] = nw;
      if constexpr (TRACK) add_delta(t_w, t_dot, t_dw, wk, nw);
    }
    if constexpr (TRACK) t_g += static_cast<double>(gk) * gk;
  }
  if constexpr (ROTATIONAL) {
    const Coefficients co = coefficients({w_sq, u_sq, dot, w_sum, u_sum}, static_cast<float>(width), norm, *avg, h);
    *avg = co.avg;
#pragma omp simd reduction(+ : t_w, t_dot, t_dw)
    for (int64_t k = 0; k < width; ++k) {
      const float wk = w[k], nw = co.a * wk + co.b * u[k] + co.c;
      w[k] = nw;
      if constexpr (TRACK) add_delta(t_w, t_dot, t_dw, wk, nw);
    }
  }
  if constexpr (TRACK) track[0] = t_w, track[1] = t_dot, track[2] = t_dw, track[3] = t_g;
}

// Columns [col, col + count) of a [rows, cols] tensor, each one neuron; u is rows * kColumnBlock
// floats (RV only); `track` the tracker's rows of these columns (TRACK only). As `neuron_row`.
template <int RULE, bool ROTATIONAL, bool TRACK>
void neuron_columns(float* w, const float* g, float* m, float* v, float* u, int64_t rows, int64_t cols, int64_t col,
                    int64_t count, const float* norm, float* avg, double* track, const Hyper& h) {
  const float keep = RULE == kSgdm ? 1.0f : 1.0f - h.lr * h.wd;
  const float rate = RULE == kSgdm ? h.lr : h.lr * h.scale;
  Sums s[kColumnBlock];
  double t[kColumnBlock][4] = {};
  for (int64_t i = 0; i < rows; ++i) {
    const int64_t at = i * cols + col;
    float* ui = u + i * kColumnBlock;
    for (int64_t j = 0; j < count; ++j) {
      float mk = m[at + j], vk = RULE == kAdamW ? v[at + j] : 0.0f;
      const float wk = w[at + j], gk = g[at + j];
      const float uk = direction<RULE, ROTATIONAL>(wk, gk, mk, vk, h);
      m[at + j] = mk;
      if constexpr (RULE == kAdamW) v[at + j] = vk;
      if constexpr (ROTATIONAL) {
        ui[j] = uk;
        s[j].w_sq += wk * wk;
        s[j].u_sq += uk * uk;
        s[j].dot += uk * wk;
        s[j].w_sum += wk;
        s[j].u_sum += uk;
      } else {
        const float nw = wk * keep - rate * uk;
        w[at + j] = nw;
        if constexpr (TRACK) add_delta(t[j][0], t[j][1], t[j][2], wk, nw);
      }
      if constexpr (TRACK) t[j][3] += static_cast<double>(gk) * gk;
    }
  }
  if constexpr (ROTATIONAL) {
    float a[kColumnBlock], b[kColumnBlock], c[kColumnBlock];
    for (int64_t j = 0; j < count; ++j) {
      const Coefficients co = coefficients(s[j], static_cast<float>(rows), norm[col + j], avg[col + j], h);
      a[j] = co.a, b[j] = co.b, c[j] = co.c, avg[col + j] = co.avg;
    }
    for (int64_t i = 0; i < rows; ++i) {
      float* wi = w + i * cols + col;
      const float* ui = u + i * kColumnBlock;
      for (int64_t j = 0; j < count; ++j) {
        const float wk = wi[j], nw = a[j] * wk + b[j] * ui[j] + c[j];
        wi[j] = nw;
        if constexpr (TRACK) add_delta(t[j][0], t[j][1], t[j][2], wk, nw);
      }
    }
  }
  if constexpr (TRACK)
    for (int64_t j = 0; j < count; ++j)
      for (int q = 0; q < 4; ++q) track[(col + j) * 4 + q] = t[j][q];
}

float* data(const torch::Tensor& t) { return t.data_ptr<float>(); }

struct Tensors {
  const std::vector<torch::Tensor>&ws, &gs, &ms, &vs, &norms, &avgs, &sums;
};

// Tensor t walked by neurons along `axis` (0: rows, 1: columns of a 2-d tensor).
template <int RULE, bool ROTATIONAL, bool TRACK>
void step_neurons(const Tensors& ts, size_t t, int64_t axis, const Hyper& h, int threads) {
  float *w = data(ts.ws[t]), *m = data(ts.ms[t]), *v = RULE == kAdamW ? data(ts.vs[t]) : nullptr;
  const float* g = data(ts.gs[t]);
  const float* norm = ROTATIONAL ? data(ts.norms[t]) : nullptr;
  float* avg = ROTATIONAL ? data(ts.avgs[t]) : nullptr;
  double* track = TRACK ? ts.sums[t].data_ptr<double>() : nullptr;
  const int64_t rows = ts.ws[t].size(0), cols = ts.ws[t].numel() / std::max<int64_t>(rows, 1);
  if (axis == 0) {
#pragma omp parallel num_threads(threads)
    {
      std::vector<float> u(ROTATIONAL ? cols : 0);
#pragma omp for schedule(static)
      for (int64_t i = 0; i < rows; ++i)
        neuron_row<RULE, ROTATIONAL, TRACK>(w + i * cols, g + i * cols, m + i * cols, v ? v + i * cols : nullptr,
                                            u.data(), cols, ROTATIONAL ? norm[i] : 0.0f,
                                            ROTATIONAL ? avg + i : nullptr, TRACK ? track + 4 * i : nullptr, h);
    }
  } else {
    const int64_t blocks = (cols + kColumnBlock - 1) / kColumnBlock;
#pragma omp parallel num_threads(threads)
    {
      std::vector<float> u(ROTATIONAL ? rows * kColumnBlock : 0);
#pragma omp for schedule(static)
      for (int64_t j = 0; j < blocks; ++j)
        neuron_columns<RULE, ROTATIONAL, TRACK>(w, g, m, v, u.data(), rows, cols, j * kColumnBlock,
                                                std::min(kColumnBlock, cols - j * kColumnBlock), norm, avg, track, h);
    }
  }
}

template <int RULE>
void step_rule(const Tensors& ts, int64_t axis, bool rotational, bool track, const Hyper& h, int threads) {
  constexpr int64_t kChunk = 1 << 16;  // plain untracked tensors go in chunks of 64K elements
  for (size_t t = 0; t < ts.ws.size(); ++t) {
    if (axis < 0) {
      float *w = data(ts.ws[t]), *m = data(ts.ms[t]), *v = RULE == kAdamW ? data(ts.vs[t]) : nullptr;
      const float* g = data(ts.gs[t]);
      const int64_t numel = ts.ws[t].numel(), tasks = (numel + kChunk - 1) / kChunk;
#pragma omp parallel for num_threads(threads) schedule(static)
      for (int64_t i = 0; i < tasks; ++i) plain_range<RULE>(w, g, m, v, i * kChunk, std::min(numel, (i + 1) * kChunk), h);
    } else if (rotational && track) {
      step_neurons<RULE, true, true>(ts, t, axis, h, threads);
    } else if (rotational) {
      step_neurons<RULE, true, false>(ts, t, axis, h, threads);
    } else if (track) {
      step_neurons<RULE, false, true>(ts, t, axis, h, threads);
    } else {
      step_neurons<RULE, false, false>(ts, t, axis, h, threads);
    }
  }
}

// Steps same-rule tensors in place. axis -1: plain, untracked, any contiguous shape; 0: one neuron
// per index of dim 0; 1: one neuron per column of a 2-d tensor. `sums`: per tensor a float64
// [neurons, 4] contiguous tensor for the rotation tracker, or empty (no tracking).
void step(const std::vector<torch::Tensor>& weights, const std::vector<torch::Tensor>& grads,
          const std::vector<torch::Tensor>& exp_avgs, const std::vector<torch::Tensor>& exp_avg_sqs,
          const std::vector<torch::Tensor>& norms, const std::vector<torch::Tensor>& avgs,
          const std::vector<torch::Tensor>& sums, int64_t rule, int64_t axis, bool rotational, double lr, double wd,
          double beta1, double beta2, double eps, double scale, double eta, double decay, double decay_bias,
          double rot_eps, bool zero_mean, int64_t threads) {
  const Hyper h{static_cast<float>(lr),    static_cast<float>(wd),         static_cast<float>(beta1),
                static_cast<float>(beta2), static_cast<float>(eps),        static_cast<float>(scale),
                static_cast<float>(eta),   static_cast<float>(decay),      static_cast<float>(decay_bias),
                static_cast<float>(rot_eps), zero_mean};
  const Tensors ts{weights, grads, exp_avgs, exp_avg_sqs, norms, avgs, sums};
  const bool track = !sums.empty();
  const int n = static_cast<int>(std::max<int64_t>(threads, 1));
  if (rule == kAdamW) step_rule<kAdamW>(ts, axis, rotational, track, h, n);
  else if (rule == kLion) step_rule<kLion>(ts, axis, rotational, track, h, n);
  else step_rule<kSgdm>(ts, axis, rotational, track, h, n);
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, module) {
  module.def("step", &step, "One optimizer step of same-rule fp32 CPU tensors, in place (see cpu_fused.py).");
}
