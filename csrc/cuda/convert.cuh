// float <-> float32/float16/bfloat16 element conversions shared by the GPU kernels (and the host
// emulator, which compiles them with g++).
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <string>

#include "dtype.h"

namespace plm::cuda {

template <class T>
struct TypeTag {
  using type = T;
};

// Calls f(TypeTag<float | __half | __nv_bfloat16>) for t; any other type is an error that
// starts with `what` (e.g. "x: GeM on the GPU").
template <class F>
void with_float_type(DType t, const char* what, F&& f) {
  switch (t) {
    case DType::f32: return f(TypeTag<float>{});
    case DType::f16: return f(TypeTag<__half>{});
    case DType::bf16: return f(TypeTag<__nv_bfloat16>{});
    default: throw std::invalid_argument(std::string(what) + " takes float16, bfloat16 or float32");
  }
}

template <class T>
__device__ __forceinline__ float to_float(T v);
template <>
__device__ __forceinline__ float to_float<float>(float v) { return v; }
template <>
__device__ __forceinline__ float to_float<__half>(__half v) { return __half2float(v); }
template <>
__device__ __forceinline__ float to_float<__nv_bfloat16>(__nv_bfloat16 v) { return __bfloat162float(v); }

// Round to nearest even.
template <class T>
__device__ __forceinline__ T from_float(float v);
template <>
__device__ __forceinline__ float from_float<float>(float v) { return v; }
template <>
__device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

// A 16-bit pattern as a half or bfloat16 value.
template <class T>
__device__ __forceinline__ T bits_to(uint16_t bits) {
  static_assert(sizeof(T) == 2, "16-bit types only");
  T v;
  memcpy(&v, &bits, 2);
  return v;
}

// Sum of squares of the eight 16-bit values packed in w, added to acc in order.
template <class T>
__device__ __forceinline__ void add_squares8(float& acc, uint4 w) {
  const uint32_t words[4] = {w.x, w.y, w.z, w.w};
#pragma unroll
  for (int e = 0; e < 4; ++e) {
    const float lo = to_float<T>(bits_to<T>(static_cast<uint16_t>(words[e] & 0xffffu)));
    const float hi = to_float<T>(bits_to<T>(static_cast<uint16_t>(words[e] >> 16)));
    acc += lo * lo;
    acc += hi * hi;
  }
}

// Read-only load through the non-coherent cache, as float.
template <class T>
__device__ __forceinline__ float load_f(const T* p) {
  return to_float<T>(__ldg(p));
}

template <class T>
__device__ __forceinline__ void store_f(T* p, float v) {
  *p = from_float<T>(v);
}

}  // namespace plm::cuda
