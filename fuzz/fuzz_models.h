// The model specs both fuzz targets validate against: the repository of the differential tests
// (tests/serving/frontend/test_native_parity.py and test_native_http.py: "dtypes", one input
// per datatype, and the MockEngine's "mock"), and "ctx", a pipeline-style model with per-request
// (context) inputs, BYTES included. Specs as serving/frontend/native.py hands them to ParseSpecs.

#ifndef XLASERVE_FUZZ_FUZZ_MODELS_H_
#define XLASERVE_FUZZ_FUZZ_MODELS_H_

#include <cstdio>
#include <cstdlib>
#include <memory>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "frontend.h"

namespace xlaserve::fuzz {

using native::Model;
using native::Spec;

// The server's limits, small enough that the fuzzer reaches both sides of every limit check.
inline constexpr int64_t kMaxRows = 64, kMaxTensorBytes = 1 << 12;

inline Spec MakeSpec(std::string name, std::string datatype, std::vector<int64_t> dims,
                     int64_t itemsize) {
  Spec s{std::move(name), std::move(datatype), std::move(dims), itemsize};
  for (size_t d = 1; d < s.dims.size(); ++d) s.row_bytes *= s.dims[d];  // as ParseSpecs does
  return s;
}

using Models = std::vector<std::pair<std::string, std::shared_ptr<const Model>>>;

inline Models MakeModels() {
  const char* types[] = {"FP32", "FP16", "BF16", "INT32", "INT64", "INT8", "UINT8", "BOOL"};
  const char* names[] = {"float32", "float16", "bfloat16", "int32", "int64", "int8", "uint8",
                         "bool"};
  const int64_t sizes[] = {4, 2, 2, 4, 8, 1, 1, 1};
  auto dtypes = std::make_shared<Model>();
  dtypes->version = "1";
  for (int i = 0; i < 8; ++i) {
    dtypes->inputs.push_back(MakeSpec(std::string("in_") + names[i], types[i], {-1, 3}, sizes[i]));
    dtypes->outputs.push_back(MakeSpec(std::string("out_") + names[i], types[i], {-1, 3},
                                       sizes[i]));
  }
  auto mock = std::make_shared<Model>();
  mock->version = "1";
  mock->inputs = {MakeSpec("x", "FP32", {-1, 4}, 4), MakeSpec("k", "INT32", {-1, 1}, 4)};
  mock->outputs = {MakeSpec("y", "FP32", {-1, 1}, 4), MakeSpec("z", "FP32", {-1, 4}, 4)};
  auto ctx = std::make_shared<Model>();
  ctx->version = "1";
  ctx->inputs = {MakeSpec("rows", "FP32", {-1, 2}, 4), MakeSpec("user", "INT64", {1, 3}, 8),
                 MakeSpec("query", "BYTES", {1, 2}, 8)};
  ctx->outputs = {MakeSpec("score", "FP32", {-1, 1}, 4), MakeSpec("pooled", "FP32", {1, 2}, 4)};
  return {{"dtypes", dtypes}, {"mock", mock}, {"ctx", ctx}};
}

// The model a request names (version "" or "1"), as Frontend::Lookup finds it; null: unknown.
inline const Model* Find(const Models& models, std::string_view name, std::string_view version) {
  if (!version.empty() && version != "1") return nullptr;
  for (const auto& [n, m] : models) {
    if (n == name) return m.get();
  }
  return nullptr;
}

// A broken invariant is a crash, which libFuzzer reports with the input that caused it.
inline void Check(bool ok, const char* what) {
  if (ok) return;
  std::fprintf(stderr, "fuzz invariant broken: %s\n", what);
  std::abort();
}

// Reads every byte the batch queue would copy from an accepted request: each non-BYTES input's
// rows at its offset into `base` (`size` bytes), so a wrong offset or length is a report.
inline void ReadAccepted(const Model& m, const uint8_t* base, size_t size,
                         const std::vector<size_t>& offsets, int64_t rows) {
  Check(rows >= 0 && rows <= kMaxRows && offsets.size() == m.inputs.size(), "rows, offsets");
  volatile uint8_t sink = 0;
  for (size_t k = 0; k < m.inputs.size(); ++k) {
    const Spec& s = m.inputs[k];
    if (s.datatype == "BYTES") continue;  // Python decodes the elements
    int64_t n = (s.dims[0] == 1 ? 1 : rows) * s.row_bytes;
    Check(offsets[k] <= size && int64_t(size - offsets[k]) >= n, "tensor inside the message");
    for (int64_t i = 0; i < n; ++i) sink = sink + base[offsets[k] + size_t(i)];
  }
}

}  // namespace xlaserve::fuzz

#endif  // XLASERVE_FUZZ_FUZZ_MODELS_H_
