#include "array.h"

#include <sstream>
#include <stdexcept>

namespace py = pybind11;

namespace plm {

namespace {

DType parse_dtype(const std::string& s, const char* name) {
  if (s == "float32") return DType::f32;
  if (s == "float16") return DType::f16;
  if (s == "bfloat16") return DType::bf16;
  if (s == "float64") return DType::f64;
  if (s == "int64") return DType::i64;
  if (s == "uint8") return DType::u8;
  throw py::type_error(std::string(name) + ": unsupported dtype " + s +
                       "; use float16, bfloat16 or float32");
}

}  // namespace

int64_t ArrayView::numel() const {
  int64_t n = 1;
  for (int i = 0; i < ndim; ++i) n *= shape[i];
  return n;
}

bool ArrayView::contiguous() const {
  if (numel() == 0) return true;
  int64_t expected = 1;
  for (int i = ndim - 1; i >= 0; --i) {
    if (shape[i] != 1 && strides[i] != expected) return false;
    expected *= shape[i];
  }
  return true;
}

std::string ArrayView::describe() const {
  std::ostringstream os;
  os << "(";
  for (int i = 0; i < ndim; ++i) os << (i ? ", " : "") << shape[i];
  if (ndim == 1) os << ",";
  os << ") " << dtype_name(dtype) << " on " << (device == Device::cpu ? "cpu" : "cuda:")
     << (device == Device::cpu ? std::string() : std::to_string(device_id));
  return os.str();
}

ArrayView view_from_spec(const py::tuple& spec, const char* name) {
  if (spec.size() != 7) throw py::type_error(std::string(name) + ": malformed array spec");
  ArrayView v;
  v.name = name;
  v.data = reinterpret_cast<void*>(spec[0].cast<uintptr_t>());
  v.dtype = parse_dtype(spec[1].cast<std::string>(), name);
  auto shape = spec[2].cast<py::tuple>();
  auto strides = spec[3].cast<py::tuple>();
  if (shape.size() > static_cast<size_t>(ArrayView::kMaxDims) || shape.size() != strides.size())
    throw py::value_error(std::string(name) + ": arrays of at most 4 dimensions are supported");
  v.ndim = static_cast<int>(shape.size());
  for (int i = 0; i < v.ndim; ++i) {
    v.shape[i] = shape[i].cast<int64_t>();
    v.strides[i] = strides[i].cast<int64_t>();
    if (v.shape[i] < 0) throw py::value_error(std::string(name) + ": negative dimension");
  }
  int dev = spec[4].cast<int>();
  if (dev != static_cast<int>(Device::cpu) && dev != static_cast<int>(Device::cuda))
    throw py::value_error(std::string(name) + ": unsupported device type " + std::to_string(dev));
  v.device = static_cast<Device>(dev);
  v.device_id = spec[5].cast<int>();
  v.readonly = spec[6].cast<bool>();
  if (v.data == nullptr && v.numel() > 0)
    throw py::value_error(std::string(name) + ": null data pointer");
  return v;
}

void require_ndim(const ArrayView& a, int ndim) {
  if (a.ndim != ndim)
    throw py::value_error(a.name + " must be " + std::to_string(ndim) + "-d, got " + a.describe());
}

void require_dtype_float(const ArrayView& a) {
  if (a.dtype != DType::f32 && a.dtype != DType::f16 && a.dtype != DType::bf16)
    throw py::type_error(a.name + ": dtype " + dtype_name(a.dtype) +
                         " is not supported; use float16, bfloat16 or float32");
}

void require_dtype(const ArrayView& a, DType t) {
  if (a.dtype != t)
    throw py::type_error(a.name + " must be " + dtype_name(t) + ", got " + dtype_name(a.dtype));
}

void require_writable(const ArrayView& a) {
  if (a.readonly) throw py::value_error(a.name + " is read-only; pass a writable array");
}

void require_contiguous(const ArrayView& a) {
  if (!a.contiguous())
    throw py::value_error(a.name + " must be C-contiguous, got strides that are not; " +
                          "make a contiguous copy first");
}

void require_unit_last_stride(const ArrayView& a) {
  if (a.numel() > 0 && a.shape[a.ndim - 1] > 1 && a.strides[a.ndim - 1] != 1)
    throw py::value_error(a.name + ": the last dimension must be contiguous (stride 1); " +
                          "make a contiguous copy first");
}

void require_same_device(const ArrayView& a, const ArrayView& b) {
  if (a.device != b.device || a.device_id != b.device_id)
    throw py::value_error(a.name + " is on " + a.describe() + " but " + b.name + " is on " +
                          b.describe() + "; move both to the same device");
}

}  // namespace plm
