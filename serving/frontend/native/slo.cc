// Scheduling by a latency target (see batcher.h): a port of serving/batching/slo.py, the load a
// queue sees (LoadMeter) and what the target allows (SloBudget, FillWait).

#include <algorithm>
#include <cmath>

#include "batcher.h"

namespace xlaserve::native {
namespace {

constexpr double kRateWindowS = 0.1;         // slo.py RATE_WINDOW_S
constexpr double kSloHeadroom = 0.2;         // slo.py SLO_HEADROOM
constexpr double kMaxFillShare = 0.1;        // slo.py MAX_FILL_SHARE
constexpr double kHoldUtilization = 0.5;     // slo.py HOLD_UTILIZATION
constexpr double kDrainSmoothing = 0.2;      // slo.py DRAIN_SMOOTHING
constexpr int kDrainMinSamples = 4;          // slo.py DRAIN_MIN_SAMPLES
constexpr double kDrainMaxGrowth = 4.0;      // slo.py DRAIN_MAX_GROWTH
constexpr double kDrainStaleS = 1.0;         // slo.py DRAIN_STALE_S

}  // namespace

double SloBudget(const BatchingParams& p) {
  return p.latency_slo_s > 0 ? p.latency_slo_s * (1.0 - kSloHeadroom) : p.max_queue_wait_s;
}

double FillWait(double now, double oldest, int64_t queued, const std::vector<int64_t>& buckets,
                const std::map<int64_t, double>& batch_s, double rate, double slo) {
  if (rate <= 0.0 || queued <= 0) return 0.0;
  auto own = std::lower_bound(buckets.begin(), buckets.end(), queued);
  if (own == buckets.end()) return 0.0;
  auto t_own = batch_s.find(*own);
  if (t_own == batch_s.end()) return 0.0;
  double best_wait = 0.0, best_share = rate * t_own->second / double(queued);
  if (best_share <= kHoldUtilization) return 0.0;
  double age = now - oldest;
  for (int64_t bucket : buckets) {
    auto t = batch_s.find(bucket);
    if (bucket <= queued || t == batch_s.end()) continue;
    double wait = double(bucket - queued) / rate;
    if (age + wait > slo * kMaxFillShare || age + wait + t->second > slo * (1.0 - kSloHeadroom)) {
      break;  // larger buckets take longer to fill and to run
    }
    double share = rate * t->second / double(bucket);
    if (share < best_share) {
      best_wait = wait;
      best_share = share;
    }
    if (share <= kHoldUtilization) break;
  }
  return best_wait;
}

void LoadMeter::Arrived(double t, int64_t rows) {
  if (!any_arrival_) {
    any_arrival_ = true;
    arrived_ = double(rows);
    arrived_t_ = t;
    return;
  }
  if (t > arrived_t_) {
    arrived_ *= std::exp((arrived_t_ - t) / kRateWindowS);
    arrived_t_ = t;
  }
  arrived_ += double(rows);
}

double LoadMeter::ArrivalRate(double now) const {
  if (!any_arrival_) return 0.0;
  return arrived_ * std::exp(std::min(0.0, arrived_t_ - now) / kRateWindowS) / kRateWindowS;
}

void LoadMeter::Taken(double now, int64_t rows, bool backlogged) {
  if (any_take_ && backlogged_ && now > take_t_) {
    double dt = now - take_t_;
    if (!any_drain_ || now - drain_t_ > kDrainStaleS) {  // first, or measured on other traffic
      any_drain_ = true;
      drain_rows_ = double(rows);
      drain_dt_ = dt;
      drain_samples_ = 0;
    } else {
      drain_rows_ += kDrainSmoothing * (double(rows) - drain_rows_);
      drain_dt_ += kDrainSmoothing * (std::min(dt, kDrainMaxGrowth * drain_dt_) - drain_dt_);
    }
    drain_samples_ += 1;
    drain_t_ = now;
  }
  if (!any_take_ || now > take_t_) take_t_ = now;
  any_take_ = true;
  backlogged_ = backlogged;
}

std::optional<double> LoadMeter::DrainRate(double now) const {
  if (!any_drain_ || drain_samples_ < kDrainMinSamples || now - drain_t_ > kDrainStaleS) {
    return std::nullopt;
  }
  return drain_rows_ / drain_dt_;
}

}  // namespace xlaserve::native
