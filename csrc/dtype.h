// Element types and devices shared by the bindings and the kernels (no Python headers here).
#pragma once
#include <cstddef>
#include <cstdint>

namespace plm {

enum class DType : int { f32 = 0, f16 = 1, bf16 = 2, f64 = 3, i64 = 4, u8 = 5 };
enum class Device : int { cpu = 1, cuda = 2 };

inline std::size_t dtype_size(DType t) {
  switch (t) {
    case DType::f32: return 4;
    case DType::f16: return 2;
    case DType::bf16: return 2;
    case DType::f64: return 8;
    case DType::i64: return 8;
    case DType::u8: return 1;
  }
  return 0;
}

inline const char* dtype_name(DType t) {
  switch (t) {
    case DType::f32: return "float32";
    case DType::f16: return "float16";
    case DType::bf16: return "bfloat16";
    case DType::f64: return "float64";
    case DType::i64: return "int64";
    case DType::u8: return "uint8";
  }
  return "?";
}

}  // namespace plm
