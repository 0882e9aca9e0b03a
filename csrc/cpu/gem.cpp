// GeM forward and backward on the CPU: work split over (batch, channel block) items; the inner
// loops are the ISA kernels (float32 accumulation), or plain double loops for float64.
#include "cpu/gem.h"

#include <algorithm>
#include <cmath>
#include <stdexcept>
#include <vector>

#include "cpu/kernels.h"
#include "cpu/threads.h"

namespace plm::cpu {

namespace {

constexpr int64_t kRowsPerItem = 32;     // channels per work item, spatial axis contiguous
constexpr int64_t kColsPerItem = 256;    // channels per work item, channel axis contiguous

enum class Layout { rows, cols };

Layout layout_of(const GemArgs& a) {
  if (a.shw == 1 || a.HW == 1) return Layout::rows;
  if (a.sc == 1 || a.C == 1) return Layout::cols;
  throw std::invalid_argument(
      "x: GeM needs a contiguous spatial axis (NCHW) or channel axis (channels_last)");
}

int pick_threads(const GemArgs& a, int64_t items) {
  int t = a.threads > 0 ? a.threads : get_num_threads();
  const int64_t elems = a.B * a.C * a.HW;
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>({t, items, elems >> 16})));
}

template <class Fn>
void for_items(const GemArgs& a, int64_t per_item, Fn&& fn) {
  const int64_t cblocks = (a.C + per_item - 1) / per_item;
  const int64_t items = a.B * cblocks;
  WorkQueue work(items);
  parallel_for(pick_threads(a, items), [&](int) {
    long long it;
    while (work.next(&it)) {
      const int64_t b = it / cblocks, c0 = (it % cblocks) * per_item;
      fn(b, c0, std::min(a.C, c0 + per_item));
    }
  });
}

const unsigned char* at(const GemArgs& a, const void* base, int64_t b, int64_t c) {
  return static_cast<const unsigned char*>(base) + (b * a.sb + c * a.sc) * dtype_size(a.dtype);
}

// gy * dy/dp for y = m^(1/p), m = mean(xc^p), from the ratio-form sum
// s = sum xc^p/y^p ln(xc/y):  dy/dp = y s / (p HW).
double dy_dp_times_grad(double gy, double y, double s, const GemArgs& a) {
  return gy * y * s / (a.p * static_cast<double>(a.HW));
}

// Below this the float32 sum of xc^p may hold terms that underflowed into subnormals.
constexpr double kMinPlainSum = 0x1p-80;

// y = M (mean (xc/M)^p)^(1/p) with M = max xc: the scaled form never under- or overflows. The
// fast kernels use the plain form and fall back to this where their sum was tiny or infinite
// (large p with values near eps, or huge activations).

double gem_scaled(const float* xc_values, int64_t stride, int64_t n, double p, double eps) {
  double m = eps;
  for (int64_t i = 0; i < n; ++i) m = std::max(m, static_cast<double>(xc_values[i * stride]));
  if (std::isinf(m)) return m;  // a value of +inf: its power, and so the mean, is +inf (inf / inf is NaN)
  double sum = 0.0;
  for (int64_t i = 0; i < n; ++i)
    sum += std::pow(std::max(static_cast<double>(xc_values[i * stride]), eps) / m, p);
  return m * std::pow(sum / static_cast<double>(n), 1.0 / p);
}

void forward_f64(const GemArgs& a, double* y) {
  const double* x = static_cast<const double*>(a.x);
  for_items(a, kRowsPerItem, [&](int64_t b, int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      double sum = 0.0;
      for (int64_t s = 0; s < a.HW; ++s)
        sum += std::pow(std::max(x[b * a.sb + c * a.sc + s * a.shw], a.eps), a.p);
      y[b * a.C + c] = std::pow(sum / static_cast<double>(a.HW), 1.0 / a.p);
    }
  });
}

double backward_f64(const GemArgs& a, const double* gy, const double* y, double* dx, bool want_dp) {
  const double* x = static_cast<const double*>(a.x);
  std::vector<double> terms(a.B * a.C, 0.0);
  for_items(a, kRowsPerItem, [&](int64_t b, int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      const int64_t bc = b * a.C + c;
      const double coef = gy[bc] / static_cast<double>(a.HW);
      double s = 0.0;
      for (int64_t hw = 0; hw < a.HW; ++hw) {
        const int64_t off = b * a.sb + c * a.sc + hw * a.shw;
        const double ratio = std::max(x[off], a.eps) / y[bc];
        const double t = std::pow(ratio, a.p - 1.0);
        dx[off] = x[off] >= a.eps ? coef * t : 0.0;
        if (want_dp) s += t * ratio * std::log(ratio);
      }
      if (want_dp) terms[bc] = dy_dp_times_grad(gy[bc], y[bc], s, a);
    }
  });
  double dp = 0.0;
  for (double t : terms) dp += t;
  return dp;
}

}  // namespace

