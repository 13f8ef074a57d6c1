// Wire format of the fast path's ModelInferResponse: encoded from the runner's arrays (the
// Python feeder's answers) or straight from a batch's output rows (the C++ batch queue's).

#include <pybind11/stl.h>

#include <cstring>
#include <string>
#include <vector>

#include "row_queue.h"

namespace xlaserve::native {

namespace {

// -- protobuf wire writing ---------------------------------------------------------------------

size_t VarintSize(uint64_t v) {
  size_t n = 1;
  while (v >= 0x80) { v >>= 7; ++n; }
  return n;
}
uint8_t* PutVarint(uint8_t* p, uint64_t v) {
  while (v >= 0x80) { *p++ = uint8_t(v) | 0x80; v >>= 7; }
  *p++ = uint8_t(v);
  return p;
}
size_t FieldSize(size_t len) { return 1 + VarintSize(len) + len; }  // field numbers < 16
uint8_t* PutField(uint8_t* p, int field, const void* data, size_t len) {
  *p++ = uint8_t(field << 3 | 2);
  p = PutVarint(p, len);
  if (len) std::memcpy(p, data, len);
  return p + len;
}

}  // namespace

// -- the response ----------------------------------------------------------------------------

// A per-request output (leading dimension 1) has one row whatever the request's row count.
int64_t OutputRows(const Call& c, const Spec& s) { return s.dims[0] == 1 ? 1 : c.rows; }

void EncodeRows(const Call* c, const std::vector<const uint8_t*>& rows0, grpc::ByteBuffer* bb) {
  const Model& m = *c->model;
  auto shape_len = [c](const Spec& s) {
    size_t n = VarintSize(uint64_t(OutputRows(*c, s)));
    for (size_t d = 1; d < s.dims.size(); ++d) n += VarintSize(uint64_t(s.dims[d]));
    return n;
  };
  auto tensor_len = [&shape_len](const Spec& s) {
    return FieldSize(s.name.size()) + FieldSize(s.datatype.size()) + FieldSize(shape_len(s));
  };
  size_t total = FieldSize(c->model_name.size()) + FieldSize(m.version.size()) +
                 (c->id.empty() ? 0 : FieldSize(c->id.size()));
  for (int k : c->out_index) {
    const Spec& s = m.outputs[k];
    total += FieldSize(tensor_len(s)) + FieldSize(size_t(OutputRows(*c, s) * s.row_bytes));
  }
  grpc::Slice slice(total);
  auto* out = const_cast<uint8_t*>(slice.begin());
  out = PutField(out, 1, c->model_name.data(), c->model_name.size());
  out = PutField(out, 2, m.version.data(), m.version.size());
  if (!c->id.empty()) out = PutField(out, 3, c->id.data(), c->id.size());
  for (int k : c->out_index) {
    const Spec& s = m.outputs[k];
    *out++ = uint8_t(5 << 3 | 2);
    out = PutVarint(out, tensor_len(s));
    out = PutField(out, 1, s.name.data(), s.name.size());
    out = PutField(out, 2, s.datatype.data(), s.datatype.size());
    *out++ = uint8_t(3 << 3 | 2);
    out = PutVarint(out, shape_len(s));
    out = PutVarint(out, uint64_t(OutputRows(*c, s)));
    for (size_t d = 1; d < s.dims.size(); ++d) out = PutVarint(out, uint64_t(s.dims[d]));
  }
  for (int k : c->out_index) {
    const Spec& s = m.outputs[k];
    out = PutField(out, 6, rows0[k], size_t(OutputRows(*c, s) * s.row_bytes));
  }
  *bb = grpc::ByteBuffer(&slice, 1);
}

// A request answered by Python's runner (the feeder path): its outputs dict (GIL held).
std::string Frontend::Encode(Call* c, const py::dict& outputs, grpc::ByteBuffer* bb) {
  const Model& m = *c->model;
  std::vector<Py_buffer> views;
  std::vector<py::object> holders;
  std::vector<const uint8_t*> rows0(m.outputs.size(), nullptr);
  auto release_all = [&views] {
    for (auto& v : views) PyBuffer_Release(&v);
  };
  for (int k : c->out_index) {
    const Spec& s = m.outputs[k];
    PyObject* arr = PyDict_GetItemString(outputs.ptr(), s.name.c_str());
    if (arr == nullptr) {
      release_all();
      return "model output '" + s.name + "' is missing";
    }
    Py_buffer view;
    if (PyObject_GetBuffer(arr, &view, PyBUF_C_CONTIGUOUS) != 0) {
      PyErr_Clear();  // non-contiguous, or a dtype numpy cannot export (bfloat16): bytes
      try {
        holders.push_back(py::reinterpret_borrow<py::object>(arr).attr("tobytes")());
      } catch (py::error_already_set&) {
        release_all();
        return "model output '" + s.name + "' is not an array";
      }
      if (PyObject_GetBuffer(holders.back().ptr(), &view, PyBUF_SIMPLE) != 0) {
        PyErr_Clear();
        release_all();
        return "model output '" + s.name + "' is not an array";
      }
    }
    views.push_back(view);
    if (view.len != OutputRows(*c, s) * s.row_bytes) {
      release_all();
      return "model output '" + s.name + "' has " + std::to_string(view.len) +
             " bytes, expected " + std::to_string(OutputRows(*c, s) * s.row_bytes);
    }
    rows0[k] = static_cast<const uint8_t*>(view.buf);
  }
  EncodeRows(c, rows0, bb);
  release_all();
  return "";
}

}  // namespace xlaserve::native
