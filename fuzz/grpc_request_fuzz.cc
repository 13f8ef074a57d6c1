// libFuzzer target: the native gRPC front end's ModelInfer fast path, as Frontend::TryFast runs
// it on a call's bytes: wire.cc's ParseRequest (protobuf wire parsing of the request, its
// parameters, inputs and outputs), then MatchInputs / MatchOutputs against the models of
// fuzz_models.h. What the validator accepts is read the way the batch queue reads it, so an
// offset or length it gets wrong is an AddressSanitizer report, as any out-of-bounds read in the
// parser is; and what it serves natively must be a message Python's protobuf parses too
// (proto_oracle.h), or the two front ends would answer the same bytes differently. Built by fuzz/build.sh (-fsanitize=fuzzer,address,undefined); docs/DEVELOPING.md.

#include <cstddef>
#include <cstdint>
#include <string_view>
#include <vector>

#include "frontend.h"
#include "fuzz_models.h"
#include "proto_oracle.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  namespace fz = xlaserve::fuzz;
  namespace nt = xlaserve::native;
  static const auto* models = new fz::Models(fz::MakeModels());
  std::string_view msg(reinterpret_cast<const char*>(data), size);
  nt::Request r;
  if (!nt::ParseRequest(msg, &r)) return 0;  // relayed to the Python servicer
  for (auto v : r.raw) {
    fz::Check(v.data() >= msg.data() && v.data() + v.size() <= msg.data() + msg.size(),
              "raw contents inside the message");
  }
  const nt::Model* m = fz::Find(*models, r.model_name, r.model_version);
  if (m == nullptr) return 0;
  std::vector<size_t> offsets;
  int64_t rows = -1;
  if (!nt::MatchInputs(r, *m, msg, fz::kMaxRows, fz::kMaxTensorBytes, &offsets, &rows)) return 0;
  std::vector<int> out_index;
  if (!nt::MatchOutputs(r, *m, &out_index)) return 0;
  for (int k : out_index) fz::Check(k >= 0 && size_t(k) < m->outputs.size(), "output index");
  fz::Check(fz::ProtoAcceptsRequest(msg), "served natively, but protobuf rejects the bytes");
  fz::ReadAccepted(*m, data, size, offsets, rows);
  return 0;
}
