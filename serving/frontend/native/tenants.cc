// Tenant identification and quota buckets (tenants.h); mirrors serving/frontend/tenants.py
// decision for decision, message for message.

#include "tenants.h"

#include "frontend.h"

#include <grpcpp/generic/async_generic_service.h>
#include <grpcpp/security/auth_context.h>

#include <algorithm>
#include <cctype>
#include <chrono>
#include <cstdio>
#include <random>

namespace xlaserve::native {
namespace {

// Python's format(v, "g").
std::string G(double v) {
  char buf[64];
  int n = std::snprintf(buf, sizeof(buf), "%g", v);
  return std::string(buf, size_t(n));
}

bool ConstantTimeEquals(std::string_view a, const std::string& b) {
  if (a.size() != b.size()) return false;
  uint8_t diff = 0;
  for (size_t i = 0; i < a.size(); ++i) diff |= uint8_t(a[i]) ^ uint8_t(b[i]);
  return diff == 0;
}

}  // namespace

double RefusalHold(double retry_s) {
  thread_local std::minstd_rand rng(std::random_device{}());
  double u = std::uniform_real_distribution<double>(0.0, 1.0)(rng);
  return std::min(kMaxRefusalHoldS, retry_s * (1.0 + u));
}

int64_t EffectivePriority(int64_t requested, int64_t tenant_priority) {
  if (tenant_priority <= 0) return requested;
  return requested >= kDefaultPriority ? tenant_priority : std::max(requested, tenant_priority);
}

Tenants::Tenants(std::vector<TenantSpec> specs) : specs_(std::move(specs)) {
  states_.resize(specs_.size());
  for (size_t i = 0; i < specs_.size(); ++i) {
    const TenantSpec& s = specs_[i];
    for (const auto& t : s.tokens) tokens_.emplace_back(t, int(i));
    for (const auto& n : s.identities) ids_.emplace(n, int(i));
    index_.emplace(s.name, int(i));
    states_[i].requests.rate = s.requests_per_s;
    states_[i].requests.burst = s.requests_burst;
    states_[i].rows.rate = s.rows_per_s;
    states_[i].rows.burst = s.rows_burst;
  }
  secret_ = RandomHex(32);
}

std::string Tenants::RelayMark(int tenant) const {
  return secret_ + " " + specs_[size_t(tenant)].name;
}

int Tenants::FromRelayMark(std::string_view mark) const {
  if (mark.size() <= secret_.size() + 1 || mark[secret_.size()] != ' ') return -1;
  if (!ConstantTimeEquals(mark.substr(0, secret_.size()), secret_)) return -1;
  return Index(mark.substr(secret_.size() + 1));
}

int Tenants::Identify(std::string_view v, bool has_auth,
                      const std::vector<std::string>& identities) const {
  if (has_auth) {  // as serving/frontend/auth.py bearer_matches: "<scheme> <token>", stripped
    auto sp = v.find(' ');
    std::string_view scheme = v.substr(0, sp == std::string_view::npos ? v.size() : sp);
    std::string_view tok = sp == std::string_view::npos ? std::string_view() : v.substr(sp + 1);
    while (!tok.empty() && std::isspace(uint8_t(tok.front()))) tok.remove_prefix(1);
    while (!tok.empty() && std::isspace(uint8_t(tok.back()))) tok.remove_suffix(1);
    bool bearer = scheme.size() == 6;
    for (size_t i = 0; bearer && i < 6; ++i) {
      bearer = std::tolower(uint8_t(scheme[i])) == "bearer"[i];
    }
    if (bearer) {
      int found = -1;
      for (const auto& [token, t] : tokens_) {  // every token compared: constant time
        if (ConstantTimeEquals(tok, token) && found < 0) found = t;
      }
      if (found >= 0) return found;
    }
  }
  for (const auto& n : identities) {
    auto it = ids_.find(n);
    if (it != ids_.end()) return it->second;
  }
  return -1;
}

int Tenants::Of(const grpc::GenericServerContext& ctx) const {
  std::string_view auth;
  bool has_auth = false;
  for (const auto& [key, value] : ctx.client_metadata()) {
    if (std::string_view(key.data(), key.size()) != "authorization") continue;
    auth = std::string_view(value.data(), value.size());
    has_auth = true;
    break;
  }
  std::vector<std::string> names;
  if (!ids_.empty()) {  // a certificate counts when the token is no tenant's
    auto ac = ctx.auth_context();
    if (ac) {
      for (const char* prop : {GRPC_X509_CN_PROPERTY_NAME, GRPC_X509_SAN_PROPERTY_NAME}) {
        for (const auto& v : ac->FindPropertyValues(prop)) names.emplace_back(v.data(), v.size());
      }
    }
  }
  return Identify(auth, has_auth, names);
}

void Tenants::Bucket::Refill(double now) {
  if (primed && now > last) tokens = std::min(burst, tokens + (now - last) * rate);
  if (!primed) tokens = burst;
  if (!primed || now > last) last = now;
  primed = true;
}

std::string Tenants::Admit(int tenant, int64_t rows, double now, double* retry_s) {
  const TenantSpec& t = specs_[size_t(tenant)];
  std::lock_guard<std::mutex> l(mu_);
  State& s = states_[size_t(tenant)];
  std::string why;
  if (t.requests_per_s > 0) {
    s.requests.Refill(now);
    if (s.requests.tokens < 1) {
      why = "tenant '" + t.name + "' is over its quota of " + G(t.requests_per_s) + " requests/s";
      if (retry_s) *retry_s = (1 - s.requests.tokens) / s.requests.rate;
    }
  }
  if (t.rows_per_s > 0 && why.empty()) {
    s.rows.Refill(now);
    if (double(rows) > s.rows.burst) {
      why = "tenant '" + t.name + "' sent " + std::to_string(rows) +
            " rows in one request, more than its burst of " + G(t.rows_burst) + " rows (" +
            G(t.rows_per_s) + " rows/s)";
    } else if (s.rows.tokens < double(rows)) {
      why = "tenant '" + t.name + "' is over its quota of " + G(t.rows_per_s) + " rows/s";
      if (retry_s) *retry_s = (double(rows) - s.rows.tokens) / s.rows.rate;
    }
  }
  if (!why.empty()) {
    s.over++;
    return why;
  }
  if (t.requests_per_s > 0) s.requests.tokens -= 1;
  if (t.rows_per_s > 0) s.rows.tokens -= double(rows);
  s.admitted++;
  return why;
}

int Tenants::Index(std::string_view name) const {
  auto it = index_.find(std::string(name));
  return it == index_.end() ? -1 : it->second;
}

std::vector<std::pair<int64_t, int64_t>> Tenants::Counts() {
  std::lock_guard<std::mutex> l(mu_);
  std::vector<std::pair<int64_t, int64_t>> out;
  for (const auto& s : states_) out.emplace_back(s.admitted, s.over);
  return out;
}

// -- the gRPC fast path's charge (frontend.h) ----------------------------------------------------

bool Frontend::RefuseUnknown(Call* c) {
  // Refused here, not relayed: a flood of bad credentials costs no more than one over quota.
  tenants_->CountUnknown();
  Refuse(c, grpc::Status(grpc::StatusCode::UNAUTHENTICATED, std::string(kUnknownTenant)),
         kMaxRefusalHoldS);
  return true;
}

bool Frontend::OverQuota(Call* c, int64_t rows, int64_t* priority) {
  double retry_s = 0;
  std::string why = tenants_->Admit(c->tenant, rows, MonoNow(), &retry_s);
  if (why.empty()) {
    *priority = EffectivePriority(*priority, tenants_->spec(c->tenant).priority);
    return false;
  }
  Refuse(c, grpc::Status(grpc::StatusCode::RESOURCE_EXHAUSTED, why), RefusalHold(retry_s));
  return true;
}

// A refusal is answered `hold_s` later: an over-quota one when the quota would admit the request
// again (RefusalHold), one for bad credentials kMaxRefusalHoldS later (as logins delay a failed
// attempt); at most kMaxRefusalHoldS, and within half the time left before the call's deadline.
// A client that retries at once is then admitted, and one flooding with a fixed number of calls
// in flight sends about that many per refill instead of spinning the cores (refused within
// microseconds, it took a polite tenant's p99 on 2 cores to 2.4x its solo figure). Held calls
// keep no request bytes; past kMaxHeldRefusals (a flood that does not wait for its answers)
// refusals go out at once.
void Frontend::Refuse(Call* c, const grpc::Status& st, double hold_s) {
  constexpr int64_t kMaxHeldRefusals = 4096;
  auto now = std::chrono::system_clock::now();
  double hold = std::min(hold_s, kMaxRefusalHoldS);
  auto dl = c->sctx.deadline();
  if (dl < std::chrono::system_clock::time_point::max() - std::chrono::hours(24 * 365)) {
    hold = std::min(hold, std::chrono::duration<double>(dl - now).count() / 2);
  }
  if (hold < kMinRefusalHoldS || held_refusals_.fetch_add(1) >= kMaxHeldRefusals) {
    if (hold >= kMinRefusalHoldS) held_refusals_--;
    c->stream.Finish(st, c->T(kSFinish));
    return;
  }
  c->in.Clear();
  c->message = grpc::Slice();
  c->held_status = st;
  c->held = std::make_unique<grpc::Alarm>();
  c->held->Set(c->cq, now + std::chrono::microseconds(int64_t(hold * 1e6)), c->T(kSHeld));
}

}  // namespace xlaserve::native
