// Tracing's head decision in the native front ends (serving/telemetry/tracing.py has the rest).
// With tracing on, each ModelInfer (gRPC) and inference POST (HTTP) is decided once, before
// parsing: a client's valid W3C traceparent decides by its sampled flag (parent-based), else
// one draw against the rate. A sampled request is relayed to Python, which answers and traces
// it; the relay tells Python the decision ("x-xlaserve-trace: 1" or "0", any client-sent
// marker dropped), so Python never draws again. Unsampled requests keep the C++ fast path.

#include <random>

#include "frontend.h"
#include "http.h"

namespace xlaserve::native {
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

bool Frontend::SampledForTrace(Call* c) {
  if (!tracing_ || std::string_view(c->sctx.method()) != kInferMethod) return false;
  std::string_view parent;
  const auto& md = c->sctx.client_metadata();
  auto it = md.find("traceparent");
  if (it != md.end()) parent = std::string_view(it->second.data(), it->second.size());
  c->trace = TraceDecision(parent);
  return c->trace == 1;
}

}  // namespace xlaserve::native
