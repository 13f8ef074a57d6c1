// The completion-queue worker threads of the gRPC front end, and read coalescing (opt-in:
// --native-read-coalesce, SetReadCoalesce).
//
// A worker wakes whenever an event is ready: under an open loop of single requests that is once
// per request, and each wake (epoll, a read of a few hundred bytes, a context switch) costs
// about as much as the request's own parsing. A latency target leaves room to wait a little:
// with coalescing on, once nothing is ready, a worker whose calls arrive often enough that a
// pause gathers two or more (rate x interval >= 2, the rate measured over the last 20 ms), and
// with two or more calls open, pauses for the interval instead of blocking, and the requests
// that arrive meanwhile are read, parsed and queued together in one wake, as a network card's
// interrupt moderation does. Below that rate (light load), or with fewer than two calls open
// (one client waiting for each answer before the next, as perf_analyzer at concurrency 1), it
// blocks as before. The interval is 2% of the tightest latency target among the served models
// (200 us for 10 ms), at most 500 us; 0 (no pause) when no model has a target (SetModels).
// Measured on 2 cores with LoadGen at 24-36k 1-row requests/s: 9% less server CPU per request,
// but fewer VALID runs (docs/operations.md, "Read coalescing"), hence off by default.

#include <algorithm>
#include <chrono>
#include <thread>

#include "row_queue.h"

namespace xlaserve::native {

namespace {

constexpr double kCoalesceShare = 0.02;     // of the tightest latency target
constexpr int64_t kCoalesceMaxNs = 500000;  // 500 us whatever the target
constexpr double kCoalesceMinArrivals = 2;  // pause only when a pause gathers this many calls
constexpr std::chrono::milliseconds kRateWindow{20};  // the arrival rate is measured over this

}  // namespace

int64_t CoalesceNs(const Table& table) {
  double slo = 0;
  for (const auto& [key, m] : table) {
    double s = m->queue ? m->queue->LatencySloS() : 0.0;
    if (s > 0 && (slo == 0 || s < slo)) slo = s;
  }
  return std::min<int64_t>(int64_t(slo * kCoalesceShare * 1e9), kCoalesceMaxNs);
}

void Frontend::Poll(grpc::ServerCompletionQueue* cq) {
  using Clock = std::chrono::steady_clock;
  void* raw;
  bool ok;
  bool drained = false;
  int64_t accepted = 0;  // new calls taken since `since`
  int64_t open = 0;  // calls this worker accepted that have not ended (their done tag)
  Clock::time_point since = Clock::now();
  double rate = 0;  // new calls a second, over the last window of at least kRateWindow
  for (;;) {
    // Without coalescing (pause 0, the default) every wait blocks, as gRPC's Next does. With it,
    // a worker takes whatever is ready without waiting and blocks only once nothing is.
    int64_t pause = coalesce_ns_.load(std::memory_order_relaxed);
    bool block = drained || pause == 0;
    auto got = cq->AsyncNext(&raw, &ok, block ? gpr_inf_future(GPR_CLOCK_MONOTONIC)
                                              : gpr_time_0(GPR_CLOCK_MONOTONIC));
    if (got == grpc::CompletionQueue::SHUTDOWN) break;
    if (got == grpc::CompletionQueue::TIMEOUT) {  // nothing ready (coalescing on)
      Clock::time_point now = Clock::now();
      if (now - since >= kRateWindow) {
        rate = double(accepted) / std::chrono::duration<double>(now - since).count();
        accepted = 0;
        since = now;
      }
      drained = open < 2 || rate * double(pause) * 1e-9 < kCoalesceMinArrivals;
      if (!drained) {
        coalesce_pauses_.fetch_add(1, std::memory_order_relaxed);
        std::this_thread::sleep_for(std::chrono::nanoseconds(pause));  // then all that came
      }
      continue;
    }
    drained = false;
    auto* tag = static_cast<Tag*>(raw);
    if (tag->op == kRequest && ok) {
      ++accepted;
      ++open;
    } else if (tag->op == kDone) {
      --open;
    }
    Call* call = tag->call;
    bool release = false;
    try {
      std::lock_guard<std::mutex> l(call->mu);
      call->pending--;
      call->OnEvent(tag->op, ok);
      release = call->Releasable();
    } catch (...) {  // never let a bug take the process down
    }
    if (release) delete call;
  }
}

}  // namespace xlaserve::native
