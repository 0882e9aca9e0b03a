// pybind11 bindings only: argument conversion, shape checks, GIL release, error translation.
// pylandmark/ops.py allocates outputs and prepares the array specs (see array.h).
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <stdexcept>
#include <string>

#include "array.h"
#include "cpu/codes.h"
#include "cpu/gem.h"
#include "cpu/kernels.h"
#include "cpu/search.h"
#include "cpu/threads.h"
#if defined(PLM_WITH_CUDA)
#include "cuda/gem.h"
#include "cuda/runtime.h"
#include "cuda/search.h"
#endif

namespace py = pybind11;
using plm::ArrayView;
using plm::DType;

namespace {

void require_cpu(const ArrayView& a) {
  if (a.device != plm::Device::cpu)
    throw py::value_error(a.name + " is on a CUDA device; this entry point takes CPU arrays");
}

// The checks every search makes on its inputs, CPU or GPU.
void check_search_inputs(const ArrayView& q, const ArrayView& db, int64_t k) {
  plm::require_ndim(q, 2);
  plm::require_ndim(db, 2);
  plm::require_dtype_float(q);
  plm::require_dtype_float(db);
  plm::require_unit_last_stride(q);
  plm::require_unit_last_stride(db);
  plm::require_same_device(q, db);
  if (q.shape[1] != db.shape[1])
    throw py::value_error("queries have D=" + std::to_string(q.shape[1]) + " but db has D=" +
                          std::to_string(db.shape[1]) + "; both must describe vectors of the same length");
  if (db.shape[0] < 1) throw py::value_error("db is empty (N=0); add descriptors before searching");
  if (q.shape[1] < 1) throw py::value_error("queries: D must be at least 1");
  if (k < 1) throw py::value_error("k must be >= 1, got " + std::to_string(k));
}

// The input checks, and outputs that must be (Q, k) float32 / int64 beside the queries.
void check_search(const ArrayView& q, const ArrayView& db, const ArrayView& scores, const ArrayView& idx,
                  int64_t k) {
  check_search_inputs(q, db, k);
  plm::require_dtype(scores, DType::f32);
  plm::require_dtype(idx, DType::i64);
  for (const ArrayView* out : {&scores, &idx}) {
    plm::require_ndim(*out, 2);
    plm::require_contiguous(*out);
    plm::require_writable(*out);
    plm::require_same_device(*out, q);
    if (out->shape[0] != q.shape[0] || out->shape[1] != k)
      throw py::value_error(out->name + " must have shape (Q, k)");
  }
}

plm::SearchInputs search_inputs(const ArrayView& q, const ArrayView& db, int64_t k, bool cosine) {
  return {q.data,     q.dtype,    q.strides[0], db.data, db.dtype, db.strides[0],
          q.shape[0], db.shape[0], db.shape[1], k,       cosine};
}

void search(const py::tuple& q_spec, const py::tuple& db_spec, const py::tuple& scores_spec,
            const py::tuple& idx_spec, int64_t k, bool cosine) {
  ArrayView q = plm::view_from_spec(q_spec, "queries");
  ArrayView db = plm::view_from_spec(db_spec, "db");
  ArrayView scores = plm::view_from_spec(scores_spec, "scores");
  ArrayView idx = plm::view_from_spec(idx_spec, "indices");
  require_cpu(q);
  check_search(q, db, scores, idx, k);
  plm::cpu::SearchArgs args{search_inputs(q, db, k, cosine), static_cast<float*>(scores.data),
                            static_cast<int64_t*>(idx.data), 0};
  py::gil_scoped_release nogil;
  plm::cpu::search(args);
}

// codes: (blocks, 16 * Dc) uint8 and meta: (blocks, 3, 16) float32, C-contiguous CPU arrays for
// rows 0 .. rows-1 of a db of D columns.
void check_codes(const ArrayView& codes, const ArrayView& meta, int64_t rows, int64_t D, bool write) {
  require_cpu(codes);
  require_cpu(meta);
  plm::require_dtype(codes, DType::u8);
  plm::require_dtype(meta, DType::f32);
  plm::require_contiguous(codes);
  plm::require_contiguous(meta);
  if (write) {
    plm::require_writable(codes);
    plm::require_writable(meta);
  }
  plm::require_ndim(codes, 2);
  plm::require_ndim(meta, 3);
  const int64_t blocks = plm::cpu::code_blocks(rows);
  if (codes.shape[0] < blocks || codes.shape[1] != plm::cpu::kCodeBlock * plm::cpu::code_dim(D))
    throw py::value_error("codes must have shape (" + std::to_string(blocks) + ", " +
                          std::to_string(plm::cpu::kCodeBlock * plm::cpu::code_dim(D)) + ") for " +
                          std::to_string(rows) + " rows of D=" + std::to_string(D) + ", got " + codes.describe());
  if (meta.shape[0] != codes.shape[0] || meta.shape[1] != plm::cpu::kCodeFields || meta.shape[2] != plm::cpu::kCodeBlock)
    throw py::value_error("code metadata must have shape (" + std::to_string(codes.shape[0]) + ", 3, 16), got " +
                          meta.describe());
}

void build_codes(const py::tuple& db_spec, const py::tuple& codes_spec, const py::tuple& meta_spec,
                 int64_t row0, bool cosine) {
  ArrayView db = plm::view_from_spec(db_spec, "db");
  ArrayView codes = plm::view_from_spec(codes_spec, "codes");
  ArrayView meta = plm::view_from_spec(meta_spec, "meta");
  require_cpu(db);
  plm::require_ndim(db, 2);
  plm::require_dtype_float(db);
  plm::require_unit_last_stride(db);
  if (row0 < 0) throw py::value_error("row0 must be >= 0");
  check_codes(codes, meta, row0 + db.shape[0], db.shape[1], true);
  py::gil_scoped_release nogil;
  plm::cpu::build_codes(db.data, db.dtype, db.strides[0], db.shape[0], db.shape[1], row0, cosine,
                        static_cast<uint8_t*>(codes.data), static_cast<float*>(meta.data), 0);
}

py::tuple search_codes(const py::tuple& q_spec, const py::tuple& db_spec, const py::tuple& codes_spec,
                       const py::tuple& meta_spec, const py::tuple& scores_spec, const py::tuple& idx_spec,
                       int64_t k, bool cosine) {
  ArrayView q = plm::view_from_spec(q_spec, "queries");
  ArrayView db = plm::view_from_spec(db_spec, "db");
  ArrayView codes = plm::view_from_spec(codes_spec, "codes");
  ArrayView meta = plm::view_from_spec(meta_spec, "meta");
  ArrayView scores = plm::view_from_spec(scores_spec, "scores");
  ArrayView idx = plm::view_from_spec(idx_spec, "indices");
  require_cpu(q);
  check_search(q, db, scores, idx, k);
  check_codes(codes, meta, db.shape[0], db.shape[1], false);
  if (codes.shape[0] != plm::cpu::code_blocks(db.shape[0]))
    throw py::value_error("codes describe " + std::to_string(codes.shape[0] * plm::cpu::kCodeBlock) +
                          " rows, the db has " + std::to_string(db.shape[0]));
  plm::cpu::SearchArgs args{search_inputs(q, db, k, cosine), static_cast<float*>(scores.data),
                            static_cast<int64_t*>(idx.data), 0};
  plm::cpu::CodeSearchStats stats;
  {
    py::gil_scoped_release nogil;
    plm::cpu::search_codes(args, static_cast<const uint8_t*>(codes.data), static_cast<const float*>(meta.data),
                           &stats);
  }
  return py::make_tuple(stats.rescored, stats.fallback_queries);
}

void code_bounds(const py::tuple& q_spec, const py::tuple& db_spec, const py::tuple& codes_spec,
                 const py::tuple& meta_spec, const py::tuple& lower_spec, const py::tuple& upper_spec, bool cosine) {
  ArrayView q = plm::view_from_spec(q_spec, "queries");
  ArrayView db = plm::view_from_spec(db_spec, "db");
  ArrayView codes = plm::view_from_spec(codes_spec, "codes");
  ArrayView meta = plm::view_from_spec(meta_spec, "meta");
  ArrayView lower = plm::view_from_spec(lower_spec, "lower");
  ArrayView upper = plm::view_from_spec(upper_spec, "upper");
  require_cpu(q);
  check_search_inputs(q, db, 1);
  check_codes(codes, meta, db.shape[0], db.shape[1], false);
  for (const ArrayView* out : {&lower, &upper}) {
    plm::require_dtype(*out, DType::f32);
    plm::require_contiguous(*out);
    plm::require_writable(*out);
    if (out->ndim != 2 || out->shape[0] != q.shape[0] || out->shape[1] != db.shape[0])
      throw py::value_error(out->name + " must have shape (Q, N)");
  }
  plm::cpu::SearchArgs args{search_inputs(q, db, 1, cosine), nullptr, nullptr, 0};
  py::gil_scoped_release nogil;
  plm::cpu::code_bounds(args, static_cast<const uint8_t*>(codes.data), static_cast<const float*>(meta.data),
                        static_cast<float*>(lower.data), static_cast<float*>(upper.data));
}

// The codes of N rows of D (build_codes) in the GPU scan's layout, with
// Dg = D rounded up to 16, out_codes (N, Dg) uint8 holding the int8 codes' bits, out_meta (3, N)
// float32 (cpu::device_codes).
void device_codes(const py::tuple& codes_spec, const py::tuple& meta_spec, int64_t N, int64_t D, bool cosine,
                  const py::tuple& out_codes_spec, const py::tuple& out_meta_spec) {
  ArrayView codes = plm::view_from_spec(codes_spec, "codes");
  ArrayView meta = plm::view_from_spec(meta_spec, "meta");
  ArrayView out_codes = plm::view_from_spec(out_codes_spec, "out_codes");
  ArrayView out_meta = plm::view_from_spec(out_meta_spec, "out_meta");
  if (N < 0 || D < 1) throw py::value_error("N must be >= 0 and D >= 1");
  check_codes(codes, meta, N, D, false);
  require_cpu(out_codes);
  require_cpu(out_meta);
  plm::require_dtype(out_codes, DType::u8);
  plm::require_dtype(out_meta, DType::f32);
  for (const ArrayView* out : {&out_codes, &out_meta}) {
    plm::require_contiguous(*out);
    plm::require_writable(*out);
  }
  const int64_t Dg = (D + 15) / 16 * 16;
  if (out_codes.ndim != 2 || out_codes.shape[0] != N || out_codes.shape[1] != Dg)
    throw py::value_error("out_codes must have shape (" + std::to_string(N) + ", " + std::to_string(Dg) + ")");
  if (out_meta.ndim != 2 || out_meta.shape[0] != 3 || out_meta.shape[1] != N)
    throw py::value_error("out_meta must have shape (3, " + std::to_string(N) + ")");
  py::gil_scoped_release nogil;
  plm::cpu::device_codes(static_cast<const uint8_t*>(codes.data), static_cast<const float*>(meta.data), N, D, cosine,
                         reinterpret_cast<int8_t*>(out_codes.data), Dg, static_cast<float*>(out_meta.data));
}

plm::cpu::GemArgs gem_args(const ArrayView& x, double p, double eps) {
  plm::require_ndim(x, 4);
  if (x.dtype != DType::f64) plm::require_dtype_float(x);
  const int64_t H = x.shape[2], Wd = x.shape[3];
  if (H * Wd == 0) throw py::value_error("x: H and W must be at least 1, got " + x.describe());
  if (H > 1 && Wd > 1 && x.strides[2] != Wd * x.strides[3])
    throw py::value_error("x: the H and W axes must be mergeable (H stride = W * W stride)");
  if (!(p > 0.0)) throw py::value_error("p must be > 0, got " + std::to_string(p));
  if (!(eps > 0.0)) throw py::value_error("eps must be > 0, got " + std::to_string(eps));
  const int64_t shw = Wd > 1 ? x.strides[3] : (H > 1 ? x.strides[2] : 1);
  return {x.data, x.dtype, x.shape[0], x.shape[1], H * Wd, x.strides[0], x.strides[1], shw, p, eps, 0};
}

void check_gem_out(const ArrayView& y, const ArrayView& x) {
  plm::require_ndim(y, 2);
  plm::require_contiguous(y);
  plm::require_writable(y);
  plm::require_dtype(y, x.dtype == DType::f64 ? DType::f64 : DType::f32);
  if (y.shape[0] != x.shape[0] || y.shape[1] != x.shape[1])
    throw py::value_error(y.name + " must have shape (B, C)");
}

// dx is written in place of x's gradient: same dtype, shape and strides.
void check_grad_input(const ArrayView& dx, const ArrayView& x) {
  plm::require_writable(dx);
  plm::require_dtype(dx, x.dtype);
  for (int i = 0; i < 4; ++i)
    if (dx.shape[i] != x.shape[i] || (dx.shape[i] > 1 && dx.strides[i] != x.strides[i]))
      throw py::value_error("grad_input must have the shape and strides of x");
}

void gem_forward(const py::tuple& x_spec, const py::tuple& y_spec, double p, double eps) {
  ArrayView x = plm::view_from_spec(x_spec, "x");
  ArrayView y = plm::view_from_spec(y_spec, "y");
  require_cpu(x);
  auto args = gem_args(x, p, eps);
  check_gem_out(y, x);
  py::gil_scoped_release nogil;
  plm::cpu::gem_forward(args, y.data);
}

double gem_backward(const py::tuple& x_spec, const py::tuple& gy_spec, const py::tuple& y_spec,
                    const py::tuple& dx_spec, double p, double eps, bool want_dp) {
  ArrayView x = plm::view_from_spec(x_spec, "x");
  ArrayView gy = plm::view_from_spec(gy_spec, "grad_output");
  ArrayView y = plm::view_from_spec(y_spec, "y");
  ArrayView dx = plm::view_from_spec(dx_spec, "grad_input");
  require_cpu(x);
  auto args = gem_args(x, p, eps);
  check_gem_out(y, x);
  check_gem_out(gy, x);
  check_grad_input(dx, x);
  py::gil_scoped_release nogil;
  return plm::cpu::gem_backward(args, gy.data, y.data, dx.data, want_dp);
}

#if defined(PLM_WITH_CUDA)
// GeM on CUDA arrays: p is a 1-element float32 array on x's device; `stream` is the caller's
// current stream (cudaStream_t as an integer); nothing here synchronises.
plm::cuda::GemDeviceArgs gem_device_args(const ArrayView& x, const py::tuple& p_spec, double eps,
                                         uintptr_t stream) {
  ArrayView p = plm::view_from_spec(p_spec, "p");
  if (x.device != plm::Device::cuda) throw py::value_error("x must be a CUDA array here");
  if (x.dtype == DType::f64) throw py::type_error("x: GeM on the GPU takes float16, bfloat16 or float32");
  plm::require_same_device(p, x);
  plm::require_dtype(p, DType::f32);
  if (p.numel() != 1) throw py::value_error("p must hold exactly one value");
  auto c = gem_args(x, 1.0, eps);
  return {c.x, c.dtype, c.B, c.C, c.HW, c.sb, c.sc, c.shw, static_cast<const float*>(p.data),
          static_cast<float>(eps), x.device_id, reinterpret_cast<cudaStream_t>(stream)};
}

void check_same_device(const ArrayView& a, const ArrayView& x) { plm::require_same_device(a, x); }

void gem_forward_cuda(const py::tuple& x_spec, const py::tuple& y_spec, const py::tuple& p_spec,
                      double eps, uintptr_t stream) {
  ArrayView x = plm::view_from_spec(x_spec, "x");
  ArrayView y = plm::view_from_spec(y_spec, "y");
  auto args = gem_device_args(x, p_spec, eps, stream);
  check_gem_out(y, x);
  check_same_device(y, x);
  py::gil_scoped_release nogil;
  plm::cuda::gem_forward(args, static_cast<float*>(y.data));
}

void gem_backward_cuda(const py::tuple& x_spec, const py::tuple& gy_spec, const py::tuple& y_spec,
                       const py::tuple& dx_spec, const py::object& terms_spec,
                       const py::tuple& p_spec, double eps, uintptr_t stream) {
  ArrayView x = plm::view_from_spec(x_spec, "x");
  ArrayView gy = plm::view_from_spec(gy_spec, "grad_output");
  ArrayView y = plm::view_from_spec(y_spec, "y");
  ArrayView dx = plm::view_from_spec(dx_spec, "grad_input");
  auto args = gem_device_args(x, p_spec, eps, stream);
  for (const ArrayView* v : {&gy, &y}) {
    check_gem_out(*v, x);
    check_same_device(*v, x);
  }
  check_same_device(dx, x);
  check_grad_input(dx, x);
  float* terms = nullptr;
  if (!terms_spec.is_none()) {
    ArrayView t = plm::view_from_spec(terms_spec.cast<py::tuple>(), "terms");
    plm::require_dtype(t, DType::f32);
    plm::require_contiguous(t);
    check_same_device(t, x);
    if (t.numel() != x.shape[0] * x.shape[1]) throw py::value_error("terms must hold B*C values");
    terms = static_cast<float*>(t.data);
  }
  py::gil_scoped_release nogil;
  plm::cuda::gem_backward(args, static_cast<const float*>(gy.data), static_cast<const float*>(y.data),
                          dx.data, terms);
}

// Search on CUDA arrays: the caller allocates the outputs, passes an allocator for the workspace
// and its current stream.
plm::cuda::SearchDeviceArgs search_device_args(const ArrayView& q, const ArrayView& db, int64_t k, bool cosine,
                                               uintptr_t stream) {
  if (q.device != plm::Device::cuda) throw py::value_error("queries must be a CUDA array here");
  if (k > plm::cuda::max_search_k())
    throw py::value_error("k must be at most " + std::to_string(plm::cuda::max_search_k()) +
                          " on the GPU, got " + std::to_string(k) + "; search CPU copies for larger k");
  return {search_inputs(q, db, k, cosine), q.device_id, reinterpret_cast<cudaStream_t>(stream)};
}

// The checked GPU arguments of a search, without outputs or stream (planning only).
plm::cuda::SearchDeviceArgs cuda_search_plan_args(const py::tuple& q_spec, const py::tuple& db_spec, int64_t k,
                                                  bool cosine) {
  ArrayView q = plm::view_from_spec(q_spec, "queries");
  ArrayView db = plm::view_from_spec(db_spec, "db");
  check_search_inputs(q, db, k);
  return search_device_args(q, db, k, cosine, 0);
}

std::string search_cuda_kernel(const py::tuple& q_spec, const py::tuple& db_spec, int64_t k, bool cosine) {
  auto args = cuda_search_plan_args(q_spec, db_spec, k, cosine);
  py::gil_scoped_release nogil;
  return plm::cuda::search_kernel_name(args);
}

// alloc(nbytes) -> (array, spec): a uint8 array of at least nbytes on the data's device from the
// caller's framework allocator (on `stream`), and its spec; called once, after planning. The
// array is kept alive here until run(args, workspace, scores, indices) has queued the work.
template <class Run>
void search_cuda_with(const py::tuple& q_spec, const py::tuple& db_spec, const py::tuple& scores_spec,
                      const py::tuple& idx_spec, const py::function& alloc, int64_t k, bool cosine, uintptr_t stream,
                      Run&& run) {
  ArrayView q = plm::view_from_spec(q_spec, "queries");
  ArrayView db = plm::view_from_spec(db_spec, "db");
  ArrayView scores = plm::view_from_spec(scores_spec, "scores");
  ArrayView idx = plm::view_from_spec(idx_spec, "indices");
  check_search(q, db, scores, idx, k);
  auto args = search_device_args(q, db, k, cosine, stream);
  py::object keep;  // (workspace array, spec)
  auto workspace = [&](size_t nbytes) -> void* {
    py::gil_scoped_acquire gil;
    keep = alloc(nbytes);
    ArrayView ws = plm::view_from_spec(keep.cast<py::tuple>()[1].cast<py::tuple>(), "workspace");
    plm::require_dtype(ws, DType::u8);
    plm::require_contiguous(ws);
    plm::require_writable(ws);
    plm::require_same_device(ws, q);
    if (static_cast<size_t>(ws.numel()) < nbytes)
      throw py::value_error("workspace holds " + std::to_string(ws.numel()) + " bytes; the search needs " +
                            std::to_string(nbytes));
    return ws.data;
  };
  {
    py::gil_scoped_release nogil;
    run(args, workspace, static_cast<float*>(scores.data), static_cast<int64_t*>(idx.data));
  }
}

void search_cuda(const py::tuple& q_spec, const py::tuple& db_spec, const py::tuple& scores_spec,
                 const py::tuple& idx_spec, const py::function& alloc, int64_t k, bool cosine, uintptr_t stream) {
  search_cuda_with(q_spec, db_spec, scores_spec, idx_spec, alloc, k, cosine, stream,
                   [](const plm::cuda::SearchDeviceArgs& args, const std::function<void*(size_t)>& workspace,
                      float* scores, int64_t* indices) { plm::cuda::search(args, workspace, scores, indices); });
}

// search_cuda from a prepared db's device codes (ops.device_codes moved to the rows' device).
void search_codes_cuda(const py::tuple& q_spec, const py::tuple& db_spec, const py::tuple& codes_spec,
                       const py::tuple& meta_spec, const py::tuple& scores_spec, const py::tuple& idx_spec,
                       const py::function& alloc, int64_t k, bool cosine, uintptr_t stream) {
  ArrayView db = plm::view_from_spec(db_spec, "db");
  ArrayView codes = plm::view_from_spec(codes_spec, "codes");
  ArrayView meta = plm::view_from_spec(meta_spec, "code metadata");
  plm::require_dtype(codes, DType::u8);
  plm::require_dtype(meta, DType::f32);
  plm::require_contiguous(codes);
  plm::require_contiguous(meta);
  plm::require_same_device(codes, db);
  plm::require_same_device(meta, db);
  const int64_t N = db.shape[0], Dg = (db.shape[1] + 15) / 16 * 16;
  if (codes.ndim != 2 || codes.shape[0] != N || codes.shape[1] != Dg)
    throw py::value_error("codes must have shape (" + std::to_string(N) + ", " + std::to_string(Dg) +
                          ") for this db, got " + codes.describe() + "; prepare() the db again");
  if (meta.ndim != 2 || meta.shape[0] != 3 || meta.shape[1] != N)
    throw py::value_error("code metadata must have shape (3, " + std::to_string(N) + "), got " + meta.describe() +
                          "; prepare() the db again");
  const plm::cuda::DeviceCodesArgs c{codes.data, Dg, static_cast<const float*>(meta.data)};
  search_cuda_with(q_spec, db_spec, scores_spec, idx_spec, alloc, k, cosine, stream,
                   [&](const plm::cuda::SearchDeviceArgs& args, const std::function<void*(size_t)>& workspace,
                       float* scores, int64_t* indices) { plm::cuda::search_codes(args, c, workspace, scores, indices); });
}
#endif

py::dict build_info() {
  py::dict d;
#if defined(PLM_WITH_CUDA)
  d["cuda"] = true;
  d["cuda_runtime_version"] = plm::cuda::runtime_version();
#else
  d["cuda"] = false;
#endif
  int n = 0;
  const char* const* names = plm::cpu::supported_isas(&n);
  py::list isas;
  for (int i = 0; i < n; ++i) isas.append(names[i]);
  d["cpu_isas"] = isas;
  return d;
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "pylandmark native kernels (private; use the pylandmark package)";
  py::register_exception_translator([](std::exception_ptr e) {
    try {
      if (e) std::rethrow_exception(e);
    } catch (const std::invalid_argument& ex) {
      PyErr_SetString(PyExc_ValueError, ex.what());
    }
  });
  m.def("search", &search, py::arg("queries"), py::arg("db"), py::arg("scores"), py::arg("indices"),
        py::arg("k"), py::arg("cosine"));
  m.def("build_codes", &build_codes, py::arg("db"), py::arg("codes"), py::arg("meta"), py::arg("row0"),
        py::arg("cosine"));
  m.def("search_codes", &search_codes, py::arg("queries"), py::arg("db"), py::arg("codes"), py::arg("meta"),
        py::arg("scores"), py::arg("indices"), py::arg("k"), py::arg("cosine"));
  m.def("device_codes", &device_codes, py::arg("codes"), py::arg("meta"), py::arg("N"), py::arg("D"),
        py::arg("cosine"), py::arg("out_codes"), py::arg("out_meta"));
  m.def("code_bounds", &code_bounds, py::arg("queries"), py::arg("db"), py::arg("codes"), py::arg("meta"),
        py::arg("lower"), py::arg("upper"), py::arg("cosine"));
  m.def("code_kernel", [] { return std::string(plm::cpu::active_code_kernels().name); });
  m.def("code_kernels", [] {
    int n = 0;
    const char* const* names = plm::cpu::supported_code_kernels(&n);
    std::vector<std::string> out(names, names + n);
    return out;
  });
  m.def("set_code_kernel", [](const std::string& name) { plm::cpu::set_code_kernel(name.c_str()); },
        py::arg("name"));
  m.def("gem_forward", &gem_forward, py::arg("x"), py::arg("y"), py::arg("p"), py::arg("eps"));
  m.def("gem_backward", &gem_backward, py::arg("x"), py::arg("grad_output"), py::arg("y"),
        py::arg("grad_input"), py::arg("p"), py::arg("eps"), py::arg("want_dp"));
#if defined(PLM_WITH_CUDA)
  m.def("gem_forward_cuda", &gem_forward_cuda, py::arg("x"), py::arg("y"), py::arg("p"), py::arg("eps"),
        py::arg("stream"));
  m.def("gem_backward_cuda", &gem_backward_cuda, py::arg("x"), py::arg("grad_output"), py::arg("y"),
        py::arg("grad_input"), py::arg("terms"), py::arg("p"), py::arg("eps"), py::arg("stream"));
  m.def("search_cuda", &search_cuda, py::arg("queries"), py::arg("db"), py::arg("scores"), py::arg("indices"),
        py::arg("alloc"), py::arg("k"), py::arg("cosine"), py::arg("stream"));
  m.def("search_codes_cuda", &search_codes_cuda, py::arg("queries"), py::arg("db"), py::arg("codes"),
        py::arg("meta"), py::arg("scores"), py::arg("indices"), py::arg("alloc"), py::arg("k"), py::arg("cosine"),
        py::arg("stream"));
  m.def("search_cuda_kernel", &search_cuda_kernel, py::arg("queries"), py::arg("db"), py::arg("k"),
        py::arg("cosine"));
  m.attr("SEARCH_CUDA_MAX_K") = plm::cuda::max_search_k();
#endif
  m.def("get_num_threads", &plm::cpu::get_num_threads);
  m.def("set_num_threads", &plm::cpu::set_num_threads, py::arg("n"));
  m.def("cpu_isa", [] { return std::string(plm::cpu::active_kernels().name); });
  m.def("set_cpu_isa", [](const std::string& name) { plm::cpu::set_isa(name.c_str()); }, py::arg("name"));
  m.def("build_info", &build_info);
  m.def("cuda_device_count", [] {
#if defined(PLM_WITH_CUDA)
    std::string err;
    int n = plm::cuda::device_count(&err);
    return py::make_tuple(n, err);
#else
    return py::make_tuple(0, std::string("pylandmark was built without CUDA"));
#endif
  });
#ifdef PLM_VERSION_INFO
  m.attr("__version__") = PLM_VERSION_INFO;
#endif
}
