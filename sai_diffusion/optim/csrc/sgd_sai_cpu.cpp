// SGD-SaI's steady-state update in one pass over memory (CPU, float32 / float64).
//
// Per tensor i with its constant scale s_i, element by element:
//     m <- m + (1 - mu) (g - m)          (torch.lerp(m, g, 1 - mu), mu = momentum)
//     p <- p * decay - (lr s_i) m        (decay = 1 - lr wd)
// reading p, m, g and writing p, m once: 20 bytes per fp32 parameter, where the foreach path
// (lerp, mul, addcmul: three kernels) moves 36. Without momentum, p <- p * decay - (lr s_i) g.
// On a block's first step (first = true) the buffer is set, m <- g, instead of the lerp.
// The loops are plain C++ that the compiler vectorises (-O3, and the CPU's own instruction
// set); the results equal the foreach path to rounding (FMA contraction), not bitwise.
//
// gsnr_stats gives what a block's g-SNR needs from its first gradient in one sweep: sum of
// squares (||g||^2), sum of squared deviations from the mean (var * (n - correction)), and
// whether all elements are equal (zero variance, exactly: no rounding of the mean involved).

#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <vector>

namespace {

constexpr int64_t kGrain = 1 << 15;  // elements per parallel chunk (128 kB of fp32)

template <typename T>
void update_range(T* __restrict p, T* __restrict m, const T* __restrict g, int64_t begin,
                  int64_t end, T weight, T step, T decay, T sign, bool first) {
  if (m != nullptr && first) {
#pragma omp simd
    for (int64_t j = begin; j < end; ++j) {
      const T grad = sign * g[j];
      m[j] = grad;
      p[j] = p[j] * decay - step * grad;
    }
  } else if (m != nullptr) {
#pragma omp simd
    for (int64_t j = begin; j < end; ++j) {
      const T grad = sign * g[j];
      const T mom = m[j] + weight * (grad - m[j]);
      m[j] = mom;
      p[j] = p[j] * decay - step * mom;
    }
  } else {
#pragma omp simd
    for (int64_t j = begin; j < end; ++j) {
      p[j] = p[j] * decay - step * (sign * g[j]);
    }
  }
}

template <typename T>
void update_tensor(at::Tensor& p, at::Tensor* m, const at::Tensor& g, double weight, double step,
                   double decay, double sign, bool first, bool parallel) {
  T* pp = p.data_ptr<T>();
  T* mp = m != nullptr ? m->data_ptr<T>() : nullptr;
  const T* gp = g.data_ptr<T>();
  const int64_t n = p.numel();
  auto body = [&](int64_t begin, int64_t end) {
    update_range<T>(pp, mp, gp, begin, end, static_cast<T>(weight), static_cast<T>(step),
                    static_cast<T>(decay), static_cast<T>(sign), first);
  };
  if (parallel) {
    at::parallel_for(0, n, kGrain, body);
  } else {
    body(0, n);
  }
}

// t must be a contiguous CPU tensor of like's dtype (and, for a gradient or buffer, its size)
// run(i, parallel) for every tensor: large ones one after another, each split across threads;
// small ones (LoRA factors: thousands of elements) whole to one thread each, all of them in one
// parallel region, so a call over hundreds of them pays for one.
template <typename F>
void for_each_tensor(const std::vector<at::Tensor>& tensors, const F& run) {
  std::vector<size_t> small;
  for (size_t i = 0; i < tensors.size(); ++i) {
    if (tensors[i].numel() >= kGrain) {
      run(i, true);
    } else {
      small.push_back(i);
    }
  }
  at::parallel_for(0, static_cast<int64_t>(small.size()), 8, [&](int64_t begin, int64_t end) {
    for (int64_t k = begin; k < end; ++k) run(small[k], false);
  });
}

void check(const at::Tensor& t, const at::Tensor& like, bool same_size, const char* what) {
  TORCH_CHECK(t.device().is_cpu() && t.is_contiguous() && t.scalar_type() == like.scalar_type() &&
                  (!same_size || t.numel() == like.numel()),
              "sgd_sai_step_: ", what, " must be a contiguous CPU tensor like its parameter");
}

}  // namespace

// params, grads (and momentum buffers, or an empty list): one dtype per call, float or double.
void sgd_sai_step_(std::vector<at::Tensor> params, const std::vector<at::Tensor>& grads,
                   std::vector<at::Tensor> moms, const std::vector<double>& scales, double lr,
                   double momentum, double decay, bool maximize, bool first) {
  const size_t n = params.size();
  const bool with_momentum = !moms.empty();
  TORCH_CHECK(grads.size() == n && scales.size() == n && (!with_momentum || moms.size() == n),
              "sgd_sai_step_: params, grads, scales (and momentum buffers) differ in length");
  for (size_t i = 0; i < n; ++i) {
    check(params[i], params[0], false, "a parameter");
    check(grads[i], params[i], true, "a gradient");
    if (with_momentum) check(moms[i], params[i], true, "a momentum buffer");
  }
  const double weight = 1.0 - momentum;
  const double sign = maximize ? -1.0 : 1.0;
  const bool is_double = n > 0 && params[0].scalar_type() == at::kDouble;
  TORCH_CHECK(n == 0 || is_double || params[0].scalar_type() == at::kFloat,
              "sgd_sai_step_: float32 or float64 parameters only");

  auto run = [&](size_t i, bool parallel) {
    at::Tensor* m = with_momentum ? &moms[i] : nullptr;
    const double step = lr * scales[i];
    if (is_double) {
      update_tensor<double>(params[i], m, grads[i], weight, step, decay, sign, first, parallel);
    } else {
      update_tensor<float>(params[i], m, grads[i], weight, step, decay, sign, first, parallel);
    }
  };
  for_each_tensor(params, run);
}

