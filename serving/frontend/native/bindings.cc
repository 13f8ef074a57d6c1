// The pybind11 module `serving.frontend._native`: the Frontend (module.cc), each model's
// RowQueue and its batches (row_queue.cc, row_answer.cc), and `Decider`, a small binding of the
// batching decisions (batcher.cc) that tests drive with the Python Batcher's cases.

#include <pybind11/stl.h>

#include <unordered_map>

#include "row_queue.h"
#include "tenants.h"

namespace xlaserve::native {
namespace {

// The decisions with entries named by integer ids (tests: serving/frontend/native_batcher.py).
class DeciderBinding {
 public:
  DeciderBinding(std::vector<int64_t> buckets, double delay, bool idle, int64_t max_rows,
                 int64_t max_requests, double headroom, double slo, double max_wait,
                 int executors)
      : d_(BatchingParams{std::move(buckets), delay, idle, max_rows, max_requests, headroom, slo,
                          max_wait, executors}) {}

  std::string Add(uint64_t id, int64_t rows, double arrival, py::object deadline,
                  int64_t priority) {
    if (rows < 1) {
      throw py::value_error("a request needs at least one row, got " + std::to_string(rows));
    }
    auto e = std::make_unique<Entry>();
    e->rows = rows;
    e->arrival = arrival;
    e->has_deadline = !deadline.is_none();
    e->deadline = e->has_deadline ? deadline.cast<double>() : 0.0;
    e->priority = priority;
    std::string why = d_.Admit(*e);
    if (!why.empty()) return why;
    d_.Add(e.get());
    ids_[e.get()] = id;
    entries_[id] = std::move(e);
    return "";
  }

  py::tuple Decide(double now, bool idle) {
    Decision dec = d_.Decide(now, idle);
    py::object plan = py::none();
    if (dec.plan) {
      py::list slices;
      for (const PlanSlice& s : dec.plan->slices) {
        slices.append(py::make_tuple(ids_.at(s.entry), s.start, s.rows, s.dest));
      }
      plan = py::make_tuple(dec.plan->bucket, slices);
      for (const PlanSlice& s : dec.plan->slices) {
        if (s.entry->remaining() == 0) Forget(s.entry);
      }
    }
    py::object wait = dec.wait_s ? py::object(py::float_(*dec.wait_s)) : py::object(py::none());
    return py::make_tuple(plan, Ids(dec.expired), wait);
  }

  py::list Expire(double now) { return Ids(d_.Expire(now)); }
  py::list Drain() { return Ids(d_.Drain()); }

  void Remove(const std::vector<uint64_t>& ids) {
    std::unordered_set<Entry*> doomed;
    for (uint64_t id : ids) {
      auto it = entries_.find(id);
      if (it != entries_.end()) doomed.insert(it->second.get());
    }
    d_.Remove(doomed);
    for (Entry* e : doomed) Forget(e);
  }

  Decider d_;

 private:
  py::list Ids(const std::vector<Entry*>& entries) {
    py::list out;
    for (Entry* e : entries) {
      out.append(ids_.at(e));
      Forget(e);
    }
    return out;
  }
  void Forget(Entry* e) {
    auto it = ids_.find(e);
    if (it == ids_.end()) return;
    uint64_t id = it->second;
    ids_.erase(it);
    entries_.erase(id);
  }

