// The batching decisions of serving/batching/rows.py (`Batcher`), in C++ so the native front end
// queues, admits and plans batches without entering Python per request. Plain C++: no gRPC, no
// Python; tests drive it through a small binding (`_native.Decider`) with the same cases as the
// Python Batcher, and both must agree on a shared table of cases while both exist.
//
// Policy (see rows.py for the reasoning): requests wait in priority order (lower first, FIFO
// within a priority); a full batch (largest bucket) goes at once; a partial batch only when the
// executor is idle (at once with dispatch_when_idle, else after max_queue_delay_s); a partial
// batch runs in the bucket that moves the most queued rows per second of measured batch time;
// requests larger than the largest bucket are split; expired requests are never planned.
// Admission refuses at the door on queue bounds and on deadlines the queue cannot meet.
// With a latency target (serving/batching/slo.py): admission by the estimated finish against
// the target's budget, a queue-wait bound, and a brief hold of a partial batch to fill it.

#ifndef XLASERVE_SERVING_FRONTEND_NATIVE_BATCHER_H_
#define XLASERVE_SERVING_FRONTEND_NATIVE_BATCHER_H_

#include <cstdint>
#include <deque>
#include <map>
#include <optional>
#include <string>
#include <unordered_set>
#include <vector>

namespace xlaserve::native {

struct BatchingParams {
  std::vector<int64_t> buckets;  // strictly increasing, positive (checked by BatchingConfig)
  double max_queue_delay_s = 0.002;
  bool dispatch_when_idle = true;
  int64_t max_queue_rows = 65536;
  int64_t max_queue_requests = -1;  // < 0: bounded by rows only
  double deadline_headroom = 0.5;
  double latency_slo_s = 0;     // <= 0: no latency target
  double max_queue_wait_s = 0;  // <= 0: unbounded (without a target)
  int executors = 1;             // full batches that run at once (the runner's instances)
  // The latency target when set, else max_queue_wait_s; <= 0: unbounded.
  double QueueWaitBound() const { return latency_slo_s > 0 ? latency_slo_s : max_queue_wait_s; }
};

// slo.py slo_budget_s (slo.cc): the latency target less headroom, else the queue-wait bound;
// <= 0 means no bound.
double SloBudget(const BatchingParams& p);

// slo.py fill_wait_s (slo.cc): seconds worth holding a partial batch for arrivals; 0: run now.
double FillWait(double now, double oldest, int64_t queued, const std::vector<int64_t>& buckets,
                const std::map<int64_t, double>& batch_s, double rate, double slo);

// Arrival and drain rates of one queue (slo.py's LoadMeter; slo.cc).
class LoadMeter {
 public:
  void Arrived(double t, int64_t rows);
  double ArrivalRate(double now) const;
  void Taken(double now, int64_t rows, bool backlogged);
  std::optional<double> DrainRate(double now) const;

 private:
  double arrived_ = 0, arrived_t_ = 0, take_t_ = 0, drain_rows_ = 0, drain_dt_ = 0;
  double drain_t_ = 0;  // the last drain sample's time
  bool any_arrival_ = false, any_take_ = false, backlogged_ = false, any_drain_ = false;
  int drain_samples_ = 0;
};

// One queued request as the decisions see it.
struct Entry {
  int64_t rows = 0;
  int64_t taken = 0;  // rows already placed into batches
  double arrival = 0;
  bool has_deadline = false;
  double deadline = 0;
  int64_t priority = 0;
  bool has_expiry = false;  // unstarted past `expires`, it fails: its deadline or wait bound
  double expires = 0;
  bool ExpiredByDeadline() const { return has_deadline && deadline == expires; }
  int64_t remaining() const { return rows - taken; }
  virtual ~Entry() = default;
};

// Rows [start, start + rows) of `entry` go to batch rows [dest, dest + rows).
struct PlanSlice {
  Entry* entry;
  int64_t start, rows, dest;
  bool last() const { return start + rows == entry->rows; }
};

struct Plan {
  int64_t bucket = 0;
  std::vector<PlanSlice> slices;
  int64_t rows() const;
};

struct Decision {
  std::optional<Plan> plan;
  std::vector<Entry*> expired;
  std::optional<double> wait_s;  // none: sleep until something new arrives
};

class Decider {
 public:
  explicit Decider(BatchingParams params) : p_(std::move(params)) {}

  const BatchingParams& params() const { return p_; }
  int64_t max_batch() const { return p_.buckets.back(); }
  int64_t BucketFor(int64_t rows) const;  // smallest bucket holding `rows` (<= max_batch)

  // "" when `e` may be queued, else the refusal message (queue bounds or deadline).
  std::string Admit(const Entry& e) const;
  void Add(Entry* e);  // after Admit returned ""
  void Observe(int64_t bucket, double seconds);
  std::optional<double> EstimatedWait(int64_t rows, int64_t priority) const;
  std::optional<double> EstimatedLatency(int64_t rows, int64_t priority, double now) const;

  Decision Decide(double now, bool idle);
  std::vector<Entry*> Expire(double now);
  void Remove(const std::unordered_set<Entry*>& doomed);
  std::vector<Entry*> Drain();

  std::optional<double> OldestArrival() const;
  std::optional<int64_t> HeadPriority() const;
  int64_t queued_rows() const { return rows_; }
  int64_t queued_requests() const { return requests_; }
  const std::map<int64_t, double>& batch_seconds() const { return batch_s_; }

 private:
  std::optional<double> FullBatchSeconds() const;
  int64_t RowsAhead(int64_t priority) const;
  double RowsSeconds(int64_t n, double full_s) const;  // n rows as full batches and a partial
  void Took(double now, int64_t bucket, bool idle);     // rows.py _took
  void Unqueue(int64_t priority, int64_t rows);
  int64_t Capacity() const;
  Plan Take(int64_t capacity);

  BatchingParams p_;
  std::map<int64_t, std::deque<Entry*>> queues_;  // by priority, lowest first
  std::map<int64_t, int64_t> prio_rows_;           // queued rows per priority
  int64_t rows_ = 0, requests_ = 0;
  std::optional<double> next_deadline_;  // no unstarted request expires before (may be early)
  std::map<int64_t, double> observed_s_;  // smoothed seconds a batch occupied the executor
  std::map<int64_t, double> batch_s_;     // the same, capped sub-additively (rows.py)
  LoadMeter load_;
  std::optional<double> free_at_;  // when the executor finishes what it took (projected)
  std::optional<double> hold_end_;  // the hold for the next batch ends then (one per batch)
};

}  // namespace xlaserve::native

#endif  // XLASERVE_SERVING_FRONTEND_NATIVE_BATCHER_H_
