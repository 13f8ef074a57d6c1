// Tenants and their quotas in C++ (tenants.cc): the same identification and token buckets as
// serving/frontend/tenants.py (TenantTable), checked against the same table of cases
// (tests/serving/frontend/tenant_cases.py). The gRPC and HTTP fast paths decide a request's
// tenant and charge its buckets here, after parsing, where its rows are known; Python's relayed
// path charges the same object through its binding, so every path shares one set of buckets.

#ifndef XLASERVE_SERVING_FRONTEND_NATIVE_TENANTS_H_
#define XLASERVE_SERVING_FRONTEND_NATIVE_TENANTS_H_

#include <atomic>
#include <cstdint>
#include <mutex>
#include <string>
#include <string_view>
#include <unordered_map>
#include <vector>

namespace grpc {
class GenericServerContext;
}

namespace xlaserve::native {

// One tenant as Python parsed it; a rate of 0 means no bucket; priority 0: the request's own.
struct TenantSpec {
  std::string name;
  std::vector<std::string> tokens, identities;
  double requests_per_s = 0, requests_burst = 0, rows_per_s = 0, rows_burst = 0;
  int64_t priority = 0;
};

inline constexpr int64_t kDefaultPriority = int64_t(1) << 30;  // a request without a priority
inline constexpr std::string_view kTenantMarker = "x-xlaserve-tenant";  // relay -> Python
// An inference request no tenant's credentials match: refused UNAUTHENTICATED (HTTP 401) here,
// with the message the Python gate gives (serving/frontend/tenant_gate.py UNKNOWN, http/app.py),
// instead of a relay round trip.
inline constexpr std::string_view kUnknownTenant =
    "no tenant has these credentials: send metadata 'authorization: Bearer <token>' with a"
    " tenant's token, or a client certificate naming one of its identities";
inline constexpr std::string_view kUnknownTenantHttp =  // serving/frontend/http/app.py's
    "no tenant has these credentials: send the header 'Authorization: Bearer <token>' with a"
    " tenant's token, or (HTTPS through the native front end) a client certificate naming one"
    " of its identities";

// A refusal at the door is answered at most this long after (Frontend::Refuse, HttpServer::Later).
inline constexpr double kMaxRefusalHoldS = 0.1;
// A hold shorter than this is not worth a timer: the refusal is answered at once.
inline constexpr double kMinRefusalHoldS = 1e-3;
// How long to hold an over-quota refusal whose quota admits the request again in `retry_s`:
// that, plus up to as long again at random, so the calls a flood had refused together do not all
// come back at the same instant; at most kMaxRefusalHoldS.
double RefusalHold(double retry_s);

// A request's priority under its tenant's (tenants.py effective_priority).
int64_t EffectivePriority(int64_t requested, int64_t tenant_priority);

class Tenants {
 public:
  explicit Tenants(std::vector<TenantSpec> specs);

  // The tenant of a bearer Authorization value (has_auth: one was sent), else of the first of
  // the peer's certificate names that is a tenant's; -1 for none. Tokens compared in constant time.
  int Identify(std::string_view authorization, bool has_auth,
               const std::vector<std::string>& identities) const;
  // A gRPC call's tenant: its first authorization header, else its client certificate's CN and
  // SANs (mutual TLS); -1 for none.
  int Of(const grpc::GenericServerContext& ctx) const;
  // The HTTP relay's mark of `tenant` for Python ("<secret> <name>"), and the tenant of a mark
  // (-1: not one of ours). The secret is drawn per table, so a client cannot forge a mark even
  // through a connection the relay tunnels unparsed (http_relay.cc).
  std::string RelayMark(int tenant) const;
  int FromRelayMark(std::string_view mark) const;
  // Charges one request of `rows` at `now` (seconds, CLOCK_MONOTONIC): "" admitted, else why
  // not (nothing charged), and with `retry_s` the seconds until the quota would admit it (0:
  // never, more rows than the burst). Thread-safe.
  std::string Admit(int tenant, int64_t rows, double now, double* retry_s = nullptr);
  int Index(std::string_view name) const;
  const TenantSpec& spec(int tenant) const { return specs_[size_t(tenant)]; }
  size_t size() const { return specs_.size(); }
  // Per tenant: (requests admitted, requests refused over quota).
  std::vector<std::pair<int64_t, int64_t>> Counts();
  // Calls refused here for want of a tenant (xlaserve_tenant_unknown_total with Python's).
  void CountUnknown() { unknown_.fetch_add(1, std::memory_order_relaxed); }
  int64_t Unknown() const { return unknown_.load(std::memory_order_relaxed); }

 private:
  struct Bucket {
    double rate = 0, burst = 0, tokens = 0, last = 0;
    bool primed = false;
    void Refill(double now);
  };
  struct State {
    Bucket requests, rows;
    int64_t admitted = 0, over = 0;
  };
  std::vector<TenantSpec> specs_;
  std::vector<std::pair<std::string, int>> tokens_;  // token, tenant
  std::unordered_map<std::string, int> ids_, index_;
  std::string secret_;  // RelayMark's: 32 random hex digits
  std::atomic<int64_t> unknown_{0};
  std::mutex mu_;
  std::vector<State> states_;
};

}  // namespace xlaserve::native

#endif  // XLASERVE_SERVING_FRONTEND_NATIVE_TENANTS_H_
