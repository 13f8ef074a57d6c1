// RowQueue (row_queue.h): admission and batch planning by the Decider, staging buffers filled
// under the queue's lock (so an entry answered elsewhere is never read after), and answers.
// Lock order: a call's mutex, then the queue's; the GIL is never taken while the queue's mutex
// is held (Python threads may hold the GIL while they wait for it).

#include "row_queue.h"

#include <cstdlib>
#include <cstring>

#include <pybind11/stl.h>

namespace xlaserve::native {
namespace {

constexpr int kUnavailable = 14;

}  // namespace
Staging::Staging(size_t n) : size(n) {
  data = static_cast<uint8_t*>(std::aligned_alloc(64, ((n + 63) / 64) * 64 + 64));
}
Staging::~Staging() { std::free(data); }

RowBatch::~RowBatch() {
  if (q) q->ReturnStaging(bucket, &inputs);
}

RowQueue::RowQueue(std::string name, BatchingParams params, std::vector<Spec> inputs,
                   std::vector<Spec> outputs, int instances)
    : name_(std::move(name)), d_(std::move(params)), inputs_(std::move(inputs)),
      outputs_(std::move(outputs)),
      inflight_(size_t(std::max(instances, 1)), 0) {}

RowQueue::~RowQueue() = default;

void RowQueue::ReturnStaging(int64_t bucket, std::vector<std::unique_ptr<Staging>>* bufs) {
  if (bufs->empty()) return;
  std::lock_guard<std::mutex> l(pool_mu_);
  auto& free = pool_[bucket];
  if (free.size() < 8) free.push_back(std::move(*bufs));
}

void RowQueue::TakeStaging(RowBatch* b) {
  {
    std::lock_guard<std::mutex> l(pool_mu_);
    auto& free = pool_[b->bucket];
    if (!free.empty()) {
      b->inputs = std::move(free.back());
      free.pop_back();
      return;
    }
  }
  for (const Spec& s : inputs_) b->inputs.push_back(std::make_unique<Staging>(
      size_t(b->bucket * s.row_bytes)));
}

void RowQueue::Fill(RowBatch* b) {
  for (size_t i = 0; i < inputs_.size(); ++i) {
    const size_t rb = size_t(inputs_[i].row_bytes);
    uint8_t* dst = b->inputs[i]->data;
    for (const PlanSlice& s : b->slices) {
      auto* e = static_cast<QEntry*>(s.entry);
      if (e->answered) {
        std::memset(dst + s.dest * rb, 0, s.rows * rb);
      } else {
        std::memcpy(dst + s.dest * rb, e->in[i] + s.start * rb, s.rows * rb);
      }
    }
    const int64_t used = b->rows;
    if (used < b->bucket) std::memset(dst + used * rb, 0, (b->bucket - used) * rb);
  }
}

std::shared_ptr<RowBatch> RowQueue::Build(Plan plan, int instance, double now) {
  auto b = std::make_shared<RowBatch>();
  b->q = shared_from_this();
  b->instance = instance;
  b->bucket = plan.bucket;
  b->rows = plan.rows();
  b->slices = std::move(plan.slices);
  b->t_taken = now;
  for (const PlanSlice& s : b->slices) {
    auto* e = static_cast<QEntry*>(s.entry);
    e->inflight++;
    if (e->remaining() == 0) e->queued = false;
    if (s.start == 0) {
      inflight_requests_++;
      e->queue_ns = int64_t((now - e->arrival) * 1e9);
      pending_.request_rows.push_back(e->rows);
    }
  }
  inflight_[instance]++;
  TakeStaging(b.get());
  Fill(b.get());
  return b;
}

void RowQueue::Release(QEntry* e) {
  if (e->queued || e->inflight > 0 || !e->answered) return;
  live_.erase(e);
  delete e;
}

RowQueue::Wake RowQueue::Enqueue(QEntry* e) {
  bool was_empty = d_.queued_rows() == 0;
  bool had_full = d_.queued_rows() >= d_.max_batch();
  d_.Add(e);
  live_.insert(e);
  if (!had_full && d_.queued_rows() >= d_.max_batch()) return Wake::kFull;
  return was_empty ? Wake::kFirst : Wake::kNone;
}

void RowQueue::Admitted(Wake wake) {
  // Wake the runner threads only when it can change their decision: the queue now holds a full
  // batch (any idle instance takes it), or was empty (an idle primary dispatches at once).
  if (wake == Wake::kFull) {
    WakeAll();
  } else if (wake == Wake::kFirst) {
    cv_.notify_all();
  }
}

void RowQueue::WakeAll() {
  cv_.notify_all();
  cv_full_.notify_all();
}

std::string RangeError(const std::vector<Spec>& specs, const std::vector<const uint8_t*>& in,
                       int64_t rows) {
  for (size_t i = 0; i < specs.size() && i < in.size(); ++i) {
    const Spec& s = specs[i];
    const int64_t n = (s.dims.empty() || s.dims[0] == -1 ? rows : 1) * s.row_bytes / 8;
    if (!s.narrow || n == 0) continue;
    const bool is_unsigned = s.datatype == "UINT64";
    int64_t lo = INT64_MAX, hi = INT64_MIN;
    uint64_t ulo = UINT64_MAX, uhi = 0;
    for (int64_t k = 0; k < n; ++k) {
      uint64_t v;
      std::memcpy(&v, in[i] + 8 * k, 8);  // request bytes need not be 8-byte aligned
      ulo = std::min(ulo, v), uhi = std::max(uhi, v);
      lo = std::min(lo, int64_t(v)), hi = std::max(hi, int64_t(v));
    }
    if (is_unsigned ? uhi <= UINT32_MAX : lo >= INT32_MIN && hi <= INT32_MAX) continue;
    return "input '" + s.name + "' has values in [" +
           (is_unsigned ? std::to_string(ulo) + ", " + std::to_string(uhi)
                        : std::to_string(lo) + ", " + std::to_string(hi)) +
           "], outside " + (is_unsigned ? "uint32 [0, 4294967295]"
                                        : "int32 [-2147483648, 2147483647]") +
           " that the model takes; send values within that range (64-bit ids: hash them into it)";
  }
  return "";
}

AddResult RowQueue::AddNative(Responder* native, const uint8_t* base, int64_t rows,
                              const std::vector<size_t>& offsets, double arrival,
                              double deadline, int64_t priority, std::string* why,
                              std::unique_ptr<TraceInfo> trace) {
  auto* e = new QEntry();
  e->native = native;
  e->trace = std::move(trace);
  e->rows = rows;
  e->arrival = arrival;
  e->has_deadline = deadline >= 0;
  e->deadline = deadline;
  e->priority = priority;
  for (size_t off : offsets) e->in.push_back(base + off);
  Wake wake;
  std::string invalid = RangeError(inputs_, e->in, rows);
  {
    std::lock_guard<std::mutex> l(mu_);
    if (stopping_) {
      delete e;
      return AddResult::kStopping;
    }
    if (!invalid.empty()) {  // counted as the batch failure it would have been
      st_.fail++;
      native_failed_.emplace_back(3, MonoNow() - arrival);
      delete e;
      *why = std::move(invalid);
      return AddResult::kInvalid;
    }
    std::string refusal = d_.Admit(*e);
    if (!refusal.empty()) {
      st_.rejected++;
      st_.fail++;  // Triton counts rejected requests as failures
      delete e;
      *why = "model " + name_ + ": " + refusal;
      return AddResult::kRefused;
    }
    wake = Enqueue(e);
  }
  Admitted(wake);
  return AddResult::kQueued;
}

py::tuple RowQueue::AddPython(py::object req, py::list arrays, int64_t rows, double arrival,
                              py::object deadline, int64_t priority) {
  if (rows < 1) throw py::value_error("a request needs at least one row");
  if (py::len(arrays) != inputs_.size()) throw py::value_error("one array per model input");
  auto e = std::make_unique<QEntry>();
  for (size_t i = 0; i < inputs_.size(); ++i) {
    Py_buffer view;
    if (PyObject_GetBuffer(arrays[i].ptr(), &view, PyBUF_C_CONTIGUOUS) != 0) {
      throw py::error_already_set();
    }
    bool ok = view.len == rows * inputs_[i].row_bytes;
    e->in.push_back(static_cast<const uint8_t*>(view.buf));
    PyBuffer_Release(&view);  // the array itself is kept alive below
    if (!ok) throw py::value_error("input " + inputs_[i].name + " has the wrong size");
  }
  e->rows = rows;
  e->arrival = arrival;
  e->has_deadline = !deadline.is_none();
  e->deadline = e->has_deadline ? deadline.cast<double>() : 0.0;
  e->priority = priority;
  Wake wake;
  std::string invalid = RangeError(inputs_, e->in, rows);
  {
    std::lock_guard<std::mutex> l(mu_);
    if (stopping_) {
      return py::make_tuple(2, "model " + name_ + " is shutting down; retry on another replica");
    }
    if (!invalid.empty()) {
      st_.fail++;
      return py::make_tuple(3, invalid);
    }
    std::string refusal = d_.Admit(*e);
    if (!refusal.empty()) {
      st_.rejected++;
      st_.fail++;
      return py::make_tuple(1, "model " + name_ + ": " + refusal);
    }
    e->py = req.inc_ref().ptr();
    for (auto a : arrays) e->arrays.push_back(a.inc_ref().ptr());
    wake = Enqueue(e.release());
  }
  Admitted(wake);
  return py::make_tuple(0, "");
}

// -- stopping and reading -------------------------------------------------------------------

py::list RowQueue::Stop(bool drain) {
  std::vector<Answer> answers;
  std::vector<Back> backs;
  {
    py::gil_scoped_release nogil;
    {
      std::lock_guard<std::mutex> l(mu_);
      stopping_ = true;
      if (!drain) {
        double now = MonoNow();
        for (Entry* x : d_.Drain()) {
          auto* e = static_cast<QEntry*>(x);
          e->queued = false;
          if (!e->answered) {
            FailEntry(e, kUnavailable, "model " + name_ + " was unloaded before this request"
                      " ran; retry", now, &answers, &backs);
          }
          Release(e);
        }
      }
    }
    WakeAll();
    Deliver(&answers);
  }
  return HandBack(&backs);
}

void RowQueue::AbandonNative() {
  std::vector<Answer> answers;
  std::vector<Back> backs;  // stays empty: Python requests are not abandoned
  {
    std::lock_guard<std::mutex> l(mu_);
    stopping_ = true;
    double now = MonoNow();
    std::vector<QEntry*> natives;
    for (QEntry* e : live_) {
      if (e->native != nullptr && !e->answered) natives.push_back(e);
    }
    std::unordered_set<Entry*> queued;
    for (QEntry* e : natives) {
      FailEntry(e, kUnavailable, "server is shutting down; retry on another replica", now,
                &answers, &backs);
      if (e->queued) queued.insert(e);
    }
    d_.Remove(queued);
    for (QEntry* e : natives) {
      e->queued = false;
      Release(e);
    }
  }
  WakeAll();
  Deliver(&answers);
}

bool RowQueue::Settled(const std::shared_ptr<RowBatch>& b) {
  std::lock_guard<std::mutex> l(mu_);  // GIL held: allowed (never the other way round)
  return b->settled;
}

bool RowQueue::Finished(int instance) {
  std::lock_guard<std::mutex> l(mu_);
  return stopping_ && d_.queued_rows() == 0 && inflight_[instance] == 0;
}

int64_t RowQueue::Pending() {
  std::lock_guard<std::mutex> l(mu_);
  return d_.queued_requests() + inflight_requests_;
}

void RowQueue::Observe(int64_t bucket, double seconds) {
  std::lock_guard<std::mutex> l(mu_);
  d_.Observe(bucket, seconds);
}

void RowQueue::LogAnswers(const std::vector<Answer>& answers) {
  std::vector<LogItem> items;
  for (const Answer& a : answers) {
    items.push_back(LogItem{a.native->LogId(), int(a.status.error_code()),
                            a.status.error_message(), a.arrival});
  }
  std::lock_guard<std::mutex> l(mu_);
  for (LogItem& x : items) logs_.push_back(std::move(x));
}

py::dict RowQueue::TakeMetrics() {
  PendingMetrics m;
  std::vector<std::pair<int, double>> failed;  // e.g. refused at admission, answered at once
  {
    std::lock_guard<std::mutex> l(mu_);
    std::swap(m, pending_);
    failed.swap(native_failed_);
  }
  py::dict d;
  d["ok_s"] = py::cast(m.ok_s);
  d["queue_s"] = py::cast(m.queue_s);
  d["buckets"] = py::cast(m.buckets);
  d["rows"] = py::cast(m.rows);
  d["compute_s"] = py::cast(m.compute_s);
  d["request_rows"] = py::cast(m.request_rows);
  d["failed"] = py::cast(failed);
  return d;
}

py::dict RowQueue::Stats() {
  QueueStats st;
  int64_t rows, requests, inflight;
  {
    std::lock_guard<std::mutex> l(mu_);
    st = st_;
    rows = d_.queued_rows();
    requests = d_.queued_requests();
    inflight = inflight_requests_;
  }
  py::dict d;
  d["success_count"] = st.success;
  d["success_ns"] = st.success_ns;
  d["fail_count"] = st.fail;
  d["fail_ns"] = st.fail_ns;
  d["queue_ns"] = st.queue_ns;
  d["compute_input_ns"] = st.compute_input_ns;
  d["compute_infer_ns"] = st.compute_infer_ns;
  d["inference_count"] = st.inference_count;
  d["execution_count"] = st.execution_count;
  d["last_inference_ms"] = st.last_inference_ms;
  d["expired"] = st.expired;
  d["rejected"] = st.rejected;
  d["batch_counts"] = py::cast(st.batch_counts);
  d["queued_rows"] = rows;
  d["queued_requests"] = requests;
  d["inflight_requests"] = inflight;
  return d;
}

}  // namespace xlaserve::native
