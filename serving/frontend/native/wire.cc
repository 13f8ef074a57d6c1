// Wire format of ModelInfer for the fast path: parses the request's protobuf bytes (views, no
// copies) and checks its tensors against the model's specs (the response: wire_encode.cc).
// Anything it does not fully understand returns false: the call is relayed.

#include <cstring>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "row_queue.h"

namespace xlaserve::native {
namespace {

// -- protobuf wire reading ---------------------------------------------------------------------

struct Wire {
  const uint8_t* p;
  const uint8_t* end;

  bool Varint(uint64_t* v, int max_bytes = 10) {  // protobuf: tags and lengths in 5 at most
    uint64_t out = 0;
    for (int shift = 0; shift < 7 * max_bytes; shift += 7) {
      if (p >= end) return false;
      uint8_t b = *p++;
      out |= uint64_t(b & 0x7f) << shift;
      if (!(b & 0x80)) {
        *v = out;
        return true;
      }
    }
    return false;
  }
  bool Tag(uint32_t* field, uint32_t* type) {
    uint64_t t;
    if (!Varint(&t, 5) || (t >> 3) == 0 || (t >> 3) > 0x1fffffff) return false;
    *field = uint32_t(t >> 3);
    *type = uint32_t(t & 7);
    return true;
  }
  bool Bytes(std::string_view* out) {
    uint64_t n;
    if (!Varint(&n, 5) || n > uint64_t(end - p)) return false;
    *out = std::string_view(reinterpret_cast<const char*>(p), n);
    p += n;
    return true;
  }
};

bool ValidUtf8(std::string_view s) {
  const auto* p = reinterpret_cast<const uint8_t*>(s.data());
  const auto* e = p + s.size();
  while (p < e) {
    uint8_t c = *p;
    if (c < 0x80) { ++p; continue; }
    int n = (c >> 5) == 6 ? 1 : (c >> 4) == 14 ? 2 : (c >> 3) == 30 ? 3 : -1;
    if (n < 0 || e - p <= n) return false;
    uint32_t cp = c & (0x3f >> n);
    for (int i = 1; i <= n; ++i) {
      if ((p[i] & 0xc0) != 0x80) return false;
      cp = (cp << 6) | (p[i] & 0x3f);
    }
    if ((n == 1 && cp < 0x80) || (n == 2 && cp < 0x800) || (n == 3 && cp < 0x10000) ||
        cp > 0x10ffff || (cp >= 0xd800 && cp <= 0xdfff)) return false;
    p += n + 1;
  }
  return true;
}

// Whether `raw` is exactly prod(dims) BYTES elements (each a 4-byte little-endian length and
// that many bytes), within the tensor limit: what the Python codec accepts.
bool BytesElements(std::string_view raw, const std::vector<int64_t>& dims, int64_t max_bytes) {
  if (int64_t(raw.size()) > max_bytes) return false;
  int64_t count = 1;
  for (int64_t d : dims) count *= d < 0 ? 1 : d;
  size_t pos = 0;
  for (int64_t i = 0; i < count; ++i) {
    if (raw.size() - pos < 4) return false;
    uint32_t n;
    std::memcpy(&n, raw.data() + pos, 4);  // little-endian hosts (x86-64, aarch64)
    pos += 4;
    if (raw.size() - pos < n) return false;
    pos += n;
  }
  return pos == raw.size();
}

// An InferParameter holding a non-negative integer; anything else is left to Python.
bool IntParam(std::string_view msg, int64_t* out) {
  Wire w{reinterpret_cast<const uint8_t*>(msg.data()),
         reinterpret_cast<const uint8_t*>(msg.data()) + msg.size()};
  int seen = 0;
  while (w.p < w.end) {
    uint32_t f, t;
    uint64_t v;
    if (!w.Tag(&f, &t) || t != 0 || (f != 2 && f != 5) || !w.Varint(&v)) return false;
    if (v > (uint64_t(1) << 62)) return false;  // negative int64 or absurd
    *out = int64_t(v);
    ++seen;
  }
  return seen == 1;
}

// A well-formed InferParameter of any kind (Python ignores the ones it does not use).
bool AnyParam(std::string_view msg) {
  Wire w{reinterpret_cast<const uint8_t*>(msg.data()),
         reinterpret_cast<const uint8_t*>(msg.data()) + msg.size()};
  while (w.p < w.end) {
    uint32_t f, t;
    uint64_t v;
    std::string_view s;
    if (!w.Tag(&f, &t)) return false;
    if ((f == 1 || f == 2 || f == 5) && t == 0) {
      if (!w.Varint(&v)) return false;
    } else if (f == 3 && t == 2) {
      if (!w.Bytes(&s) || !ValidUtf8(s)) return false;
    } else if (f == 4 && t == 1) {
      if (w.end - w.p < 8) return false;
      w.p += 8;
    } else {
      return false;
    }
  }
  return true;
}

bool ParseParameter(std::string_view entry, Request* r) {
  Wire w{reinterpret_cast<const uint8_t*>(entry.data()),
         reinterpret_cast<const uint8_t*>(entry.data()) + entry.size()};
  std::string_view key, value;
  bool has_key = false, has_value = false;  // either given twice: Python decides
  while (w.p < w.end) {
    uint32_t f, t;
    if (!w.Tag(&f, &t) || t != 2) return false;
    if (f == 1) {
      if (std::exchange(has_key, true) || !w.Bytes(&key)) return false;
    } else if (f == 2) {
      if (std::exchange(has_value, true) || !w.Bytes(&value)) return false;
    } else {
      return false;
    }
  }
  if (key == "timeout" || key == "priority") {  // validated and used, as in servicer.py
    int64_t v;
    if (!has_value || !IntParam(value, &v)) return false;
    int64_t* slot = key == "timeout" ? &r->timeout_us : &r->priority;
    if (*slot >= 0) return false;  // given twice: the Python servicer decides
    *slot = v;
    return true;
  }
  // Any other parameter: plain models ignore it as Python does; a split may read it (split.cc).
  if (!ValidUtf8(key) || (has_value && !AnyParam(value))) return false;
  return r->params.emplace_back(key, value), true;
}

bool ParseInput(std::string_view msg, InTensor* t) {
  Wire w{reinterpret_cast<const uint8_t*>(msg.data()),
         reinterpret_cast<const uint8_t*>(msg.data()) + msg.size()};
  while (w.p < w.end) {
    uint32_t f, type;
    if (!w.Tag(&f, &type)) return false;
    if (f == 1 && type == 2) {  // name or datatype given twice: Python decides
      if (t->name.data() != nullptr || !w.Bytes(&t->name)) return false;
    } else if (f == 2 && type == 2) {
      if (t->datatype.data() != nullptr || !w.Bytes(&t->datatype)) return false;
    } else if (f == 3 && type == 2) {  // packed
      std::string_view packed;
      if (!w.Bytes(&packed)) return false;
      Wire pw{reinterpret_cast<const uint8_t*>(packed.data()),
              reinterpret_cast<const uint8_t*>(packed.data()) + packed.size()};
      while (pw.p < pw.end) {
        uint64_t v;
        if (!pw.Varint(&v) || t->shape.size() >= 16) return false;
        t->shape.push_back(int64_t(v));
      }
    } else if (f == 3 && type == 0) {
      uint64_t v;
      if (!w.Varint(&v) || t->shape.size() >= 16) return false;
      t->shape.push_back(int64_t(v));
    } else {
      return false;  // parameters, typed contents, unknown fields: Python decides
    }
  }
  return true;
}

bool ParseOutput(std::string_view msg, std::string_view* name) {
  Wire w{reinterpret_cast<const uint8_t*>(msg.data()),
         reinterpret_cast<const uint8_t*>(msg.data()) + msg.size()};
  bool named = false;
  Request scratch;  // output parameters, which Python ignores once protobuf has parsed them
  while (w.p < w.end) {
    uint32_t f, t;
    std::string_view v;
    if (!w.Tag(&f, &t) || t != 2 || !w.Bytes(&v)) return false;
    if (f == 1) {
      if (std::exchange(named, true)) return false;  // given twice: Python decides
      *name = v;
    } else if (f != 2 || !ParseParameter(v, &scratch)) {
      return false;
    }
  }
  return named;
}

}  // namespace

bool ParseRequest(std::string_view msg, Request* r) {
  Wire w{reinterpret_cast<const uint8_t*>(msg.data()),
         reinterpret_cast<const uint8_t*>(msg.data()) + msg.size()};
  while (w.p < w.end) {
    uint32_t f, t;
    std::string_view v;
    if (!w.Tag(&f, &t) || t != 2 || !w.Bytes(&v)) return false;
    switch (f) {
      case 1: if (r->model_name.data()) return false; r->model_name = v; break;  // given twice:
      case 2: if (r->model_version.data()) return false; r->model_version = v; break;  // Python
      case 3: if (r->id.data()) return false; r->id = v; break;  // decides (checks every copy)
      case 4: if (!ParseParameter(v, r)) return false; break;
      case 5:
        if (r->inputs.size() >= 64) return false;
        r->inputs.emplace_back();
        if (!ParseInput(v, &r->inputs.back())) return false;
        break;
      case 6:
        if (r->outputs.size() >= 64) return false;
        r->outputs.emplace_back();
        if (!ParseOutput(v, &r->outputs.back())) return false;
        break;
      case 7: r->raw.push_back(v); break;
      default: return false;
    }
  }
  return ValidUtf8(r->id);
}

// -- validation against the model's specs ------------------------------------------------------

bool MatchInputs(const Request& r, const Model& m, std::string_view msg, int64_t max_rows,
                 int64_t max_tensor_bytes, std::vector<size_t>* offsets, int64_t* rows_out) {
  const size_t n = m.inputs.size();
  if (r.inputs.size() != n || r.raw.size() != n) return false;
  offsets->assign(n, 0);
  std::vector<bool> seen(n, false);
  int64_t rows = -1;
  for (size_t i = 0; i < n; ++i) {
    const InTensor& t = r.inputs[i];
    size_t k = 0;
    while (k < n && m.inputs[k].name != t.name) ++k;
    if (k == n || seen[k]) return false;
    seen[k] = true;
    const Spec& s = m.inputs[k];
    if (t.datatype != s.datatype || t.shape.size() != s.dims.size()) return false;
    for (size_t d = 1; d < s.dims.size(); ++d) {
      if (t.shape[d] != s.dims[d]) return false;
    }
    int64_t nr = t.shape[0];
    const bool context = s.dims[0] == 1;  // a context input: one row per request, not a count
    if (context ? nr != 1 : (nr < 1 || nr > max_rows || (rows >= 0 && nr != rows))) return false;
    if (!context) rows = nr;
    if (s.datatype == "BYTES") {  // a per-request BYTES tensor (a pipeline's query text)
      if (!context || !BytesElements(r.raw[i], s.dims, max_tensor_bytes)) return false;
    } else {
      if (s.row_bytes != 0 && nr > max_tensor_bytes / s.row_bytes) return false;
      if (int64_t(r.raw[i].size()) != nr * s.row_bytes) return false;
    }
    (*offsets)[k] = size_t(r.raw[i].data() - msg.data());
  }
  *rows_out = rows < 0 ? 0 : rows;  // 0: every input is per request (as the Python codec says)
  return true;
}

bool MatchOutputs(const Request& r, const Model& m, std::vector<int>* out_index) {
  out_index->clear();
  for (auto name : r.outputs) {
    size_t k = 0;
    while (k < m.outputs.size() && m.outputs[k].name != name) ++k;
    if (k == m.outputs.size()) return false;
    out_index->push_back(int(k));
  }
  if (r.outputs.empty()) {
    for (size_t k = 0; k < m.outputs.size(); ++k) out_index->push_back(int(k));
  }
  return true;
}

}  // namespace xlaserve::native
