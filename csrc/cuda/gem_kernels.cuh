// Fused GeM kernels. Included by gem.cu, and by the host emulator tests (tests/cuda_emu) with
// PLM_CUDA_EMULATE, so nothing here may use the CUDA runtime API.
//
// Rows layout (NCHW): one warp per (b, c) row, lanes striding the contiguous spatial axis with
// several loads in flight. Columns layout (channels_last): a block covers 32 channels of one
// image, 8 groups of 32 threads stride the spatial positions and reduce in shared memory.
// Accumulation is float32; p comes from device memory; p == 3 takes a multiply-only path.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <cstdint>
#include <stdexcept>
#include <type_traits>

#include "cuda/convert.cuh"
#include "dtype.h"

namespace plm::cuda::gem_kernels {

constexpr int kThreads = 256;
constexpr int kRowWarpsPerBlock = kThreads / 32;
constexpr int kColChannels = 32;                     // columns blocks: thread t takes channel t % 32
constexpr int kColRows = kThreads / kColChannels;    // and spatial positions t / 32, t / 32 + 8, ...
constexpr int64_t kMaxGridY = 65535;

__device__ __forceinline__ float pow_p(float x, float p, bool cube) {
  return cube ? x * x * x : exp2f(p * log2f(x));
}

// (xc/y)^(p-1) for the backward pass (ratio form: no power of y alone can overflow).
__device__ __forceinline__ float ratio_pm1(float r, float p, bool cube) {
  return cube ? r * r : exp2f((p - 1.0f) * log2f(r));
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
  return v;
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, off));
  return v;
}

// The plain sum of xc^p under- or overflowed (large p with values near eps, or huge values):
// y = M (mean (xc/M)^p)^(1/p) with M = max xc cannot.
__device__ __forceinline__ bool needs_scaling(float sum) {
  // Below 2^-80 the sum may hold terms that underflowed into subnormals (values near eps with a
  // large p) and lost their precision; above FLT_MAX it overflowed.
  return !(sum >= 0x1p-80f && sum <= 3.402823466e38f);
}

// M (mean (xc/M)^p)^(1/p) from M and the sum of (xc/M)^p; +inf when M is (inf / inf is NaN).
__device__ __forceinline__ float scaled_gem(float m, float scaled_sum, int64_t HW, float p) {
  if (m > 3.402823466e38f) return m;
  return m * powf(scaled_sum / static_cast<float>(HW), 1.0f / p);
}

template <class T>
__global__ void __launch_bounds__(kThreads) gem_fwd_rows(const T* __restrict__ x, int64_t B, int64_t C, int64_t HW, int64_t sb,
                             int64_t sc, const float* __restrict__ p_ptr, float eps,
                             float* __restrict__ y) {
  const int64_t row = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) / 32;
  const int lane = threadIdx.x % 32;
  if (row >= B * C) return;
  const float p = *p_ptr;
  const bool cube = p == 3.0f;
  const T* base = x + (row / C) * sb + (row % C) * sc;
  float acc = 0.0f;
  int64_t i = lane;
  for (; i + 96 < HW; i += 128) {  // four independent loads in flight per lane
    float a = load_f(base + i), b = load_f(base + i + 32), c = load_f(base + i + 64), d = load_f(base + i + 96);
    acc += pow_p(fmaxf(a, eps), p, cube) + pow_p(fmaxf(b, eps), p, cube) +
           pow_p(fmaxf(c, eps), p, cube) + pow_p(fmaxf(d, eps), p, cube);
  }
  for (; i < HW; i += 32) acc += pow_p(fmaxf(load_f(base + i), eps), p, cube);
  acc = warp_sum(acc);
  if (needs_scaling(acc)) {  // warp-uniform: every lane holds the same sum
    float m = eps;
    for (int64_t j = lane; j < HW; j += 32) m = fmaxf(m, load_f(base + j));
    m = warp_max(m);
    float scaled = 0.0f;
    for (int64_t j = lane; j < HW; j += 32) scaled += powf(fmaxf(load_f(base + j), eps) / m, p);
    scaled = warp_sum(scaled);
    if (lane == 0) y[row] = scaled_gem(m, scaled, HW, p);
    return;
  }
  if (lane == 0) y[row] = powf(acc / static_cast<float>(HW), 1.0f / p);
}

