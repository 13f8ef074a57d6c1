// One plain batched model's request queue, in C++: the native front end puts parsed ModelInfer
// requests straight into it (admission included, no Python), the Python servicer and the HTTP
// front end put their decoded requests into the same queue, and the model's Python runner
// threads take whole batches out of it: one contiguous, reused staging buffer per input, filled
// here. The runner enters Python once per batch: dispatch, fetch, and `Complete`, which splits
// the outputs and answers every native request in C++ (encoding its response); Python requests
// come back to the runner to be delivered through their sinks.

#ifndef XLASERVE_SERVING_FRONTEND_NATIVE_ROW_QUEUE_H_
#define XLASERVE_SERVING_FRONTEND_NATIVE_ROW_QUEUE_H_

#include "batcher.h"
#include "frontend.h"

namespace xlaserve::native {

// A queued request: native (its call is held until answered) or Python (an InferRequest).
struct QEntry : Entry {
  Responder* native = nullptr;       // a native request (gRPC or HTTP)
  PyObject* py = nullptr;            // a new reference, handed back to Python when answered
  std::vector<PyObject*> arrays;     // a Python request's input arrays (references)
  std::vector<const uint8_t*> in;    // per input: row 0 of this request
  int64_t rows_done = 0;
  int64_t queue_ns = 0;              // waited before its first slice was taken
  int inflight = 0;                  // slices in batches not yet completed
  bool queued = true;                // still held by the decider
  bool answered = false;             // native: call finished; Python: handed back
  std::vector<std::string> out;      // a split native request's outputs, assembled here
  Generations gen;                   // params generations its completed slices ran at
  std::unique_ptr<TraceInfo> trace;  // sampled for tracing (native only)
};

// A staging buffer for one input of one bucket, 64-byte aligned, reused across batches.
struct Staging {
  uint8_t* data = nullptr;
  size_t size = 0;
  explicit Staging(size_t n);
  ~Staging();
};

class RowQueue;

// One planned batch, as the runner sees it: its bucket and input arrays (views of staging).
struct RowBatch {
  std::shared_ptr<RowQueue> q;
  int instance = 0;
  int64_t bucket = 0, rows = 0;
  std::vector<PlanSlice> slices;
  std::vector<std::unique_ptr<Staging>> inputs;
  double t_taken = 0;
  bool settled = false;  // completed, failed or isolated
  // Traced native requests it finished: (record, rows, arrival, queue seconds); trace.cc.
  std::vector<std::tuple<std::unique_ptr<TraceInfo>, int64_t, double, double>> traced;
  ~RowBatch();
};

struct QueueStats {
  int64_t success = 0, success_ns = 0, fail = 0, fail_ns = 0, queue_ns = 0, compute_input_ns = 0;
  int64_t compute_infer_ns = 0, inference_count = 0, execution_count = 0, expired = 0;
  int64_t rejected = 0, last_inference_ms = 0;
  std::map<int64_t, int64_t> batch_counts;
};

// A native request to answer once the queue's lock is released.
struct Answer {
  Responder* native;
  std::vector<const uint8_t*> rows0;  // per model output: this request's row 0
  std::vector<std::string> owned;     // a split request's assembled outputs (rows0 points here)
  grpc::Status status;
  double arrival = 0;
  Generations gen;
};

// A native request's outcome for the request log (only while DEBUG logging is on).
struct LogItem {
  std::string request_id;
  int code;
  std::string message;
  double arrival;
};

// A Python request (or a slice of one) to hand back to the runner with the GIL; it owns one
// reference to the request, which goes to Python.
struct Back {
  PyObject* req;
  int64_t start = 0, rows = 0, dest = 0;
  bool last = true;                // it finishes its request
  int code = 0;                    // 0: a slice of outputs; else the gRPC code of its failure
  std::string message;
  std::vector<PyObject*> arrays;   // input references, released with the final hand-back
};

// What the runner's metrics have not taken yet (RowQueue::TakeMetrics), recorded before the
// answers go out: a metrics scrape that takes them counts every request already answered.
struct PendingMetrics {
  std::vector<double> ok_s, queue_s;      // requests answered OK: latency, queue wait
  std::vector<int64_t> buckets, rows;     // batches completed: bucket, real rows
  std::vector<double> compute_s;          // and dispatch to outputs
  std::vector<int64_t> request_rows;      // requests whose first slice was taken
};

// kRefused: RESOURCE_EXHAUSTED (the queue's bounds); kInvalid: INVALID_ARGUMENT (a value out
// of a narrowed input's range, which would otherwise fail every request sharing its batch).
enum class AddResult { kQueued, kRefused, kStopping, kInvalid };

// The gRPC status a refused (kRefused) or invalid (kInvalid) request is answered with.
inline grpc::StatusCode AddStatus(AddResult r) {
  return r == AddResult::kRefused ? grpc::StatusCode::RESOURCE_EXHAUSTED
                                  : grpc::StatusCode::INVALID_ARGUMENT;
}

// serving/engines/base.py check_fits for one request's inputs: "" or the engine's message.
std::string RangeError(const std::vector<Spec>& specs, const std::vector<const uint8_t*>& in,
                       int64_t rows);

class RowQueue : public std::enable_shared_from_this<RowQueue> {
 public:
  RowQueue(std::string name, BatchingParams params, std::vector<Spec> inputs,
           std::vector<Spec> outputs, int instances);
  ~RowQueue();

