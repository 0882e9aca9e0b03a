// float <-> float32/float16/bfloat16 element conversions shared by the GPU kernels (and the host
// emulator, which compiles them with g++).
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <cstring>

namespace plm::cuda {

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