__device__ __forceinline__ int col_channel() { return threadIdx.x % kColChannels; }
__device__ __forceinline__ int col_row() { return threadIdx.x / kColChannels; }

// Sums v over the kColRows thread rows of a columns-layout block (shared memory); every thread
// must call it. The result is meaningful in thread row 0.
__device__ __forceinline__ float column_sum(float (*part)[kColChannels + 1], float v) {
  part[col_row()][col_channel()] = v;
  __syncthreads();
  float sum = 0.0f;
  if (col_row() == 0) {
#pragma unroll
    for (int r = 0; r < kColRows; ++r) sum += part[r][col_channel()];
  }
  return sum;
}

template <class T>
__global__ void __launch_bounds__(kThreads) gem_fwd_cols(const T* __restrict__ x, int64_t b0, int64_t C, int64_t HW, int64_t sb,
                             int64_t shw, const float* __restrict__ p_ptr, float eps,
                             float* __restrict__ y) {
  __shared__ float part[kColRows][kColChannels + 1];
  const int64_t b = b0 + blockIdx.y;
  const int64_t c = static_cast<int64_t>(blockIdx.x) * kColChannels + col_channel();
  const float p = *p_ptr;
  const bool cube = p == 3.0f;
  float acc = 0.0f;
  if (c < C) {
    const T* base = x + b * sb + c;
    for (int64_t s = col_row(); s < HW; s += kColRows) acc += pow_p(fmaxf(load_f(base + s * shw), eps), p, cube);
  }
  const float sum = column_sum(part, acc);
  if (col_row() == 0 && c < C) {
    if (needs_scaling(sum)) {  // rare: one thread redoes this channel in the scaled form
      const T* base = x + b * sb + c;
      float m = eps;
      for (int64_t s = 0; s < HW; ++s) m = fmaxf(m, load_f(base + s * shw));
      float scaled = 0.0f;
      for (int64_t s = 0; s < HW; ++s) scaled += powf(fmaxf(load_f(base + s * shw), eps) / m, p);
      y[b * C + c] = scaled_gem(m, scaled, HW, p);
    } else {
      y[b * C + c] = powf(sum / static_cast<float>(HW), 1.0f / p);
    }
  }
}

// Ratio form: dx = gy / HW * (xc/y)^(p-1) * [x >= eps];
// terms = gy * y * sum (xc/y)^p ln(xc/y) / (p HW), whose sum over (b, c) is dL/dp.
__device__ __forceinline__ float dp_term(float gy, float y, float s, float p, int64_t HW) {
  return gy * y * s / (p * static_cast<float>(HW));
}

template <class T>
__global__ void __launch_bounds__(kThreads) gem_bwd_rows(const T* __restrict__ x, int64_t B, int64_t C, int64_t HW, int64_t sb,
                             int64_t sc, const float* __restrict__ p_ptr, float eps,
                             const float* __restrict__ gy, const float* __restrict__ y,
                             T* __restrict__ dx, float* __restrict__ terms) {
  const int64_t row = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) / 32;
  const int lane = threadIdx.x % 32;
  if (row >= B * C) return;
  const float p = *p_ptr;
  const bool cube = p == 3.0f;
  const float yv = y[row], g = gy[row];
  const float coef = g / static_cast<float>(HW), inv_y = 1.0f / yv;
  const int64_t off = (row / C) * sb + (row % C) * sc;
  const T* xb = x + off;
  T* db = dx + off;
  float s = 0.0f;
  for (int64_t i = lane; i < HW; i += 32) {
    const float xv = load_f(xb + i);
    const float r = fmaxf(xv, eps) * inv_y;
    const float t = ratio_pm1(r, p, cube);
    store_f(db + i, xv >= eps ? coef * t : 0.0f);
    if (terms) s += t * r * logf(r);
  }
  if (terms) {
    s = warp_sum(s);
    if (lane == 0) terms[row] = dp_term(g, yv, s, p, HW);
  }
}