  // A native request (its inputs at `base` + offsets, alive until it is answered): queued,
  // refused (`why` says why) or stopping.
  AddResult AddNative(Responder* native, const uint8_t* base, int64_t rows,
                      const std::vector<size_t>& offsets, double arrival, double deadline,
                      int64_t priority, std::string* why,
                      std::unique_ptr<TraceInfo> trace = nullptr);
  // A Python request (GIL held): (0 queued | 1 refused | 2 stopping | 3 invalid, message).
  py::tuple AddPython(py::object req, py::list arrays, int64_t rows, double arrival,
                      py::object deadline, int64_t priority);

  // Blocks (GIL released) until a batch should run for `instance`, or `timeout_s`: returns
  // (batch or None, Python requests that expired [(req, code, message)], native requests
  // failed since the last call [(code, seconds since arrival)]: for metrics).
  py::tuple Next(int instance, bool primary, int depth, double timeout_s, bool log);
  // Answers a batch from its outputs (uint8 views, model output order), sending the native
  // answers at once; returns (Python slices [(req, start, rows, dest, last)], when the native
  // answers were sent (MonoNow), request-log records).
  py::tuple Complete(std::shared_ptr<RowBatch> b, py::list outputs, double busy_s,
                     double compute_s, double input_s, bool log, int64_t generation);
  // The PendingMetrics recorded since the last call, as a dict of lists, with "failed": the
  // native requests failed and not yet reported ((code, seconds) pairs); cleared.
  py::dict TakeMetrics();
  // Fails a batch's requests; returns (Python requests [(req, code, message)], native
  // requests failed [(code, seconds since arrival)]).
  py::tuple Fail(std::shared_ptr<RowBatch> b, int code, const std::string& message, bool log);
  // Next and Fail hold the native answers they produce (returning an id, 0: none) until the
  // runner has counted their failures in its metrics: this sends them. Each also returns, with
  // `log`, the native outcomes for the request log [(request id, code, message, arrival)].
  // Returns when the answers were sent (MonoNow; the traced ones' encode ends then).
  double ReleaseHeld(uint64_t id);
  // The traced native requests `b` finished, taken once (GIL held): [(span name, traceparent,
  // tracestate, request id, rows, t_start, arrival, queue seconds)].
  py::list Traced(const std::shared_ptr<RowBatch>& b);
  // A failed batch as one batch per request slice, to run alone (poison isolation).
  std::vector<std::shared_ptr<RowBatch>> Isolate(std::shared_ptr<RowBatch> b);
  // Refuses new requests; without `drain`, fails everything queued. Returns Python requests
  // failed [(req, code, message)].
  py::list Stop(bool drain);
  // Answers every native request still held with UNAVAILABLE (the front end is stopping).
  void AbandonNative();

