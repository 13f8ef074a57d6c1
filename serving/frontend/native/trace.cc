// Tracing's head decision in the native front ends (serving/telemetry/tracing.py has the rest).
// With tracing on, each ModelInfer (gRPC) and inference POST (HTTP) is decided once, before
// parsing: a client's valid W3C traceparent decides by its sampled flag (parent-based), else
// one draw against the rate. A sampled request the fast path takes into a model's RowQueue
// stays there, carrying a TraceInfo; the queue hands the finished ones to the runner per batch
// (`Traced`), which records their spans from these timestamps. Any other request is relayed
// with the decision ("x-xlaserve-trace: 1" or "0" on gRPC, "<secret> 1" or "<secret> 0" on HTTP;
// any client-sent marker dropped), so Python traces it without drawing again.

#include <ctime>
#include <random>

#include "http.h"
#include "row_queue.h"

namespace xlaserve::native {

double MonoNow() {
  timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return ts.tv_sec + ts.tv_nsec * 1e-9;
}
std::string RandomHex(int digits) {
  std::random_device rd;  // /dev/urandom
  std::string out;
  for (int i = 0; i < digits; ++i) out.push_back("0123456789abcdef"[rd() % 16]);
  return out;
}

namespace {

bool LowerHex(std::string_view s) {
  for (char c : s) {
    if (!((c >= '0' && c <= '9') || (c >= 'a' && c <= 'f'))) return false;
  }
  return true;
}

bool AllZero(std::string_view s) { return s.find_first_not_of('0') == std::string_view::npos; }

// 1 or 0: the sampled flag of a valid traceparent; -1: absent or malformed (then ignored, as
// OpenTelemetry's TraceContextTextMapPropagator ignores it).
int ParentSampled(std::string_view tp) {
  if (tp.empty() || tp.size() > 512) return -1;
  while (!tp.empty() && (tp.front() == ' ' || tp.front() == '\t')) tp.remove_prefix(1);
  if (tp.size() < 55) return -1;
  std::string_view version = tp.substr(0, 2), trace_id = tp.substr(3, 32);
  std::string_view span_id = tp.substr(36, 16), flags = tp.substr(53, 2);
  if (tp[2] != '-' || tp[35] != '-' || tp[52] != '-' || !LowerHex(version) ||
      !LowerHex(trace_id) || !LowerHex(span_id) || !LowerHex(flags) || version == "ff" ||
      AllZero(trace_id) || AllZero(span_id)) {
    return -1;
  }
  std::string_view rest = tp.substr(55);
  if (!rest.empty() && rest.front() == '-') {
    if (version == "00") return -1;  // version 00 has exactly four fields
  } else if (rest.find_first_not_of(" \t") != std::string_view::npos) {
    return -1;
  }
  int low = flags[1] <= '9' ? flags[1] - '0' : flags[1] - 'a' + 10;
  return low & 1;
}

}  // namespace

int Frontend::TraceDecision(std::string_view traceparent) {
  int parent = ParentSampled(traceparent);
  if (parent >= 0) return parent;
  double rate = trace_rate_;
  if (rate <= 0) return 0;
  if (rate >= 1) return 1;
  thread_local std::mt19937_64 rng{std::random_device{}()};
  return std::uniform_real_distribution<double>(0.0, 1.0)(rng) < rate ? 1 : 0;
}

namespace {

std::string_view Metadata(const grpc::GenericServerContext& ctx, const char* key) {
  const auto& md = ctx.client_metadata();
  auto it = md.find(key);
  return it == md.end() ? std::string_view() : std::string_view(it->second.data(), it->second.size());
}

}  // namespace

void Frontend::DecideTrace(Call* c) {
  if (!tracing_ || std::string_view(c->sctx.method()) != kInferMethod) return;
  c->trace = TraceDecision(Metadata(c->sctx, "traceparent"));
  if (c->trace == 1) c->trace_t0 = MonoNow();
}

std::unique_ptr<TraceInfo> Frontend::TraceOf(Call* c) {
  if (c->trace != 1) return nullptr;
  auto t = std::make_unique<TraceInfo>();
  t->name = "ModelInfer " + std::string(c->model_name);
  t->parent = std::string(Metadata(c->sctx, "traceparent"));
  t->state = std::string(Metadata(c->sctx, "tracestate"));
  t->request_id = c->LogId();
  t->t_start = c->trace_t0;
  return t;
}

std::unique_ptr<TraceInfo> HttpTrace(const HttpHead& h, std::string id, double t_start) {
  auto t = std::make_unique<TraceInfo>();
  t->name = "POST " + std::string(h.target.substr(0, h.target.find('?')));
  t->parent = std::string(h.Get("traceparent"));
  t->state = std::string(h.Get("tracestate"));
  t->request_id = std::move(id);
  t->t_start = t_start;
  return t;
}

py::list RowQueue::Traced(const std::shared_ptr<RowBatch>& b) {
  std::vector<std::tuple<std::unique_ptr<TraceInfo>, int64_t, double, double>> got;
  {
    std::lock_guard<std::mutex> l(mu_);
    got.swap(b->traced);
  }
  py::list out;
  for (auto& [t, rows, arrival, queue_s] : got) {
    out.append(py::make_tuple(t->name, t->parent, t->state, t->request_id, rows, t->t_start,
                              arrival, queue_s));
  }
  return out;
}

}  // namespace xlaserve::native