void gem_forward(const GemArgs& a, void* y) {
  if (a.B * a.C == 0) return;
  if (a.dtype == DType::f64) return forward_f64(a, static_cast<double*>(y));
  const KernelTable& K = active_kernels();
  const float p = static_cast<float>(a.p), eps = static_cast<float>(a.eps);
  float* yf = static_cast<float*>(y);
  const bool rows = layout_of(a) == Layout::rows;
  for_items(a, rows ? kRowsPerItem : kColsPerItem, [&](int64_t b, int64_t c0, int64_t c1) {
    float* out = yf + b * a.C + c0;
    if (rows) {
      K.gem_fwd_rows(at(a, a.x, b, c0), a.dtype, c1 - c0, a.sc, a.HW, p, eps, out);
    } else {
      float acc[kColsPerItem] = {};
      K.gem_fwd_cols(at(a, a.x, b, c0), a.dtype, c1 - c0, a.HW, a.shw, p, eps, acc);
      for (int64_t c = c0; c < c1; ++c) out[c - c0] = std::pow(acc[c - c0] / static_cast<float>(a.HW), 1.0f / p);
    }
    std::vector<float> values;
    for (int64_t c = c0; c < c1; ++c) {
      const double y = out[c - c0];
      if (y > 0.0 && std::isfinite(y) && std::pow(y, a.p) * static_cast<double>(a.HW) >= kMinPlainSum) continue;
      // rare: the float32 sum under- or overflowed (or fell where underflowed terms lost their
      // precision); redo this channel in the scaled form
      values.resize(a.HW * kPad);
      const int64_t elem_stride = rows ? 1 : a.shw;
      K.pack_rows(at(a, a.x, b, c), a.dtype, elem_stride, a.HW, 1, kPad, values.data(), nullptr);
      out[c - c0] = static_cast<float>(gem_scaled(values.data(), kPad, a.HW, a.p, a.eps));
    }
  });
}

double gem_backward(const GemArgs& a, const void* gy, const void* y, void* dx, bool want_dp) {
  if (a.B * a.C == 0) return 0.0;
  if (a.dtype == DType::f64)
    return backward_f64(a, static_cast<const double*>(gy), static_cast<const double*>(y),
                        static_cast<double*>(dx), want_dp);
  const KernelTable& K = active_kernels();
  const float p = static_cast<float>(a.p), eps = static_cast<float>(a.eps);
  const float* gyf = static_cast<const float*>(gy);
  const float* yf = static_cast<const float*>(y);
  const int64_t BC = a.B * a.C;
  std::vector<float> coef(BC), inv_y(BC), log_y(BC), s(want_dp ? BC : 0, 0.0f);
  for (int64_t i = 0; i < BC; ++i) {
    coef[i] = gyf[i] / static_cast<float>(a.HW);
    inv_y[i] = 1.0f / yf[i];
    log_y[i] = std::log(yf[i]);
  }
  float* sp = want_dp ? s.data() : nullptr;
  if (layout_of(a) == Layout::rows) {
    for_items(a, kRowsPerItem, [&](int64_t b, int64_t c0, int64_t c1) {
      const int64_t bc = b * a.C + c0;
      K.gem_bwd_rows(at(a, a.x, b, c0), a.dtype, c1 - c0, a.sc, a.HW, p, eps, coef.data() + bc,
                     inv_y.data() + bc, log_y.data() + bc, const_cast<unsigned char*>(at(a, dx, b, c0)), sp ? sp + bc : nullptr);
    });
  } else {
    for_items(a, kColsPerItem, [&](int64_t b, int64_t c0, int64_t c1) {
      const int64_t bc = b * a.C + c0;
      K.gem_bwd_cols(at(a, a.x, b, c0), a.dtype, c1 - c0, a.HW, a.shw, p, eps, coef.data() + bc,
                     inv_y.data() + bc, log_y.data() + bc, const_cast<unsigned char*>(at(a, dx, b, c0)), sp ? sp + bc : nullptr);
    });
  }
  if (!want_dp) return 0.0;
  double dp = 0.0;
  for (int64_t i = 0; i < BC; ++i) dp += dy_dp_times_grad(gyf[i], yf[i], s[i], a);
  return dp;
}

}  // namespace plm::cpu
