// RowQueue's runner side (row_queue.h): taking batches (expiring what waited too long),
// answering them from the model's outputs, failing, isolating a poisoned batch, stopping.

#include <pybind11/numpy.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <optional>

#include "row_queue.h"

namespace xlaserve::native {
namespace {

constexpr int kDeadlineExceeded = 4;
constexpr int kResourceExhausted = 8;

// serving/batching/rows.py shed_message: a request shed by the queue-wait bound.
std::string ShedMessage(const std::string& model, const BatchingParams& p) {
  char buf[64];
  std::snprintf(buf, sizeof(buf), "%.0f", p.QueueWaitBound() * 1e3);
  return "model " + model + ": still queued after " + buf + " ms, its " +
         (p.latency_slo_s > 0 ? "latency target" : "queue-wait bound") +
         "; shed unstarted: retry later or add capacity";
}

int64_t WallMs() {
  return std::chrono::duration_cast<std::chrono::milliseconds>(
      std::chrono::system_clock::now().time_since_epoch()).count();
}

}  // namespace

void AnswerCall(Call* call, grpc::ByteBuffer* bb, const grpc::Status& st) {
  Frontend* fe = call->fe;  // the call may be gone once finished
  fe->Finish(call, bb, st);
  fe->Answered();
}

void Call::Reply(const std::vector<const uint8_t*>& rows0, const grpc::Status& st,
                 const Generations& gen) {
  if (!st.ok()) {
    AnswerCall(this, nullptr, st);
    return;
  }
  grpc::ByteBuffer bb;
  EncodeRows(this, rows0, &bb);
  if (gen.hi > 0) {  // response parameters after the outputs: protobuf fields in any order
    std::vector<grpc::Slice> slices;
    (void)bb.Dump(&slices);
    slices.emplace_back(GenerationParamsProto(gen));
    bb = grpc::ByteBuffer(slices.data(), slices.size());
  }
  AnswerCall(this, &bb, grpc::Status::OK);
}

std::string Call::LogId() { return id.empty() ? fe->NewRequestId() : std::string(id); }

void RowQueue::FailEntry(QEntry* e, int code, const std::string& message, double now,
                         std::vector<Answer>* answers, std::vector<Back>* backs) {
  e->answered = true;
  if (e->taken > 0) inflight_requests_--;
  st_.fail++;
  st_.fail_ns += int64_t((now - e->arrival) * 1e9);
  if (e->native != nullptr) {
    native_failed_.emplace_back(code, now - e->arrival);
    answers->push_back(Answer{e->native, {}, {}, grpc::Status(grpc::StatusCode(code), message),
                              e->arrival});
  } else {
    backs->push_back(Back{e->py, 0, 0, 0, true, code, message, std::move(e->arrays)});
    e->py = nullptr;
  }
}

void RowQueue::Deliver(std::vector<Answer>* answers) {
  for (Answer& a : *answers) {
    if (!a.status.ok()) {
      a.native->Reply({}, a.status, a.gen);
      continue;
    }
    if (!a.owned.empty()) {  // a split request: its assembled outputs (pointers taken only now)
      a.rows0.clear();
      for (auto& o : a.owned) a.rows0.push_back(reinterpret_cast<const uint8_t*>(o.data()));
    }
    a.native->Reply(a.rows0, grpc::Status::OK, a.gen);
  }
  answers->clear();
}

uint64_t RowQueue::Hold(std::vector<Answer>* answers, bool log) {
  if (answers->empty()) return 0;
  if (log) LogAnswers(*answers);
  std::lock_guard<std::mutex> l(mu_);
  uint64_t id = next_held_++;
  held_[id] = std::move(*answers);
  answers->clear();
  return id;
}

double RowQueue::ReleaseHeld(uint64_t id) {
  std::vector<Answer> answers;
  {
    std::lock_guard<std::mutex> l(mu_);
    auto it = held_.find(id);
    if (it == held_.end()) return MonoNow();
    answers = std::move(it->second);
    held_.erase(it);
  }
  Deliver(&answers);
  return MonoNow();
}

py::list RowQueue::Logs() {
  std::vector<LogItem> items;
  {
    std::lock_guard<std::mutex> l(mu_);
    items.swap(logs_);
  }
  py::list out;
  for (const LogItem& x : items) out.append(py::make_tuple(x.request_id, x.code, x.message, x.arrival));
  return out;
}

py::list RowQueue::HandBack(std::vector<Back>* backs) {
  py::list out;
  for (Back& b : *backs) {
    auto req = py::reinterpret_steal<py::object>(b.req);  // each Back owns one reference
    for (PyObject* a : b.arrays) Py_DECREF(a);
    if (b.code != 0) {
      out.append(py::make_tuple(req, b.code, b.message));
    } else {
      out.append(py::make_tuple(req, b.start, b.rows, b.dest, b.last));
    }
  }
  backs->clear();
  return out;
}

py::dict RowQueue::Inputs(const std::shared_ptr<RowBatch>& b) const {
  py::dict out;
  py::object base = py::cast(b);
  for (size_t i = 0; i < inputs_.size(); ++i) {  // bytes: the runner views them as its dtype
    out[py::str(inputs_[i].name)] = py::array_t<uint8_t>(
        {py::ssize_t(b->bucket), py::ssize_t(inputs_[i].row_bytes)}, b->inputs[i]->data, base);
  }
  return out;
}

py::tuple RowQueue::Next(int instance, bool primary, int depth, double timeout_s, bool log) {
  std::shared_ptr<RowBatch> batch;
  std::vector<Answer> answers;
  std::vector<Back> backs;
  std::vector<std::pair<int, double>> failed;
  uint64_t held = 0;
  py::list logs;
  {
    py::gil_scoped_release nogil;
    auto until = std::chrono::steady_clock::now() +
                 std::chrono::microseconds(int64_t(timeout_s * 1e6));
    std::unique_lock<std::mutex> l(mu_);
    while (true) {
      if (stopping_ && (!primary || d_.queued_rows() == 0)) break;
      double now = MonoNow();
      bool idle = inflight_[instance] == 0;
      auto wake = until;
      if (inflight_[instance] < depth) {
        Decision dec = d_.Decide(now, idle && primary);
        for (Entry* x : dec.expired) {
          auto* e = static_cast<QEntry*>(x);
          e->queued = false;
          st_.expired++;
          if (e->ExpiredByDeadline()) {
            FailEntry(e, kDeadlineExceeded, "model " + name_ + ": deadline passed while queued"
                      " (never executed); raise the deadline or reduce load", now, &answers,
                      &backs);
          } else {
            FailEntry(e, kResourceExhausted, ShedMessage(name_, d_.params()), now, &answers,
                      &backs);
          }
          Release(e);
        }
        if (dec.plan) {
          batch = Build(std::move(*dec.plan), instance, now);
          break;
        }
        if (dec.wait_s && idle && primary) {
          wake = std::min(until, std::chrono::steady_clock::now() +
                                     std::chrono::microseconds(int64_t(*dec.wait_s * 1e6) + 1));
        }
      }
      if (!answers.empty() || !backs.empty()) break;  // answer the expired ones now
      if (std::chrono::steady_clock::now() >= until) break;
      if (idle) {
        (primary ? cv_ : cv_full_).wait_until(l, wake);
      } else {  // a batch is in flight: as in ModelRunner, wait for it, not for new requests
        // Wake on a completion or on the stop itself, not on "stopping" being true: a draining
        // primary would otherwise spin here holding mu_, starving the completion it waits for
        // until `until` (the 0.5 s stalls seen at hot-reload swaps).
        uint64_t seen = completions_;
        bool was_stopping = stopping_;
        completion_waiters_++;
        cv_.wait_until(l, wake,
                       [&] { return completions_ != seen || stopping_ != was_stopping; });
        completion_waiters_--;
      }
    }
    failed.swap(native_failed_);
    l.unlock();
    held = Hold(&answers, log);
  }
  py::object b = batch ? py::cast(batch) : py::none();
  return py::make_tuple(b, HandBack(&backs), py::cast(failed), held, Logs());
}

bool RowQueue::CountCompletion() {
  completions_++;
  return completion_waiters_ > 0;
}

py::tuple RowQueue::Complete(std::shared_ptr<RowBatch> b, py::list outputs, double busy_s,
                             double compute_s, double input_s, bool log, int64_t generation) {
  if (py::len(outputs) != outputs_.size()) throw py::value_error("one array per model output");
  if (Settled(b)) return py::make_tuple(py::list(), MonoNow(), py::list());
  double sent = 0;
  bool wake = false;
  std::vector<const uint8_t*> outs;
  for (size_t k = 0; k < outputs_.size(); ++k) {
    Py_buffer view;
    if (PyObject_GetBuffer(outputs[k].ptr(), &view, PyBUF_C_CONTIGUOUS) != 0) {
      throw py::error_already_set();
    }
    bool ok = view.len == b->bucket * outputs_[k].row_bytes;
    outs.push_back(static_cast<const uint8_t*>(view.buf));  // `outputs` keeps it alive
    PyBuffer_Release(&view);
    if (!ok) {  // the runner fails the batch with this message
      throw py::value_error("output '" + outputs_[k].name + "' has the wrong size for a batch of " +
                            std::to_string(b->bucket) + " rows");
    }
  }
  std::vector<Answer> answers;
  std::vector<Back> backs;
  {
    // A Python request's slice takes its own reference below, under the GIL; a batch of native
    // requests touches no Python object, so the other runners' Python goes on meanwhile.
    std::optional<py::gil_scoped_release> nogil;
    if (std::all_of(b->slices.begin(), b->slices.end(), [](const PlanSlice& s) {
          return static_cast<QEntry*>(s.entry)->native != nullptr;
        })) {
      nogil.emplace();
    }
    {
      std::lock_guard<std::mutex> l(mu_);
      b->settled = true;
      double now = MonoNow();
      for (const PlanSlice& s : b->slices) {
        auto* e = static_cast<QEntry*>(s.entry);
        e->inflight--;
        if (e->answered) {
          Release(e);
          continue;
        }
        e->gen = e->rows_done == 0 ? Generations{generation, generation}
                 : Generations{std::min(e->gen.lo, generation), std::max(e->gen.hi, generation)};
        e->rows_done += s.rows;
        bool last = e->rows_done == e->rows;
        if (e->native != nullptr) {
          if (s.start == 0 && s.rows == e->rows) {  // whole: answered from the batch's rows
            Answer a{e->native, {}, {}, grpc::Status::OK, e->arrival, e->gen};
            for (size_t k = 0; k < outs.size(); ++k) {
              a.rows0.push_back(outs[k] + s.dest * outputs_[k].row_bytes);
            }
            answers.push_back(std::move(a));
          } else {
            if (e->out.empty()) {
              for (const Spec& o : outputs_) e->out.emplace_back(size_t(e->rows * o.row_bytes), '\0');
            }
            for (size_t k = 0; k < outs.size(); ++k) {
              const int64_t rb = outputs_[k].row_bytes;
              std::memcpy(e->out[k].data() + s.start * rb, outs[k] + s.dest * rb, s.rows * rb);
            }
            if (last) {
              answers.push_back(Answer{e->native, {}, std::move(e->out), grpc::Status::OK,
                                       e->arrival, e->gen});
            }
          }
        } else {
          if (!last) Py_INCREF(e->py);  // the entry keeps its own until its last slice
          backs.push_back(Back{e->py, s.start, s.rows, s.dest, last, 0, "",
                               last ? std::move(e->arrays) : std::vector<PyObject*>()});
          if (last) e->py = nullptr;
        }
        if (last) {
          e->answered = true;
          inflight_requests_--;
          st_.success++;
          st_.success_ns += int64_t((now - e->arrival) * 1e9);
          st_.queue_ns += e->queue_ns;
          pending_.ok_s.push_back(now - e->arrival);
          pending_.queue_s.push_back(e->queue_ns / 1e9);
          if (e->trace) {
            b->traced.emplace_back(std::move(e->trace), e->rows, e->arrival, e->queue_ns / 1e9);
          }
        }
        Release(e);
      }
      st_.execution_count++;
      st_.inference_count += b->rows;
      st_.batch_counts[b->bucket]++;
      st_.compute_input_ns += int64_t(input_s * 1e9);
      st_.compute_infer_ns += int64_t(compute_s * 1e9);
      st_.last_inference_ms = WallMs();
      pending_.buckets.push_back(b->bucket);
      pending_.rows.push_back(b->rows);
      pending_.compute_s.push_back(compute_s);
      d_.Observe(b->bucket, busy_s);
      inflight_[b->instance]--;
      wake = CountCompletion();
    }
    if (wake) cv_.notify_all();
    if (log && !answers.empty()) LogAnswers(answers);
    if (!nogil) nogil.emplace();  // sending touches no Python object
    Deliver(&answers);
    sent = MonoNow();
  }
  return py::make_tuple(HandBack(&backs), sent, Logs());
}

py::tuple RowQueue::Fail(std::shared_ptr<RowBatch> b, int code, const std::string& message,
                         bool log) {
  if (Settled(b)) return py::make_tuple(py::list(), py::list(), 0, py::list());
  uint64_t held = 0;
  bool wake = false;
  std::vector<Answer> answers;
  std::vector<Back> backs;
  std::vector<std::pair<int, double>> failed;
  {
    py::gil_scoped_release nogil;
    {
      std::lock_guard<std::mutex> l(mu_);
      b->settled = true;
      double now = MonoNow();
      std::unordered_set<Entry*> still_queued;
      for (const PlanSlice& s : b->slices) {
        auto* e = static_cast<QEntry*>(s.entry);
        e->inflight--;
        if (!e->answered) {
          FailEntry(e, code, message, now, &answers, &backs);
          if (e->queued) still_queued.insert(e);  // its other rows never run
        }
      }
      if (!still_queued.empty()) d_.Remove(still_queued);
      for (const PlanSlice& s : b->slices) {
        auto* e = static_cast<QEntry*>(s.entry);
        if (still_queued.count(e)) e->queued = false;
      }
      for (const PlanSlice& s : b->slices) Release(static_cast<QEntry*>(s.entry));
      inflight_[b->instance]--;
      wake = CountCompletion();
      failed.swap(native_failed_);
    }
    if (wake) cv_.notify_all();
    held = Hold(&answers, log);
  }
  return py::make_tuple(HandBack(&backs), py::cast(failed), held, Logs());
}

std::vector<std::shared_ptr<RowBatch>> RowQueue::Isolate(std::shared_ptr<RowBatch> b) {
  std::vector<std::shared_ptr<RowBatch>> out;
  std::lock_guard<std::mutex> l(mu_);
  if (b->settled) return out;
  b->settled = true;
  for (const PlanSlice& s : b->slices) {
    auto* e = static_cast<QEntry*>(s.entry);
    if (e->answered) {
      e->inflight--;
      Release(e);
      continue;
    }
    auto nb = std::make_shared<RowBatch>();
    nb->q = shared_from_this();
    nb->instance = b->instance;
    nb->bucket = d_.BucketFor(s.rows);
    nb->rows = s.rows;
    nb->slices.push_back(PlanSlice{e, s.start, s.rows, 0});  // the slice moves: inflight kept
    nb->t_taken = b->t_taken;
    TakeStaging(nb.get());
    Fill(nb.get());
    inflight_[b->instance]++;
    out.push_back(std::move(nb));
  }
  inflight_[b->instance]--;
  if (CountCompletion()) cv_.notify_all();  // under mu_: rare (a failed batch split up)
  return out;
}

}  // namespace xlaserve::native
