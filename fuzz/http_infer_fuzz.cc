// libFuzzer target: the native HTTP front end's request parsing, on the bytes a connection
// received: http_conn.cc's ParseHead (request line, headers, framing) and HttpHead::Rebase, then
// the fast path of http_infer.cc as HttpServer::TryFast runs it up to the queue: the infer
// target, the header checks, the JSON header (RapidJSON) and Triton's binary tensors
// (ReadHeader), MatchInputs / MatchOutputs against the models of fuzz_models.h. What is
// accepted is read as the batch queue reads it. http_infer.cc is included, not linked, to reach
// its internal functions; fuzz/build.sh links http_conn.cc and wire.cc (docs/DEVELOPING.md).

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "fuzz_models.h"
#include "http_infer.cc"  // NOLINT: ReadHeader, InferTarget and MayCompress are internal

namespace xlaserve::fuzz {
namespace {

using native::HttpHead;

// Every view of a parsed head lies inside [base, base + size).
void CheckViews(const HttpHead& h, const char* base, size_t size) {
  auto in = [base, size](std::string_view v) {
    return v.empty() || (v.data() >= base && v.data() + v.size() <= base + size);
  };
  Check(in(h.method) && in(h.target), "request line inside the head");
  for (const auto& [k, v] : h.headers) Check(in(k) && in(v), "header inside the head");
}

// HttpServer::TryFast's checks and parsing on a complete request `bytes` (body at head_len).
void FastPath(const Models& models, const HttpHead& h, std::string_view bytes) {
  std::string_view name, version;
  if (h.method != "POST" || !native::InferTarget(h.target, &name, &version)) return;
  int n_enc = 0, n_accept = 0, n = 0;
  std::string_view enc = h.Get("content-encoding", &n_enc);
  std::string_view accept = h.Get("accept-encoding", &n_accept);
  if (n_enc > 1 || n_accept > 1 || (!enc.empty() && !native::IEquals(enc, "identity")) ||
      native::MayCompress(accept)) {
    return;
  }
  std::string_view hl = h.Get("inference-header-content-length", &n);
  std::string_view body = bytes.substr(h.head_len);
  if (n != 1 || hl.empty() || hl.size() > 15 ||
      hl.find_first_not_of("0123456789") != std::string_view::npos) {
    return;
  }
  size_t header_len = std::stoull(std::string(hl));
  if (header_len > body.size()) return;
  const Model* m = Find(models, name, version);
  if (m == nullptr) return;
  rapidjson::Document doc;
  doc.Parse<rapidjson::kParseValidateEncodingFlag | rapidjson::kParseIterativeFlag>(body.data(),
                                                                                   header_len);
  native::Request r;
  std::vector<size_t> offsets;
  std::vector<int> out_index;
  int64_t rows = 0;
  if (doc.HasParseError() || !doc.IsObject() ||
      !native::ReadHeader(doc, body.substr(header_len), &r) ||
      !native::MatchInputs(r, *m, body, kMaxRows, kMaxTensorBytes, &offsets, &rows) ||
      !native::MatchOutputs(r, *m, &out_index) || rows == 0) {
    return;
  }
  for (int k : out_index) Check(k >= 0 && size_t(k) < m->outputs.size(), "output index");
  ReadAccepted(*m, reinterpret_cast<const uint8_t*>(body.data()), body.size(), offsets, rows);
}

}  // namespace
}  // namespace xlaserve::fuzz

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  namespace fz = xlaserve::fuzz;
  static const auto* models = new fz::Models(fz::MakeModels());
  std::string in(reinterpret_cast<const char*>(data), size);  // the connection's buffer
  fz::HttpHead h;
  if (xlaserve::native::ParseHead(in, &h) != 1) return 0;
  fz::Check(h.head_len >= 4 && h.head_len <= in.size(), "head length");
  fz::CheckViews(h, in.data(), h.head_len);
  // Conn::Process: a head the relay does not follow request by request becomes a tunnel.
  if (h.tunnel || h.minor != 1 || h.content_length < 0 ||
      h.content_length > (64 << 20)) {
    return 0;
  }
  size_t total = h.head_len + size_t(h.content_length);
  if (in.size() < total) return 0;  // incomplete: waits for more bytes
  // The request moves into its own buffer; the connection's bytes are then gone.
  auto own = std::make_unique<char[]>(total);
  std::memcpy(own.get(), in.data(), total);
  const char* base = in.data();
  h.Rebase(base, own.get());
  std::string().swap(in);
  fz::CheckViews(h, own.get(), h.head_len);
  fz::FastPath(*models, h, std::string_view(own.get(), total));
  return 0;
}
