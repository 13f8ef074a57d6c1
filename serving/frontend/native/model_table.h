// The native front ends' table of models and a parsed ModelInfer: what the gRPC front end
// (frontend.h), the HTTP one (http.h) and the batch queues (row_queue.h) share about a model's
// tensors. Parsing and matching are in wire.cc, ParseSpecs in module.cc.

#ifndef XLASERVE_SERVING_FRONTEND_NATIVE_MODEL_TABLE_H_
#define XLASERVE_SERVING_FRONTEND_NATIVE_MODEL_TABLE_H_

#include <pybind11/pybind11.h>

#include <atomic>
#include <cstdint>
#include <memory>
#include <string>
#include <string_view>
#include <unordered_map>
#include <utility>
#include <vector>

namespace py = pybind11;

namespace xlaserve::native {

class RowQueue;  // row_queue.h

// -- model table -------------------------------------------------------------------------------

struct Spec {
  std::string name, datatype;
  std::vector<int64_t> dims;  // dims[0] == -1 (rows), or 1 (a context input: one per request)
  int64_t row_bytes = 0;      // bytes per row
  bool narrow = false;        // (U)INT64 the model runs as 32 bits: checked at admission
};

// A canary split of a model's unversioned requests (split.cc): cumulative weights over the
// versions it picks among, the request parameter that pins a user, and the share relayed to
// Python for shadow scoring.
struct Split {
  std::string sticky;                    // request parameter name; empty: random by weight
  std::vector<double> bounds;            // cumulative weights (unnormalised), version order
  std::vector<std::string> versions;     // version keys, parallel to bounds
  std::vector<std::atomic<int64_t>*> routed;  // requests sent to each (Frontend-owned counters)
  double shadow_fraction = 0;            // relayed with the shadow marker, for Python to score
};

struct Model {
  int slot = 0;
  std::string version;  // the response's model_version
  std::vector<Spec> inputs, outputs;
  int64_t default_timeout_us = 0;
  std::shared_ptr<RowQueue> queue;   // the model's C++ queue; null: Python's feeder submits
  std::unique_ptr<Split> split;      // set: this entry routes to a version's entry (split.cc)
};

// Specs from Python's (name, datatype, dims, itemsize) tuples, row bytes computed (GIL held).
std::vector<Spec> ParseSpecs(const py::list& specs);

using Table = std::unordered_map<std::string, std::shared_ptr<const Model>>;  // name '\0' version

// -- a parsed ModelInfer (views into the message bytes; wire.cc) -------------------------------

struct InTensor {
  std::string_view name, datatype;
  std::vector<int64_t> shape;
};

struct Request {
  std::string_view model_name, model_version, id;
  std::vector<InTensor> inputs;
  std::vector<std::string_view> outputs;
  std::vector<std::string_view> raw;
  int64_t timeout_us = -1;  // absent
  int64_t priority = -1;    // absent
  std::vector<std::pair<std::string_view, std::string_view>> params;  // other (key, value)
};

// False for anything the fast path does not fully understand: Python decides.
bool ParseRequest(std::string_view msg, Request* r);

// The inputs match the model's specs: `offsets` gets each raw tensor's offset into `msg` (in
// spec order) and `rows` the common row count.
bool MatchInputs(const Request& r, const Model& m, std::string_view msg, int64_t max_rows,
                 int64_t max_tensor_bytes, std::vector<size_t>* offsets, int64_t* rows);

// The requested outputs (all of them when none is named) as indexes into m.outputs.
bool MatchOutputs(const Request& r, const Model& m, std::vector<int>* out_index);

}  // namespace xlaserve::native

#endif  // XLASERVE_SERVING_FRONTEND_NATIVE_MODEL_TABLE_H_