  std::unordered_map<uint64_t, std::unique_ptr<Entry>> entries_;
  std::unordered_map<Entry*, uint64_t> ids_;
};

py::object Optional(const std::optional<double>& v) {
  return v ? py::object(py::float_(*v)) : py::object(py::none());
}

std::shared_ptr<RowQueue> MakeQueue(std::string name, std::vector<int64_t> buckets, double delay,
                                    bool idle, int64_t max_rows, int64_t max_requests,
                                    double headroom, double slo, double max_wait,
                                    py::list inputs, py::list outputs, int instances,
                                    std::vector<std::string> narrowed) {
  std::vector<Spec> in = ParseSpecs(inputs);
  for (Spec& s : in) {  // only 64-bit integers: the range check reads 8-byte values
    s.narrow = std::count(narrowed.begin(), narrowed.end(), s.name) > 0 &&
               (s.datatype == "INT64" || s.datatype == "UINT64");
  }
  return std::make_shared<RowQueue>(
      std::move(name), BatchingParams{std::move(buckets), delay, idle, max_rows, max_requests,
                                      headroom, slo, max_wait, std::max(instances, 1)},
      std::move(in), ParseSpecs(outputs), instances);
}

// A tenant table from serving/frontend/tenants.py Tenant.native() tuples.
std::shared_ptr<Tenants> MakeTenants(const py::list& specs) {
  std::vector<TenantSpec> out;
  for (auto s : specs) {
    auto t = s.cast<py::tuple>();
    out.push_back(TenantSpec{t[0].cast<std::string>(), t[1].cast<std::vector<std::string>>(),
                             t[2].cast<std::vector<std::string>>(), t[3].cast<double>(),
                             t[4].cast<double>(), t[5].cast<double>(), t[6].cast<double>(),
                             t[7].cast<int64_t>()});
  }
  return std::make_shared<Tenants>(std::move(out));
}

}  // namespace
}  // namespace xlaserve::native

using namespace xlaserve::native;  // NOLINT: the module's one translation unit of bindings