template <class T>
__global__ void __launch_bounds__(kThreads) gem_bwd_cols(const T* __restrict__ x, int64_t b0, int64_t C, int64_t HW, int64_t sb,
                             int64_t shw, const float* __restrict__ p_ptr, float eps,
                             const float* __restrict__ gy, const float* __restrict__ y,
                             T* __restrict__ dx, float* __restrict__ terms) {
  __shared__ float part[kColRows][kColChannels + 1];
  const int64_t b = b0 + blockIdx.y;
  const int64_t c = static_cast<int64_t>(blockIdx.x) * kColChannels + col_channel();
  const float p = *p_ptr;
  const bool cube = p == 3.0f;
  float s = 0.0f, yv = 1.0f, g = 0.0f;
  if (c < C) {
    yv = y[b * C + c];
    g = gy[b * C + c];
    const float coef = g / static_cast<float>(HW), inv_y = 1.0f / yv;
    const int64_t off = b * sb + c;
    for (int64_t sp = col_row(); sp < HW; sp += kColRows) {
      const float xv = load_f(x + off + sp * shw);
      const float r = fmaxf(xv, eps) * inv_y;
      const float t = ratio_pm1(r, p, cube);
      store_f(dx + off + sp * shw, xv >= eps ? coef * t : 0.0f);
      if (terms) s += t * r * logf(r);
    }
  }
  if (!terms) return;
  const float sum = column_sum(part, s);
  if (col_row() == 0 && c < C) terms[b * C + c] = dp_term(g, yv, sum, p, HW);
}

// x: (B, C, HW) with element strides (sb, sc, shw); p is a device pointer.
struct GemShape {
  const void* x;
  DType dtype;
  int64_t B, C, HW;
  int64_t sb, sc, shw;
  const float* p;
  float eps;
};

inline bool rows_layout(const GemShape& a) {
  if (a.shw == 1 || a.HW == 1) return true;
  if (a.sc == 1 || a.C == 1) return false;
  throw std::invalid_argument("x: GeM needs a contiguous spatial axis (NCHW) or channel axis (channels_last)");
}

inline unsigned rows_grid(int64_t rows) {
  const int64_t blocks = (rows + kRowWarpsPerBlock - 1) / kRowWarpsPerBlock;
  if (blocks > 0x7fffffff) throw std::invalid_argument("x: too many (batch, channel) rows for one launch");
  return static_cast<unsigned>(blocks);
}

// Launches the rows or the columns variant of a GeM kernel for x's layout; `tail` are the
// kernel arguments after (p, eps). launch(kernel, grid_x, grid_y, smem, args...) runs kThreads
// threads per block.
template <class T, class Launcher, class RowsKernel, class ColsKernel, class... Tail>
void launch_layout(const GemShape& a, Launcher&& launch, RowsKernel rows_kernel, ColsKernel cols_kernel,
                   Tail... tail) {
  const T* x = static_cast<const T*>(a.x);
  if (rows_layout(a)) {
    launch(rows_kernel, rows_grid(a.B * a.C), 1u, size_t{0}, x, a.B, a.C, a.HW, a.sb, a.sc, a.p, a.eps, tail...);
    return;
  }
  for (int64_t b0 = 0; b0 < a.B; b0 += kMaxGridY) {  // grid.y is limited to 65535 images
    launch(cols_kernel, static_cast<unsigned>((a.C + kColChannels - 1) / kColChannels),
           static_cast<unsigned>(std::min(kMaxGridY, a.B - b0)), size_t{0}, x, b0, a.C, a.HW, a.sb, a.shw,
           a.p, a.eps, tail...);
  }
}

// y: B*C float32.
template <class Launcher>
void run_forward(const GemShape& a, float* y, Launcher&& launch) {
  if (a.B * a.C == 0) return;
  with_float_type(a.dtype, "x: GeM on the GPU", [&](auto tag) {
    using T = typename decltype(tag)::type;
    launch_layout<T>(a, launch, &gem_fwd_rows<T>, &gem_fwd_cols<T>, y);
  });
}

// gy, y: B*C float32; dx: x's dtype and strides; terms: optional B*C float32 (dL/dp terms).
template <class Launcher>
void run_backward(const GemShape& a, const float* gy, const float* y, void* dx, float* terms, Launcher&& launch) {
  if (a.B * a.C == 0) return;
  with_float_type(a.dtype, "x: GeM on the GPU", [&](auto tag) {
    using T = typename decltype(tag)::type;
    launch_layout<T>(a, launch, &gem_bwd_rows<T>, &gem_bwd_cols<T>, gy, y, static_cast<T*>(dx), terms);
  });
}

}  // namespace plm::cuda::gem_kernels
