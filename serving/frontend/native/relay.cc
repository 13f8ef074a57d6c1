// A call's completion-queue events. The first message read decides: a ModelInfer the fast
// path takes is queued for Python (module.cc); anything else is relayed byte for byte, with
// metadata and deadline, through a GenericStub to the Python servicer on its internal address,
// and the backend's messages, trailing metadata and status come back to the client unchanged.

#include <chrono>
#include <memory>
#include <string>
#include <string_view>

#include "frontend.h"
#include "http.h"
#include "tenants.h"

namespace xlaserve::native {

Call::Call(Frontend* f, grpc::ServerCompletionQueue* q) : fe(f), cq(q) {
  for (int i = 0; i < kOps; ++i) tags[i] = Tag{this, Op(i)};
  fe->live_calls_++;
}

Call::~Call() {
  if (counted) fe->relaying_--;
  fe->live_calls_--;
}

void Frontend::Accepted(Call* c) {
  // Only unary ModelInfer calls count: their message comes with the call, while a stream's
  // first message may come much later, and idle streams must not stop new calls.
  c->unread = std::string_view(c->sctx.method()) == kInferMethod;
  if (!c->unread || unread_.fetch_add(1) < max_unread_) {
    Spawn(c->cq);
    return;
  }
  std::lock_guard<std::mutex> l(owed_mu_);
  owed_.push_back(c->cq);
}

void Frontend::FirstRead(Call* c) {
  if (!c->unread) return;
  c->unread = false;
  unread_--;
  grpc::ServerCompletionQueue* cq = nullptr;
  {
    std::lock_guard<std::mutex> l(owed_mu_);
    if (owed_.empty()) return;
    cq = owed_.back();
    owed_.pop_back();
  }
  Spawn(cq);
}

int64_t Frontend::Inflight() {
  // Read in the order calls move between the counts (entering -> queued/claimed -> relayed),
  // so a call in transit is never missed.
  int64_t n = entering_;
  {
    std::lock_guard<std::mutex> l(qmu_);  // Claim moves a call from inflight_ to busy_ under it
    n += inflight_ + busy_;
  }
  return n + relaying_ + (http_ ? http_->Inflight() : 0);
}

// -- call events (call->mu held) -----------------------------------------------------------------

void Call::OnEvent(Op op, bool ok) {
  switch (op) {
    case kRequest:
      if (!ok) return;  // shutting down; the done tag never comes for a call that never started
      started = true;
      ++pending;  // the done tag
      fe->Accepted(this);
      stream.Read(&in, T(kSRead));
      s_reading = true;
      return;
    case kDone:
      done = true;
      if (cctx && sctx.IsCancelled()) cctx->TryCancel();
      return;
    case kSRead:
      s_reading = false;
      if (!relaying) {  // the first message
        fe->FirstRead(this);
        fe->entering_++;  // until it is queued, refused or counted as relayed (Inflight)
        bool fast = false;
        if (ok) {
          fe->DecideTrace(this);  // tracing: the head decision, before the fast path
          try {
            fast = fe->TryFast(this);
          } catch (...) {
            fast = false;
          }
        }
        if (!fast && ok && !fe->Accepting() && std::string_view(sctx.method()) == kInferMethod) {
          fe->refused_++;
          stream.Finish(grpc::Status(grpc::StatusCode::UNAVAILABLE, kShuttingDown), T(kSFinish));
        } else if (!fast) {
          fe->relayed_++;
          StartRelay(ok);
        }
        fe->entering_--;
        return;
      }
      if (ok) {
        up_pending = true;
      } else {
        up_closed = true;
      }
      PumpUp();
      return;
    case kSWrite:
      if (!ok && !s_dead) {
        s_dead = true;
        cctx->TryCancel();
      }
      cstream->Read(&down, T(kCRead));
      return;
    case kSFinish:
      return;
    case kSHeld:  // an over-quota refusal held until its quota refilled (tenants.cc)
      fe->held_refusals_--;
      stream.Finish(held_status, T(kSFinish));
      return;
    default:  // the relay's client stream
      OnBackendEvent(op, ok);
      return;
  }
}

// Events of the relay's client stream to the Python servicer.
void Call::OnBackendEvent(Op op, bool ok) {
  switch (op) {
    case kCStart:
      if (!ok) {
        c_failed = true;
        c_read_done = true;
        MaybeFinishBackend();
        return;
      }
      c_started = true;
      PumpUp();
      cstream->Read(&down, T(kCRead));
      return;
    case kCWrite:
      c_writing = false;
      if (!ok) {
        c_failed = true;  // the backend call is over; its status says why
      } else if (!up_closed && !s_reading) {
        stream.Read(&in, T(kSRead));
        s_reading = true;
      }
      PumpUp();
      MaybeFinishBackend();
      return;
    case kCWritesDone:
      c_writing = false;
      MaybeFinishBackend();
      return;
    case kCRead:
      if (!ok) {
        c_read_done = true;
        MaybeFinishBackend();
        return;
      }
      if (s_dead) {
        cstream->Read(&down, T(kCRead));
      } else {
        stream.Write(down, T(kSWrite));
      }
      return;
    case kCFinish: {
      for (const auto& [k, v] : cctx->GetServerTrailingMetadata()) {
        std::string key(k.data(), k.size());
        if (key.rfind("grpc-", 0) == 0) continue;
        sctx.AddTrailingMetadata(key, std::string(v.data(), v.size()));
      }
      stream.Finish(cstatus, T(kSFinish));
      return;
    }
    default:
      return;
  }
}

void Call::StartRelay(bool have_first) {
  relaying = true;
  if (!counted && std::string_view(sctx.method()) == kInferMethod) {
    counted = true;  // before the caller stops counting it as entering or claimed
    fe->relaying_++;
  }
  up_pending = have_first;
  up_closed = !have_first;
  cctx = std::make_unique<grpc::ClientContext>();
  auto dl = sctx.deadline();
  if (dl < std::chrono::system_clock::time_point::max() - std::chrono::hours(24 * 365)) {
    cctx->set_deadline(dl);
  }
  for (const auto& [k, v] : sctx.client_metadata()) {
    std::string key(k.data(), k.size());
    if (key.empty() || key[0] == ':' || key.rfind("grpc-", 0) == 0 || key == "user-agent" ||
        key == "te" || key == "content-type" || key == "host" || key == kTraceMarker ||
        key == kShadowMarker || key == kTenantMarker) {
      continue;
    }
    bool valid = true;
    for (char ch : key) {
      valid = valid && ((ch >= 'a' && ch <= 'z') || (ch >= '0' && ch <= '9') || ch == '-' ||
                        ch == '_' || ch == '.');
    }
    if (valid) cctx->AddMetadata(key, std::string(v.data(), v.size()));
  }
  if (trace >= 0) cctx->AddMetadata(std::string(kTraceMarker), trace ? "1" : "0");
  if (shadow) cctx->AddMetadata(std::string(kShadowMarker), "1");
  if (Tenants* ts = fe->tenants()) {  // the tenant it identified (a certificate's, too)
    if (tenant < 0) tenant = ts->Of(sctx);
    if (tenant >= 0) cctx->AddMetadata(std::string(kTenantMarker), ts->spec(tenant).name);
  }
  cstream = fe->stub()->PrepareCall(cctx.get(), std::string(sctx.method()), cq);
  if (!cstream) {
    cstatus = grpc::Status(grpc::StatusCode::UNAVAILABLE, "internal relay unavailable");
    stream.Finish(cstatus, T(kSFinish));
    return;
  }
  cstream->StartCall(T(kCStart));
  if (done && sctx.IsCancelled()) cctx->TryCancel();
}

void Call::PumpUp() {
  if (c_failed || c_read_done || c_writing || !c_started) return;
  if (up_pending) {
    up_pending = false;
    c_writing = true;
    cstream->Write(in, T(kCWrite));
  } else if (up_closed && !writes_done) {
    writes_done = true;
    c_writing = true;
    cstream->WritesDone(T(kCWritesDone));
  }
}

void Call::MaybeFinishBackend() {
  if (c_read_done && !c_writing && !c_finishing) {
    c_finishing = true;
    cstream->Finish(&cstatus, T(kCFinish));
  }
}

}  // namespace xlaserve::native