  bool Finished(int instance);  // stopping, nothing queued, nothing in flight for `instance`
  bool Settled(const std::shared_ptr<RowBatch>& b);  // already completed, failed or isolated
  py::dict Stats();
  int64_t Pending();
  void Observe(int64_t bucket, double seconds);

  const std::string& name() const { return name_; }
  double LatencySloS() const { return d_.params().latency_slo_s; }  // 0: no target
  py::dict Inputs(const std::shared_ptr<RowBatch>& b) const;  // name -> uint8 [bucket, row bytes]
  void ReturnStaging(int64_t bucket, std::vector<std::unique_ptr<Staging>>* bufs);

 private:
  enum class Wake { kNone, kFirst, kFull };  // whom an add wakes (see Admitted)
  Wake Enqueue(QEntry* e);  // queues an admitted entry (mu_ held), read where the add happens
  void Admitted(Wake wake);  // after mu_ is released
  std::shared_ptr<RowBatch> Build(Plan plan, int instance, double now);
  void Fill(RowBatch* b);
  void TakeStaging(RowBatch* b);
  void Release(QEntry* e);  // deletes an entry nobody references any more (mu_ held)
  // Marks an unanswered entry answered with an error: native calls go to `answers`, Python
  // requests to `backs` (mu_ held).
  void FailEntry(QEntry* e, int code, const std::string& message, double now,
                 std::vector<Answer>* answers, std::vector<Back>* backs);

  std::string name_;
  Decider d_;
  std::vector<Spec> inputs_, outputs_;
  py::list HandBack(std::vector<Back>* backs);  // GIL held
  uint64_t Hold(std::vector<Answer>* answers, bool log);  // no lock held; `log`: to logs_
  py::list Logs();  // GIL held: the log items gathered so far
  void LogAnswers(const std::vector<Answer>& answers);  // mu_ not held: to logs_
  void Deliver(std::vector<Answer>* answers);  // neither lock nor GIL held
  std::vector<int> inflight_;  // batches in flight per instance
  std::mutex mu_;
  std::condition_variable cv_;  // the primary instance, and runners awaiting a completion
  std::condition_variable cv_full_;  // other idle instances: only a full batch is theirs
  void WakeAll();  // both: the stop, or entries removed
  std::unordered_set<QEntry*> live_;  // every entry not yet deleted
  bool stopping_ = false;
  int64_t inflight_requests_ = 0;
  QueueStats st_;
  PendingMetrics pending_;
  std::vector<std::pair<int, double>> native_failed_;  // (code, seconds) not yet reported
  std::map<uint64_t, std::vector<Answer>> held_;  // answers waiting for ReleaseHeld
  uint64_t next_held_ = 1, completions_ = 0;     // completions_: batches settled so far
  // Runners in Next waiting for a completion (a batch of theirs in flight): a settled batch
  // wakes the others only then, since an idle runner's decision never waits on one.
  int completion_waiters_ = 0;
  bool CountCompletion();  // mu_ held: counts a settled batch; whether a runner waits for it
  std::vector<LogItem> logs_;
  std::mutex pool_mu_;
  std::map<int64_t, std::vector<std::vector<std::unique_ptr<Staging>>>> pool_;
};

// Encodes a native call's ModelInferResponse from its rows of each model output
// (wire_encode.cc).
void EncodeRows(const Call* c, const std::vector<const uint8_t*>& rows0, grpc::ByteBuffer* bb);

// Answers a call held outside the completion queue (call->mu not held) and counts it answered.
void AnswerCall(Call* call, grpc::ByteBuffer* bb, const grpc::Status& st);

}  // namespace xlaserve::native

#endif  // XLASERVE_SERVING_FRONTEND_NATIVE_ROW_QUEUE_H_