namespace {

struct Stats {
  double shifted = 0, shifted_sq = 0, sum_sq = 0;  // sums of (g - k), (g - k)^2, g^2
  double low = 0, high = 0;                        // min and max (equal: all elements equal)
};

// One sweep over g[begin, end) with a shift k near the mean: n var = sum (g - k)^2 -
// (sum (g - k))^2 / n is exact algebra, and it loses nothing as long as |k - mean| is small
// against the standard deviation. k is the mean of the tensor's first 1024 elements, so an
// outlier or a mean far from zero does not matter (a shift by g[0] would). Sums run in T over
// blocks of 1024 (independent vector lanes: 4-5x the speed of one float64 chain), in float64
// across blocks; an fp32 block sum of 1024 terms is good to ~1e-6 relative.
template <typename T>
void accumulate(const T* g, int64_t begin, int64_t end, double k, Stats& out) {
  constexpr int64_t kBlock = 1024;
  const T kt = static_cast<T>(k);
  T low = g[begin], high = g[begin];
  for (int64_t b = begin; b < end; b += kBlock) {
    const int64_t e = std::min(end, b + kBlock);
    T shifted = 0, shifted_sq = 0, sum_sq = 0;
#pragma omp simd reduction(+ : shifted, shifted_sq, sum_sq) reduction(min : low) \
    reduction(max : high)
    for (int64_t j = b; j < e; ++j) {
      const T v = g[j];
      const T d = v - kt;
      shifted += d;
      shifted_sq += d * d;
      sum_sq += v * v;
      low = std::min(low, v);
      high = std::max(high, v);
    }
    out.shifted += shifted;
    out.shifted_sq += shifted_sq;
    out.sum_sq += sum_sq;
  }
  out.low = low;
  out.high = high;
}

template <typename T>
double shift_for(const T* g, int64_t n) {
  double sum = 0;
  const int64_t m = std::min<int64_t>(n, 1024);
  for (int64_t j = 0; j < m; ++j) sum += static_cast<double>(g[j]);
  return sum / static_cast<double>(m);
}

template <typename T>
Stats tensor_stats(const at::Tensor& grad, bool parallel) {
  const T* g = grad.data_ptr<T>();
  const int64_t n = grad.numel();
  Stats total;
  if (n == 0) return total;
  const double k = shift_for<T>(g, n);
  if (!parallel) {
    accumulate<T>(g, 0, n, k, total);
    return total;
  }
  const int64_t chunks = (n + kGrain - 1) / kGrain;
  std::vector<Stats> parts(chunks);
  at::parallel_for(0, chunks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t c = begin; c < end; ++c) {
      accumulate<T>(g, c * kGrain, std::min(n, (c + 1) * kGrain), k, parts[c]);
    }
  });
  total.low = parts[0].low;
  total.high = parts[0].high;
  for (const Stats& part : parts) {  // in chunk order: the same sums on any thread count
    total.shifted += part.shifted;
    total.shifted_sq += part.shifted_sq;
    total.sum_sq += part.sum_sq;
    total.low = std::min(total.low, part.low);
    total.high = std::max(total.high, part.high);
  }
  return total;
}

}  // namespace

// (n, 3) float64 per gradient: sum of squares, sum of squared deviations, 1 if all elements
// are equal. Float32 / float64 contiguous CPU tensors; accumulated in float64.
at::Tensor gsnr_stats(const std::vector<at::Tensor>& grads) {
  const int64_t n = static_cast<int64_t>(grads.size());
  at::Tensor out = at::empty({n, 3}, at::kDouble);
  double* o = out.data_ptr<double>();
  for (const auto& g : grads) {
    TORCH_CHECK(g.device().is_cpu() && g.is_contiguous() &&
                    (g.scalar_type() == at::kFloat || g.scalar_type() == at::kDouble),
                "gsnr_stats: contiguous float32 / float64 CPU gradients only");
  }
  auto store = [&](size_t i, bool parallel) {
    const Stats s = grads[i].scalar_type() == at::kDouble ? tensor_stats<double>(grads[i], parallel)
                                                           : tensor_stats<float>(grads[i], parallel);
    const double n = static_cast<double>(grads[i].numel());
    o[3 * i] = s.sum_sq;
    o[3 * i + 1] = n > 0 ? std::max(0.0, s.shifted_sq - s.shifted * s.shifted / n) : 0.0;
    o[3 * i + 2] = n > 0 && s.low == s.high ? 1.0 : 0.0;
  };
  for_each_tensor(grads, store);
  return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, module) {
  // the GIL is released: the loops touch tensors only (converted before the call)
  module.def("sgd_sai_step_", &sgd_sai_step_, "SGD-SaI update, one pass (CPU)",
             py::call_guard<py::gil_scoped_release>());
  module.def("gsnr_stats", &gsnr_stats, "what the g-SNR of each first gradient needs (CPU)",
             py::call_guard<py::gil_scoped_release>());
}