PYBIND11_MODULE(_native, m) {
  m.doc() = "xlaserve's native gRPC front end and batch queues (see serving/frontend/native.py)";
  py::class_<RequestBuffer>(m, "RequestBuffer", py::buffer_protocol())
      .def_buffer([](RequestBuffer& b) -> py::buffer_info {
        return py::buffer_info(const_cast<uint8_t*>(b.slice.begin()), 1, "B", 1,
                               {py::ssize_t(b.slice.size())}, {py::ssize_t(1)}, true);
      });
  py::class_<Frontend>(m, "Frontend")
      .def(py::init<std::string, int64_t, int64_t, int64_t, std::string, std::string, int>(),
           py::arg("backend"), py::arg("max_message_bytes"), py::arg("max_rows"),
           py::arg("max_tensor_bytes"), py::arg("token"), py::arg("id_prefix"),
           py::arg("threads"))
      .def("set_tls", &Frontend::SetTls, py::arg("cert_file"), py::arg("key_file"),
           py::arg("reload_s"), py::arg("client_ca") = "")
      .def("start", &Frontend::Start, py::call_guard<py::gil_scoped_release>())
      .def("start_http", &Frontend::StartHttp, py::arg("host"), py::arg("port"),
           py::arg("backend"), py::arg("read_timeout_s"), py::arg("idle_timeout_s"),
           py::arg("max_body_bytes"),
           py::arg("threads"), py::call_guard<py::gil_scoped_release>())
      .def("stop", &Frontend::Stop, py::call_guard<py::gil_scoped_release>())
      .def("set_models", &Frontend::SetModels)
      .def("routed_counts", &Frontend::RoutedCounts)
      .def("set_accepting", &Frontend::SetAccepting)
      .def("set_tracing", &Frontend::SetTracing)
      .def("trace_secret", &Frontend::TraceSecret)  // the HTTP relay's trace marks carry it
      .def("take", &Frontend::Take)
      .def("complete", &Frontend::Complete)
      .def("forward", &Frontend::Forward)
      .def("set_tenants", &Frontend::SetTenants)
      .def("set_accept_backlog", &Frontend::SetAcceptBacklog, py::arg("calls"))
      .def("set_read_coalesce", &Frontend::SetReadCoalesce, py::arg("on"))
      .def("inflight", &Frontend::Inflight)
      .def("stats", &Frontend::Stats);
  // The same methods as serving/frontend/tenants.py TenantTable.
  py::class_<Tenants, std::shared_ptr<Tenants>>(m, "Tenants")
      .def(py::init(&MakeTenants))
      .def("identify", [](const Tenants& t, py::object auth, std::vector<std::string> ids) {
        std::string a = auth.is_none() ? std::string() : auth.cast<std::string>();
        return t.Identify(a, !auth.is_none(), ids);
      })
      .def("admit", [](Tenants& t, int tenant, int64_t rows, double now) {
             double retry_s = 0;
             std::string why;
             {
               py::gil_scoped_release nogil;
               why = t.Admit(tenant, rows, now, &retry_s);
             }
             return py::make_tuple(why, retry_s);  // tenants.py TenantTable.admit
           })
      .def("index", &Tenants::Index)
      .def("from_relay_mark", &Tenants::FromRelayMark)  // the HTTP relay's mark (C++ only)
      .def("unknown", &Tenants::Unknown)  // ModelInfers refused here for want of a tenant
      .def("name", [](const Tenants& t, int i) { return t.spec(i).name; })
      .def("priority", [](const Tenants& t, int i) { return t.spec(i).priority; })
      .def("stats", [](Tenants& t) {
        py::dict d;
        auto counts = t.Counts();
        for (size_t i = 0; i < counts.size(); ++i) {
          d[py::str(t.spec(int(i)).name)] = py::make_tuple(counts[i].first, counts[i].second);
        }
        return d;
      });
  py::class_<RowBatch, std::shared_ptr<RowBatch>>(m, "RowBatch")
      .def_property_readonly("bucket", [](const RowBatch& b) { return b.bucket; })
      .def_property_readonly("rows", [](const RowBatch& b) { return b.rows; })
      .def_property_readonly("requests", [](const RowBatch& b) { return b.slices.size(); })
      .def_property_readonly("request_rows", [](const RowBatch& b) {
        std::vector<int64_t> rows;  // requests whose first slice is in this batch
        for (const PlanSlice& s : b.slices) {
          if (s.start == 0) rows.push_back(s.entry->rows);
        }
        return rows;
      })
      .def_property_readonly("inputs", [](std::shared_ptr<RowBatch> b) {
        return b->q->Inputs(b);
      });
  py::class_<RowQueue, std::shared_ptr<RowQueue>>(m, "RowQueue")
      .def(py::init(&MakeQueue), py::arg("name"), py::arg("buckets"),
           py::arg("max_queue_delay_s"), py::arg("dispatch_when_idle"),
           py::arg("max_queue_rows"), py::arg("max_queue_requests"),
           py::arg("deadline_headroom"), py::arg("latency_slo_s"), py::arg("max_queue_wait_s"),
           py::arg("inputs"), py::arg("outputs"),
           py::arg("instances"), py::arg("narrowed") = std::vector<std::string>())
      .def("add", &RowQueue::AddPython)
      .def("next", &RowQueue::Next)
      .def("complete", &RowQueue::Complete)
      .def("take_metrics", &RowQueue::TakeMetrics)
      .def("fail", &RowQueue::Fail)
      .def("isolate", &RowQueue::Isolate)
      .def("stop", &RowQueue::Stop)
      .def("release", &RowQueue::ReleaseHeld, py::call_guard<py::gil_scoped_release>())
      .def("traced", &RowQueue::Traced)
      .def("finished", &RowQueue::Finished, py::call_guard<py::gil_scoped_release>())
      .def("pending", &RowQueue::Pending, py::call_guard<py::gil_scoped_release>())
      .def("observe", &RowQueue::Observe, py::call_guard<py::gil_scoped_release>())
      .def("stats", &RowQueue::Stats);
  py::class_<DeciderBinding>(m, "Decider")
      .def(py::init<std::vector<int64_t>, double, bool, int64_t, int64_t, double, double,
                    double, int>())
      .def("add", &DeciderBinding::Add)
      .def("decide", &DeciderBinding::Decide)
      .def("expire", &DeciderBinding::Expire)
      .def("drain", &DeciderBinding::Drain)
      .def("remove", &DeciderBinding::Remove)
      .def("observe", [](DeciderBinding& b, int64_t bucket, double s) { b.d_.Observe(bucket, s); })
      .def("estimated_wait_s", [](DeciderBinding& b, int64_t rows, int64_t priority) {
        return Optional(b.d_.EstimatedWait(rows, priority));
      })
      .def("oldest_arrival", [](DeciderBinding& b) { return Optional(b.d_.OldestArrival()); })
      .def("head_priority", [](DeciderBinding& b) -> py::object {
        auto p = b.d_.HeadPriority();
        return p ? py::object(py::int_(*p)) : py::object(py::none());
      })
      .def_property_readonly("queued_rows", [](DeciderBinding& b) { return b.d_.queued_rows(); })
      .def_property_readonly("queued_requests",
                             [](DeciderBinding& b) { return b.d_.queued_requests(); });
}
