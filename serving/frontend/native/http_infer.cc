// The native HTTP fast path (http.h): a KServe v2 inference request with Triton's binary tensor
// data, for a model with a native batch queue, read and validated here and queued; its answer
// encoded here. The JSON header is parsed with RapidJSON (as Triton's own HTTP server does).
// Anything the Python front end would answer differently, or that this path does not fully
// understand (JSON tensor data, JSON outputs, other parameters, duplicate keys, compression,
// a mismatch of any kind), is left to the relay: the Python server then answers it, errors
// included, so both paths give the same answer for the same bytes.

#include <rapidjson/document.h>
#include <rapidjson/stringbuffer.h>
#include <rapidjson/writer.h>

#include <cstdio>
#include <initializer_list>

#include "http.h"
#include "row_queue.h"
#include "tenants.h"

namespace xlaserve::native {
namespace {

using rapidjson::Value;

std::string_view Str(const Value& v) { return std::string_view(v.GetString(), v.GetStringLength()); }

// Whether `obj` (an object) has no key twice among `keys` and, unless `others`, no other key.
bool KeysOk(const Value& obj, std::initializer_list<std::string_view> keys, bool others) {
  uint32_t seen = 0;
  for (auto it = obj.MemberBegin(); it != obj.MemberEnd(); ++it) {
    std::string_view k = Str(it->name);
    int i = 0;
    for (auto key : keys) {
      if (key == k) break;
      ++i;
    }
    if (i == int(keys.size())) {
      if (!others) return false;
      continue;
    }
    if (seen & (1u << i)) return false;
    seen |= 1u << i;
  }
  return true;
}

const Value* Member(const Value& obj, const char* key) {
  auto it = obj.FindMember(key);
  return it == obj.MemberEnd() ? nullptr : &it->value;
}

// The request's inputs (binary), requested outputs (binary) and id, from its JSON header.
bool ReadHeader(const Value& d, std::string_view binary, Request* r) {
  if (!KeysOk(d, {"id", "inputs", "outputs", "parameters"}, true)) return false;
  if (const Value* id = Member(d, "id")) {
    if (!id->IsString()) return false;
    r->id = Str(*id);
  }
  bool binary_out = false;
  if (const Value* p = Member(d, "parameters")) {
    if (!p->IsObject() || !KeysOk(*p, {"binary_data_output"}, false)) return false;
    if (const Value* b = Member(*p, "binary_data_output")) {
      if (!b->IsBool()) return false;
      binary_out = b->GetBool();
    }
  }
  const Value* inputs = Member(d, "inputs");
  if (inputs == nullptr || !inputs->IsArray()) return false;
  size_t offset = 0;
  for (const Value& t : inputs->GetArray()) {
    if (!t.IsObject() || !KeysOk(t, {"name", "shape", "datatype", "parameters"}, false)) {
      return false;
    }
    const Value *name = Member(t, "name"), *shape = Member(t, "shape");
    const Value *dt = Member(t, "datatype"), *p = Member(t, "parameters");
    if (!name || !name->IsString() || !dt || !dt->IsString() || !shape || !shape->IsArray() ||
        !p || !p->IsObject() || !KeysOk(*p, {"binary_data_size"}, false)) {
      return false;
    }
    const Value* size = Member(*p, "binary_data_size");
    if (!size || !size->IsInt64() || size->GetInt64() < 0) return false;
    InTensor in{Str(*name), Str(*dt), {}};
    for (const Value& dim : shape->GetArray()) {
      if (!dim.IsInt64()) return false;
      in.shape.push_back(dim.GetInt64());
    }
    auto n = size_t(size->GetInt64());
    if (n > binary.size() - offset) return false;
    r->inputs.push_back(std::move(in));
    r->raw.push_back(binary.substr(offset, n));
    offset += n;
  }
  if (offset != binary.size()) return false;
  const Value* outputs = Member(d, "outputs");
  if (outputs == nullptr) return binary_out;  // every output, binary only when asked
  if (!outputs->IsArray()) return false;
  for (const Value& o : outputs->GetArray()) {
    if (!o.IsObject() || !KeysOk(o, {"name", "parameters"}, false)) return false;
    const Value* name = Member(o, "name");
    if (!name || !name->IsString()) return false;
    bool bin = binary_out;
    if (const Value* p = Member(o, "parameters")) {
      if (!p->IsObject() || !KeysOk(*p, {"binary_data"}, false)) return false;
      if (const Value* b = Member(*p, "binary_data")) {
        if (!b->IsBool()) return false;
        bin = b->GetBool();
      }
    }
    if (!bin) return false;  // JSON output values: the Python front end writes them
    r->outputs.push_back(Str(*name));
  }
  return !r->outputs.empty() || binary_out;  // none named: every output, as when absent
}

// "/v2/models/{m}/infer" or "/v2/models/{m}/versions/{v}/infer", nothing to decode.
bool InferTarget(std::string_view t, std::string_view* name, std::string_view* version) {
  constexpr std::string_view kPrefix = "/v2/models/", kInfer = "/infer";
  if (t.substr(0, kPrefix.size()) != kPrefix || t.size() <= kPrefix.size() + kInfer.size() ||
      t.substr(t.size() - kInfer.size()) != kInfer) {
    return false;
  }
  if (t.find_first_of("%?#") != std::string_view::npos) return false;
  std::string_view mid = t.substr(kPrefix.size(), t.size() - kPrefix.size() - kInfer.size());
  size_t slash = mid.find('/');
  *name = mid.substr(0, slash);
  *version = std::string_view();
  if (slash == std::string_view::npos) return !name->empty();
  std::string_view rest = mid.substr(slash + 1);
  constexpr std::string_view kVersions = "versions/";
  if (rest.substr(0, kVersions.size()) != kVersions) return false;
  *version = rest.substr(kVersions.size());
  return !name->empty() && !version->empty() && version->find('/') == std::string_view::npos;
}

// Whether an Accept-Encoding value may ask for compression (the Python side compresses then).
bool MayCompress(std::string_view v) {
  std::string s(v);
  for (char& ch : s) ch = char(std::tolower(uint8_t(ch)));
  return s.find("gzip") != std::string::npos || s.find("deflate") != std::string::npos;
}

const char* Reason(int status) {
  switch (status) {
    case 200: return "OK";
    case 400: return "Bad Request";
    case 401: return "Unauthorized";
    case 404: return "Not Found";
    case 429: return "Too Many Requests";
    case 500: return "Internal Server Error";
    default: return "Service Unavailable";
  }
}

// serving/frontend/http/app.py HTTP_STATUS: Triton's status for each error code.
int StatusOf(int code) {
  switch (code) {
    case 3: case 1: return 400;      // INVALID_ARGUMENT, CANCELLED
    case 5: return 404;              // NOT_FOUND
    case 4: case 8: case 14: return 503;  // DEADLINE_EXCEEDED, RESOURCE_EXHAUSTED, UNAVAILABLE
    case 16: return 401;             // UNAUTHENTICATED
    default: return 500;
  }
}

std::string Head(int status, const char* type, size_t length, size_t header_len, bool close) {
  char buf[256];
  int n = std::snprintf(buf, sizeof(buf), "HTTP/1.1 %d %s\r\ncontent-type: %s\r\n", status,
                        Reason(status), type);
  std::string head(buf, size_t(n));
  if (header_len > 0) {
    head.append("inference-header-content-length: ").append(std::to_string(header_len));
    head.append("\r\n");
  }
  head.append("content-length: ").append(std::to_string(length)).append("\r\n");
  if (close) head.append("connection: close\r\n");
  head.append("\r\n");
  return head;
}

// A refusal at the door, held `hold_s` (at most kMaxRefusalHoldS) before it is sent, as the
// gRPC port holds its own (Frontend::Refuse): one connection holds at most one, so the number
// held is bounded by the connections open.
FastResult Hold(HttpCall* call, double hold_s) {
  call->hold_s = std::min(hold_s, kMaxRefusalHoldS);
  return call->hold_s >= kMinRefusalHoldS ? FastResult::kHeld : FastResult::kAnswered;
}

}  // namespace

std::string HttpErrorResponse(int grpc_code, const std::string& message, bool close,
                              int status) {
  rapidjson::StringBuffer sb;
  rapidjson::Writer<rapidjson::StringBuffer> w(sb);
  w.StartObject();
  w.Key("error");
  w.String(message.data(), rapidjson::SizeType(message.size()));
  w.EndObject();
  status = status > 0 ? status : StatusOf(grpc_code);
  std::string out = Head(status, "application/json", sb.GetSize(), 0, close);
  if (status == 401) out.insert(out.size() - 2, "www-authenticate: Bearer\r\n");  // as app.py
  out.append(sb.GetString(), sb.GetSize());
  return out;
}

int HttpServer::TenantOf(const HttpHead& h, const std::vector<std::string>& peer) const {
  int n = 0;
  std::string_view auth = h.Get("authorization", &n);
  return n > 1 ? -1 : fe_->tenants()->Identify(auth, n == 1, peer);
}

FastResult HttpServer::TryFast(std::unique_ptr<HttpCall>* holder, const HttpHead& h,
                               const std::vector<std::string>& peer, std::string* answer) {
  HttpCall& call = **holder;
  std::string_view name, version;
  if (h.method != "POST" || !fe_->Accepting() || !InferTarget(h.target, &name, &version)) {
    return FastResult::kRelay;
  }
  double t_start = MonoNow();
  if (fe_->Tracing()) call.trace = fe_->TraceDecision(h.Get("traceparent"));
  int n = 0, tenant = -1;
  if (!fe_->token().empty()) {  // checked first, as app.py does; repeated: Python reads the last
    std::string_view auth = h.Get("authorization", &n);
    if (n > 1) return FastResult::kRelay;
    if (n == 0 || !BearerMatches(auth, fe_->token())) {  // refused here, not relayed
      denied_++;
      *answer = HttpErrorResponse(16, std::string(kUnauthenticatedHttp), h.close, 401);
      return Hold(&call, kMaxRefusalHoldS);
    }
  }
  if (fe_->tenants() && (tenant = TenantOf(h, peer)) < 0) {  // refused here, not relayed
    fe_->tenants()->CountUnknown();
    *answer = HttpErrorResponse(16, std::string(kUnknownTenantHttp), h.close, 401);
    return Hold(&call, kMaxRefusalHoldS);
  }
  int n_enc = 0, n_accept = 0;  // repeated: Python reads the last one; it decides
  std::string_view enc = h.Get("content-encoding", &n_enc);
  std::string_view accept = h.Get("accept-encoding", &n_accept);
  if (n_enc > 1 || n_accept > 1 || (!enc.empty() && !IEquals(enc, "identity")) ||
      MayCompress(accept)) {
    return FastResult::kRelay;
  }
  std::string_view hl = h.Get("inference-header-content-length", &n);
  std::string_view body(call.bytes.data() + call.body_at, call.bytes.size() - call.body_at);
  if (n != 1 || hl.empty() || hl.size() > 15 ||
      hl.find_first_not_of("0123456789") != std::string_view::npos) {
    return FastResult::kRelay;
  }
  size_t header_len = std::stoull(std::string(hl));
  if (header_len > body.size()) return FastResult::kRelay;
  std::shared_ptr<const Model> m = fe_->Lookup(name, version);
  if (!m || !m->queue) return FastResult::kRelay;
  rapidjson::Document doc;
  // Iterative: a header nested 100,000 deep must not exhaust the stack.
  doc.Parse<rapidjson::kParseValidateEncodingFlag | rapidjson::kParseIterativeFlag>(body.data(),
                                                                                   header_len);
  Request r;
  std::vector<size_t> offsets;
  int64_t rows = 0;
  if (doc.HasParseError() || !doc.IsObject() || !ReadHeader(doc, body.substr(header_len), &r) ||
      !MatchInputs(r, *m, body, fe_->max_rows(), fe_->max_tensor_bytes(), &offsets, &rows) ||
      !MatchOutputs(r, *m, &call.out_index) || rows == 0) {
    return FastResult::kRelay;
  }
  int64_t priority = kDefaultPriority;
  if (tenant >= 0) {
    double retry_s = 0;
    std::string over = fe_->tenants()->Admit(tenant, rows, MonoNow(), &retry_s);
    if (!over.empty()) {
      *answer = HttpErrorResponse(8, over, h.close, 429);
      return Hold(&call, RefusalHold(retry_s));
    }
    priority = EffectivePriority(priority, fe_->tenants()->spec(tenant).priority);
  }
  call.server = this;
  call.model = m;
  call.model_name.assign(name);
  call.id.assign(r.id);
  call.rows = rows;
  call.close = h.close;
  double now = MonoNow();
  double deadline = m->default_timeout_us > 0 ? now + m->default_timeout_us / 1e6 : -1;
  inflight_++;
  std::string why;
  auto base = reinterpret_cast<const uint8_t*>(body.data());
  auto trace = call.trace == 1 ? HttpTrace(h, call.LogId(), t_start) : nullptr;
  switch (m->queue->AddNative(&call, base, rows, offsets, now, deadline, priority, &why,
                              std::move(trace))) {
    case AddResult::kQueued:
      fast_++;
      holder->release();  // the queue holds it until Reply
      return FastResult::kQueued;
    case AddResult::kRefused:
      inflight_--;
      fast_++;
      shed_++;
      *answer = HttpErrorResponse(8, why, h.close);
      return FastResult::kAnswered;
    case AddResult::kInvalid:
      inflight_--;
      fast_++;
      *answer = HttpErrorResponse(3, why, h.close);
      return FastResult::kAnswered;
    case AddResult::kStopping:
    default:
      inflight_--;
      return FastResult::kRelay;
  }
}

void HttpCall::Reply(const std::vector<const uint8_t*>& rows0, const grpc::Status& st,
                     const Generations& gen) {
  std::string response;
  if (!st.ok()) {
    response = HttpErrorResponse(int(st.error_code()), st.error_message(), close);
  } else {
    const Model& m = *model;
    rapidjson::StringBuffer sb;
    rapidjson::Writer<rapidjson::StringBuffer> w(sb);
    w.StartObject();
    w.Key("model_name");
    w.String(model_name.data(), rapidjson::SizeType(model_name.size()));
    w.Key("model_version");
    w.String(m.version.data(), rapidjson::SizeType(m.version.size()));
    w.Key("outputs");
    w.StartArray();
    size_t data_bytes = 0;
    for (int k : out_index) {
      const Spec& s = m.outputs[k];
      w.StartObject();
      w.Key("name");
      w.String(s.name.data(), rapidjson::SizeType(s.name.size()));
      w.Key("datatype");
      w.String(s.datatype.data(), rapidjson::SizeType(s.datatype.size()));
      w.Key("shape");
      w.StartArray();
      w.Int64(rows);
      for (size_t d = 1; d < s.dims.size(); ++d) w.Int64(s.dims[d]);
      w.EndArray();
      w.Key("parameters");
      w.StartObject();
      w.Key("binary_data_size");
      w.Int64(rows * s.row_bytes);
      w.EndObject();
      w.EndObject();
      data_bytes += size_t(rows * s.row_bytes);
    }
    w.EndArray();
    if (!id.empty()) {
      w.Key("id");
      w.String(id.data(), rapidjson::SizeType(id.size()));
    }
    if (gen.hi > 0) {
      std::string params = GenerationParamsJson(gen);
      w.Key("parameters");
      w.RawValue(params.data(), params.size(), rapidjson::kObjectType);
    }
    w.EndObject();
    response = Head(200, "application/octet-stream", sb.GetSize() + data_bytes, sb.GetSize(),
                    close);
    response.reserve(response.size() + sb.GetSize() + data_bytes);
    response.append(sb.GetString(), sb.GetSize());
    for (int k : out_index) {
      response.append(reinterpret_cast<const char*>(rows0[k]), size_t(rows * m.outputs[k].row_bytes));
    }
  }
  std::shared_ptr<Conn> c = std::move(conn);
  HttpServer* s = server;
  bool close_after = close;
  delete this;  // the queue is done with its bytes
  c->Finish(response, close_after);
  s->Answered();
}

std::string HttpCall::LogId() { return id.empty() ? server->fe()->NewRequestId() : id; }

}  // namespace xlaserve::native
