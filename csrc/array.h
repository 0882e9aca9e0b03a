// ArrayView: a non-owning view of a numpy / torch / cupy / DLPack array.
//
// Python (pylandmark/_array.py) reads the pointer, dtype, shape, strides and device of whatever
// framework object it was given and passes them here as one tuple, so this extension never links
// a framework. The caller keeps the object alive for the duration of the call.
#pragma once
#include <pybind11/pybind11.h>

#include <cstdint>
#include <string>

#include "dtype.h"

namespace plm {

struct ArrayView {
  static constexpr int kMaxDims = 4;
  void* data = nullptr;
  DType dtype = DType::f32;
  int ndim = 0;
  int64_t shape[kMaxDims] = {0, 0, 0, 0};
  int64_t strides[kMaxDims] = {0, 0, 0, 0};  // in elements, not bytes
  Device device = Device::cpu;
  int device_id = 0;
  bool readonly = false;
  std::string name;  // the Python argument this view came from, for error messages

  int64_t numel() const;
  bool contiguous() const;  // C order
  std::string describe() const;
};

// spec = (ptr, dtype_name, shape, strides_in_elements, device_type, device_id, readonly)
ArrayView view_from_spec(const pybind11::tuple& spec, const char* name);

// Checks that raise ValueError/TypeError naming the argument.
void require_ndim(const ArrayView& a, int ndim);
void require_dtype_float(const ArrayView& a);               // f16, bf16, f32
void require_dtype(const ArrayView& a, DType t);
void require_writable(const ArrayView& a);
void require_contiguous(const ArrayView& a);
void require_unit_last_stride(const ArrayView& a);           // rows may be strided, elements not
void require_same_device(const ArrayView& a, const ArrayView& b);

}  // namespace plm
