// The batching decisions (see batcher.h): a line-for-line port of serving/batching/rows.py's
// Batcher and serving/batching/admission.py's checks, messages included.

#include "batcher.h"

#include <algorithm>
#include <cstdio>

namespace xlaserve::native {
namespace {

constexpr double kSmallerBucketGain = 0.15;  // rows.py SMALLER_BUCKET_GAIN
constexpr double kObserveMaxGrowth = 4.0;    // rows.py OBSERVE_MAX_GROWTH

std::string Format(const char* fmt, double a, double b) {
  char buf[256];
  std::snprintf(buf, sizeof(buf), fmt, a, b);
  return buf;
}

}  // namespace

int64_t Plan::rows() const {
  int64_t n = 0;
  for (const auto& s : slices) n += s.rows;
  return n;
}

int64_t Decider::BucketFor(int64_t rows) const {
  auto it = std::lower_bound(p_.buckets.begin(), p_.buckets.end(), rows);
  return it == p_.buckets.end() ? p_.buckets.back() : *it;
}

std::optional<double> Decider::FullBatchSeconds() const {
  if (batch_s_.empty()) return std::nullopt;
  auto it = batch_s_.find(max_batch());
  return it != batch_s_.end() ? it->second : batch_s_.rbegin()->second;
}

int64_t Decider::RowsAhead(int64_t priority) const {
  int64_t ahead = 0;
  for (const auto& [prio, n] : prio_rows_) {
    if (prio <= priority) ahead += n;
  }
  return ahead;
}

std::optional<double> Decider::EstimatedWait(int64_t rows, int64_t priority) const {
  int64_t ahead = RowsAhead(priority);
  auto full = FullBatchSeconds();
  if (ahead == 0 || !full) return std::nullopt;
  int64_t batches = (ahead + rows + max_batch() - 1) / max_batch();
  return double(batches + 2) * *full;
}

double Decider::RowsSeconds(int64_t n, double full_s) const {
  int64_t full = n / max_batch(), part = n % max_batch();
  double k = double(std::max(p_.executors, 1));
  if (!part) return double(full - 1) * full_s / k + full_s;
  auto it = batch_s_.find(BucketFor(part));
  return double(full) * full_s / k + (it != batch_s_.end() ? it->second : full_s);
}

std::optional<double> Decider::EstimatedLatency(int64_t rows, int64_t priority,
                                                double now) const {
  int64_t ahead = RowsAhead(priority);
  auto full = FullBatchSeconds();
  if (ahead == 0 || !full) return std::nullopt;
  double queued = RowsSeconds(ahead + rows, *full);
  auto rate = load_.DrainRate(now);
  if (rate && *rate != 0.0) {
    queued = std::max(queued, double(ahead) / *rate + RowsSeconds(rows, *full));
  }
  double held = free_at_ ? std::max(0.0, *free_at_ - now) : 0.0;
  return held + queued;
}

std::string Decider::Admit(const Entry& e) const {
  if (rows_ + e.rows > p_.max_queue_rows) {
    return "queue full: " + std::to_string(rows_) + " rows queued, " + std::to_string(e.rows) +
           " more would exceed max_queue_rows=" + std::to_string(p_.max_queue_rows) +
           "; retry later or add capacity";
  }
  if (p_.max_queue_requests >= 0 && requests_ >= p_.max_queue_requests) {
    return "queue full: " + std::to_string(p_.max_queue_requests) +
           " requests queued (max_queue_requests); retry later or add capacity";
  }
  if (e.has_deadline) {
    auto wait = EstimatedWait(e.rows, e.priority);
    double left = e.deadline - e.arrival;
    if (wait && *wait > left * (1.0 - p_.deadline_headroom)) {
      return Format("overloaded: the queue ahead needs about %.0f ms of the %.0f ms left before"
                    " the deadline; retry later, with a longer deadline, or add capacity",
                    *wait * 1e3, std::max(left, 0.0) * 1e3);
    }
  }
  double budget = SloBudget(p_);
  if (budget > 0) {
    auto est = EstimatedLatency(e.rows, e.priority, e.arrival);
    if (est && *est > budget) {
      std::string what =
          p_.latency_slo_s > 0
              ? Format("the model's %.0f ms latency target", p_.latency_slo_s * 1e3, 0)
              : Format("the %.0f ms queue-wait bound", budget * 1e3, 0);
      return Format("overloaded: the queue ahead needs about %.0f ms, beyond ", *est * 1e3, 0) +
             what + "; retry later or add capacity";
    }
  }
  return "";
}

void Decider::Add(Entry* e) {
  double bound = p_.QueueWaitBound();
  e->has_expiry = e->has_deadline;
  e->expires = e->deadline;
  if (bound > 0 && (!e->has_expiry || e->arrival + bound < e->expires)) {
    e->has_expiry = true;
    e->expires = e->arrival + bound;
  }
  load_.Arrived(e->arrival, e->rows);
  if (rows_ == 0) hold_end_.reset();  // a new batch begins: it may be held once
  queues_[e->priority].push_back(e);
  requests_ += 1;
  rows_ += e->rows;
  prio_rows_[e->priority] += e->rows;
  if (e->has_expiry && (!next_deadline_ || e->expires < *next_deadline_)) {
    next_deadline_ = e->expires;
  }
}

void Decider::Observe(int64_t bucket, double seconds) {
  if (seconds <= 0) return;
  auto it = observed_s_.find(bucket);
  observed_s_[bucket] =
      it == observed_s_.end()
          ? seconds
          : 0.8 * it->second + 0.2 * std::min(seconds, kObserveMaxGrowth * it->second);
  batch_s_.clear();  // rows.py capped_batch_seconds: at most ceil(b / c) batches of a smaller c
  for (const auto& [b, t] : observed_s_) {
    double capped = t;
    for (const auto& [c, tc] : batch_s_) capped = std::min(capped, double((b + c - 1) / c) * tc);
    batch_s_[b] = capped;
  }
}

void Decider::Took(double now, int64_t bucket, bool idle) {
  auto it = batch_s_.find(bucket);
  double took = it != batch_s_.end() ? it->second : FullBatchSeconds().value_or(0.0);
  if (idle || !free_at_ || *free_at_ < now) {
    if (idle || p_.executors <= 1) free_at_ = now + took;
  } else if (p_.executors <= 1) {
    free_at_ = std::min(*free_at_ + took, now + 2 * took);
  }
}

void Decider::Unqueue(int64_t priority, int64_t rows) {
  rows_ -= rows;
  auto it = prio_rows_.find(priority);
  it->second -= rows;
  if (it->second == 0) prio_rows_.erase(it);
}

void Decider::Remove(const std::unordered_set<Entry*>& doomed) {
  for (auto it = queues_.begin(); it != queues_.end();) {
    auto& q = it->second;
    std::deque<Entry*> kept;
    for (Entry* e : q) {
      if (!doomed.count(e)) {
        kept.push_back(e);
        continue;
      }
      requests_ -= 1;
      if (e->remaining()) Unqueue(it->first, e->remaining());
    }
    if (kept.empty()) {
      it = queues_.erase(it);
    } else {
      q = std::move(kept);
      ++it;
    }
  }
}

std::vector<Entry*> Decider::Drain() {
  std::vector<Entry*> out;
  for (auto& [prio, q] : queues_) out.insert(out.end(), q.begin(), q.end());
  queues_.clear();
  prio_rows_.clear();
  rows_ = requests_ = 0;
  next_deadline_.reset();
  return out;
}

std::optional<double> Decider::OldestArrival() const {
  std::optional<double> oldest;
  for (const auto& [prio, q] : queues_) {
    if (!q.empty() && (!oldest || q.front()->arrival < *oldest)) oldest = q.front()->arrival;
  }
  return oldest;
}

std::optional<int64_t> Decider::HeadPriority() const {
  for (const auto& [prio, q] : queues_) {
    if (!q.empty()) return prio;
  }
  return std::nullopt;
}

std::vector<Entry*> Decider::Expire(double now) {
  std::vector<Entry*> expired;
  if (!next_deadline_ || now < *next_deadline_) return expired;  // nothing can have expired
  std::optional<double> soonest;
  for (auto it = queues_.begin(); it != queues_.end();) {
    std::deque<Entry*> keep;
    for (Entry* e : it->second) {
      if (!e->has_expiry || e->taken) {  // a started request is finished, deadline or not
        keep.push_back(e);
      } else if (e->expires <= now) {
        expired.push_back(e);
        requests_ -= 1;
        Unqueue(it->first, e->remaining());
      } else {
        keep.push_back(e);
        if (!soonest || e->expires < *soonest) soonest = e->expires;
      }
    }
    if (keep.empty()) {
      it = queues_.erase(it);  // empty levels are dropped: priorities are client-chosen
    } else {
      it->second = std::move(keep);
      ++it;
    }
  }
  next_deadline_ = soonest;
  return expired;
}

Decision Decider::Decide(double now, bool idle) {
  Decision d;
  d.expired = Expire(now);
  if (rows_ == 0) return d;
  double oldest = *OldestArrival();
  bool full = rows_ >= max_batch();
  bool timed_out = now - oldest >= p_.max_queue_delay_s;
  // While a batch runs, only a full batch goes ahead (pipelined); a partial one waits for the
  // executor, growing meanwhile.
  if (!(full || (idle && (timed_out || p_.dispatch_when_idle)))) {
    d.wait_s = std::max(0.0, oldest + p_.max_queue_delay_s - now);
    return d;
  }
  if (!full && p_.latency_slo_s > 0 && p_.dispatch_when_idle) {
    double hold = FillWait(now, oldest, rows_, p_.buckets, batch_s_, load_.ArrivalRate(now),
                           p_.latency_slo_s);
    if (hold > 0.0 && (!hold_end_ || now < *hold_end_)) {
      if (!hold_end_) hold_end_ = now + hold;  // held once: when it ends, what came runs
      d.wait_s = *hold_end_ - now;
      return d;
    }
  }
  hold_end_.reset();
  d.plan = Take(full ? max_batch() : Capacity());
  load_.Taken(now, d.plan->rows(), rows_ >= max_batch());
  Took(now, d.plan->bucket, idle);
  d.wait_s = 0.0;
  return d;
}

int64_t Decider::Capacity() const {
  int64_t natural = BucketFor(rows_);
  auto tn = batch_s_.find(natural);
  if (tn == batch_s_.end() || natural == p_.buckets.front()) return max_batch();
  std::vector<int64_t> sizes;  // whole-request prefix sums, in take order, below `natural`
  int64_t total = 0;
  bool done = false;
  for (const auto& [prio, q] : queues_) {
    for (Entry* e : q) {
      total += e->remaining();
      if (total >= natural) {
        done = true;
        break;
      }
      sizes.push_back(total);
    }
    if (done) break;
  }
  int64_t best = max_batch();
  double best_rate = double(rows_) / tn->second * (1.0 + kSmallerBucketGain);
  for (auto b = p_.buckets.rbegin(); b != p_.buckets.rend(); ++b) {  // largest first
    auto t = batch_s_.find(*b);
    if (*b >= natural || t == batch_s_.end()) continue;
    int64_t rows = 0;
    for (int64_t n : sizes) {
      if (n <= *b) rows = std::max(rows, n);
    }
    if (rows && double(rows) / t->second > best_rate) {
      best = rows;
      best_rate = double(rows) / t->second;
    }
  }
  return best;
}

Plan Decider::Take(int64_t capacity) {
  Plan plan;
  int64_t dest = 0;
  for (auto it = queues_.begin(); it != queues_.end();) {
    auto& q = it->second;
    while (!q.empty() && dest < capacity) {
      Entry* e = q.front();
      int64_t n = std::min(e->remaining(), capacity - dest);
      plan.slices.push_back(PlanSlice{e, e->taken, n, dest});
      e->taken += n;
      dest += n;
      Unqueue(it->first, n);
      if (e->remaining() == 0) {
        q.pop_front();
        requests_ -= 1;
      }
    }
    it = q.empty() ? queues_.erase(it) : std::next(it);
    if (dest == capacity) break;
  }
  plan.bucket = BucketFor(dest);
  return plan;
}

}  // namespace xlaserve::native
