// The server core: the Frontend object Python drives (start/stop, the model table, the fast
// queue its feeder thread takes from, completions and forwards), fast-path admission of a
// ModelInfer (method, auth, model, specs, deadline) into the model's RowQueue or the feeder's
// queue. The completion-queue worker threads are in cq_poll.cc, the pybind11 module in
// bindings.cc.

#include <absl/synchronization/mutex.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <cctype>
#include <chrono>
#include <ctime>
#include <utility>

#include "http.h"  // the destructor ends the HTTP server
#include "row_queue.h"
#include "tenants.h"

namespace xlaserve::native {

namespace {
std::string Key(std::string_view name, std::string_view version) {
  return std::string(name) + '\0' + std::string(version);
}
}  // namespace

// -- the front end -----------------------------------------------------------------------------

Frontend::Frontend(std::string backend, int64_t max_message_bytes, int64_t max_rows,
                   int64_t max_tensor_bytes, std::string token, std::string id_prefix,
                   int threads)
    : backend_(std::move(backend)), max_message_bytes_(max_message_bytes), max_rows_(max_rows),
      max_tensor_bytes_(max_tensor_bytes), token_(std::move(token)),
      id_prefix_(std::move(id_prefix)), threads_(threads < 1 ? 1 : threads),
      table_(std::make_shared<Table>()) {
  // gRPC's absl mutexes: no debug lock-order graph (Debian's absl keeps it on: 2-8% of CPU)
  absl::SetMutexDeadlockDetectionMode(absl::OnDeadlockCycle::kIgnore);
}

Frontend::~Frontend() { Stop(0.0); }

std::shared_ptr<const Model> Frontend::Lookup(std::string_view name, std::string_view version) {
  std::lock_guard<std::mutex> l(table_mu_);
  auto it = table_->find(Key(name, version));
  return it == table_->end() ? nullptr : it->second;
}

int Frontend::Start(const std::string& address) {
  grpc::ChannelArguments args;
  args.SetMaxReceiveMessageSize(-1);
  args.SetMaxSendMessageSize(-1);
  args.SetInt(GRPC_ARG_ENABLE_RETRIES, 0);
  channel_ = grpc::CreateCustomChannel(backend_, grpc::InsecureChannelCredentials(), args);
  stub_ = std::make_unique<grpc::GenericStub>(channel_);
  grpc::ServerBuilder builder;
  int port = 0;
  builder.AddListeningPort(address, Credentials(tls_cert_, tls_key_, tls_reload_s_, tls_client_ca_), &port);
  builder.SetMaxReceiveMessageSize(int(std::min<int64_t>(max_message_bytes_, INT32_MAX)));
  builder.SetMaxSendMessageSize(int(std::min<int64_t>(max_message_bytes_, INT32_MAX)));
  builder.AddChannelArgument(GRPC_ARG_ALLOW_REUSEPORT, 0);
  builder.RegisterAsyncGenericService(&service_);
  for (int i = 0; i < threads_; ++i) cqs_.push_back(builder.AddCompletionQueue());
  server_ = builder.BuildAndStart();
  if (!server_ || port == 0) {
    server_.reset();
    cqs_.clear();
    return 0;
  }
  for (auto& cq : cqs_) {
    for (int i = 0; i < 32; ++i) Spawn(cq.get());
  }
  for (auto& cq : cqs_) {
    auto* q = cq.get();
    workers_.emplace_back([this, q] { Poll(q); });
  }
  return port;
}

void Frontend::Stop(double grace_s) {
  if (http_) http_->Stop(grace_s);  // before the queues abandon what HTTP still holds
  std::vector<Call*> orphans;
  {
    std::unique_lock<std::mutex> l(qmu_);
    if (stopped_) return;
    stopped_ = true;
    busy_cv_.wait(l, [this] { return busy_ == 0; });
    queue_.clear();
    for (auto& [id, c] : owned_) orphans.push_back(c);
    owned_.clear();
    inflight_ = 0;
  }
  qcv_.notify_all();
  for (Call* c : orphans) {
    Finish(c, nullptr, grpc::Status(grpc::StatusCode::UNAVAILABLE, kShuttingDown));
  }
  std::shared_ptr<Table> table;
  {
    std::lock_guard<std::mutex> l(table_mu_);
    table = table_;
  }
  for (auto& [key, m] : *table) {  // no call may outlive the completion queues
    if (m->queue) m->queue->AbandonNative();
  }
  if (server_) {
    auto until = std::chrono::system_clock::now() +
                 std::chrono::microseconds(int64_t(grace_s * 1e6));
    server_->Shutdown(until);
    // No operation may start on a completion queue after its shutdown: wait for the calls.
    auto give_up = std::chrono::steady_clock::now() + std::chrono::seconds(10);
    while (live_calls_ > 0 && std::chrono::steady_clock::now() < give_up) {
      std::this_thread::sleep_for(std::chrono::milliseconds(1));
    }
    {
      std::lock_guard<std::mutex> l(qmu_);
      cq_closed_ = true;
    }
    for (auto& cq : cqs_) cq->Shutdown();
    for (auto& t : workers_) t.join();
    workers_.clear();
    server_.reset();
  }
}

std::vector<Spec> ParseSpecs(const py::list& specs) {
  std::vector<Spec> out;
  for (auto s : specs) {
    auto t = s.cast<py::tuple>();
    Spec spec{t[0].cast<std::string>(), t[1].cast<std::string>(),
              t[2].cast<std::vector<int64_t>>(), 0};
    int64_t n = t[3].cast<int64_t>();
    for (size_t d = 1; d < spec.dims.size(); ++d) n *= spec.dims[d];
    spec.row_bytes = n;
    out.push_back(std::move(spec));
  }
  return out;
}

void Frontend::SetModels(const std::vector<py::tuple>& entries) {
  auto table = std::make_shared<Table>();
  for (const auto& e : entries) {
    auto m = std::make_shared<Model>();
    auto name = e[0].cast<std::string>();
    auto version_key = e[1].cast<std::string>();
    m->slot = e[2].cast<int>();
    m->version = e[3].cast<std::string>();
    m->inputs = ParseSpecs(e[4].cast<py::list>());
    m->outputs = ParseSpecs(e[5].cast<py::list>());
    m->default_timeout_us = e[6].cast<int64_t>();
    if (e.size() > 7 && !e[7].is_none()) m->queue = e[7].cast<std::shared_ptr<RowQueue>>();
    if (e.size() > 8 && !e[8].is_none()) SetSplit(m.get(), name, e[8].cast<py::tuple>());
    (*table)[Key(name, version_key)] = m;
  }
  coalesce_ns_ = coalesce_on_ ? CoalesceNs(*table) : 0;
  std::lock_guard<std::mutex> l(table_mu_);
  table_ = std::move(table);
}

py::object Frontend::Take(size_t max_items, double timeout_s) {
  std::vector<Fast> got;
  bool stop = false;
  {
    py::gil_scoped_release nogil;
    std::unique_lock<std::mutex> l(qmu_);
    qcv_.wait_for(l, std::chrono::microseconds(int64_t(timeout_s * 1e6)),
                  [this] { return stopped_ || !queue_.empty(); });
    stop = stopped_;
    while (!queue_.empty() && got.size() < max_items) {
      got.push_back(std::move(queue_.front()));
      queue_.pop_front();
    }
  }
  if (stop) return py::none();
  py::list out(got.size());
  for (size_t i = 0; i < got.size(); ++i) {
    Fast& f = got[i];
    auto buf = std::make_unique<RequestBuffer>();
    buf->slice = f.call->message;  // a reference, not a copy
    py::tuple offs(f.offsets.size());
    for (size_t j = 0; j < f.offsets.size(); ++j) offs[j] = py::int_(f.offsets[j]);
    out[i] = py::make_tuple(f.id, f.slot, f.rows, py::cast(buf.release(),
                            py::return_value_policy::take_ownership), offs, f.arrival,
                            f.deadline < 0 ? py::object(py::none()) : py::object(py::float_(f.deadline)),
                            f.priority, py::str(f.request_id));
  }
  return out;
}

void Frontend::Complete(const py::list& items) {
  std::vector<std::pair<Call*, grpc::ByteBuffer>> oks;
  std::vector<std::pair<Call*, grpc::Status>> errs;
  for (auto item : items) {
    Call* call = nullptr;
    try {
      auto t = item.cast<py::tuple>();
      call = Claim(t[0].cast<uint64_t>());
      if (call == nullptr) continue;
      if (t[1].is_none()) {
        errs.emplace_back(call, grpc::Status(grpc::StatusCode(t[2].cast<int>()),
                                             t[3].cast<std::string>()));
        continue;
      }
      grpc::ByteBuffer bb;
      std::string err = Encode(call, t[1].cast<py::dict>(), &bb);
      if (err.empty()) {
        oks.emplace_back(call, std::move(bb));
      } else {
        errs.emplace_back(call, grpc::Status(grpc::StatusCode::INTERNAL, err));
      }
    } catch (std::exception& e) {  // a malformed item from Python: fail its call, not all
      if (call != nullptr) {
        errs.emplace_back(call, grpc::Status(grpc::StatusCode::INTERNAL,
                                             std::string("front end: ") + e.what()));
      }
    }
  }
  py::gil_scoped_release nogil;
  for (auto& [call, bb] : oks) Finish(call, &bb, grpc::Status::OK);
  for (auto& [call, st] : errs) Finish(call, nullptr, st);
  EndBusy(oks.size() + errs.size());
}

void Frontend::Forward(const std::vector<uint64_t>& ids) {
  for (uint64_t id : ids) {
    Call* call = Claim(id);
    if (call == nullptr) continue;
    py::gil_scoped_release nogil;
    bool release;
    {
      std::lock_guard<std::mutex> l(call->mu);
      call->py_owned = false;
      forwarded_++;
      call->StartRelay(true);
      release = call->Releasable();
    }
    if (release) delete call;
    EndBusy(1);
  }
}

py::dict Frontend::Stats() const {
  py::dict d;
  d["fast"] = int64_t(fast_);
  d["relayed"] = int64_t(relayed_);
  d["forwarded"] = int64_t(forwarded_);
  d["shed"] = int64_t(shed_);  // refused at the door by a model's queue (RESOURCE_EXHAUSTED)
  d["inflight"] = int64_t(inflight_);
  d["relaying"] = int64_t(relaying_);  // relayed ModelInfer calls not yet released
  d["refused"] = int64_t(refused_);  // refused because the server is shutting down
  d["denied"] = int64_t(denied_);  // ModelInfer without the bearer token (UNAUTHENTICATED)
  d["live_calls"] = int64_t(live_calls_);  // call objects, including those awaiting an RPC
  d["unread"] = int64_t(unread_);  // accepted ModelInfer calls awaiting their message
  d["coalesce_us"] = int64_t(coalesce_ns_) / 1000;  // the read-coalescing pause (cq_poll.cc)
  d["coalesce_pauses"] = int64_t(coalesce_pauses_);
  if (http_) http_->Stats(&d);
  return d;
}

// -- used by calls (no GIL) ---------------------------------------------------------------------

void Frontend::Spawn(grpc::ServerCompletionQueue* cq) {
  // Calls keep being requested until the queues close: an RPC arriving while the server shuts
  // down must find one (then it is refused or drained), or gRPC cancels it unseen.
  std::lock_guard<std::mutex> stop_guard(qmu_);
  if (cq_closed_) return;
  auto* c = new Call(this, cq);
  c->sctx.AsyncNotifyWhenDone(&c->tags[kDone]);  // delivered only once the call starts
  std::lock_guard<std::mutex> l(c->mu);
  service_.RequestCall(&c->sctx, &c->stream, cq, cq, c->T(kRequest));
}

bool Frontend::TryFast(Call* c) {
  if (std::string_view(c->sctx.method()) != kInferMethod || !accepting_) return false;
  if (!Authorized(c->sctx, token_)) return RefuseUnauthorized(c);
  if (tenants_ && (c->tenant = tenants_->Of(c->sctx)) < 0) return RefuseUnknown(c);
  if (!c->in.Valid() || !c->in.TrySingleSlice(&c->message).ok()) {
    if (!c->in.Valid() || !c->in.DumpToSingleSlice(&c->message).ok()) return false;
  }
  std::string_view msg(reinterpret_cast<const char*>(c->message.begin()), c->message.size());
  Request r;
  if (!ParseRequest(msg, &r)) return false;
  std::shared_ptr<const Model> m = Route(c, r);
  if (!m || (!m->queue && c->trace == 1)) return false;  // sampled: Python's feeder path
  Fast f;
  int64_t rows = -1;
  if (!MatchInputs(r, *m, msg, max_rows_, max_tensor_bytes_, &f.offsets, &rows)) return false;
  if (!MatchOutputs(r, *m, &c->out_index) || (m->queue && rows == 0)) return false;
  int64_t priority = r.priority > 0 ? r.priority : (int64_t(1) << 30);
  if (tenants_ && OverQuota(c, rows, &priority)) return true;
  // Deadline: the earliest of the gRPC deadline, Triton's timeout and the model's default.
  double now = MonoNow();
  double deadline = -1;
  auto dl = c->sctx.deadline();
  if (dl < std::chrono::system_clock::time_point::max() - std::chrono::hours(24 * 365)) {
    double remaining = std::chrono::duration<double>(dl - std::chrono::system_clock::now()).count();
    deadline = now + remaining;
  }
  auto earliest = [&deadline](double d) { deadline = deadline < 0 ? d : std::min(deadline, d); };
  if (r.timeout_us < 0 && m->default_timeout_us > 0) earliest(now + m->default_timeout_us / 1e6);
  if (r.timeout_us > 0) earliest(now + r.timeout_us / 1e6);
  c->model = m;
  c->model_name = r.model_name;
  c->id = r.id;
  c->rows = rows;
  c->py_owned = true;
  f.call = c;
  f.slot = m->slot;
  f.rows = rows;
  f.arrival = now;
  f.deadline = deadline;
  f.priority = priority;
  if (m->queue) return QueueNative(c, *m, f);
  f.request_id = r.id.empty() ? id_prefix_ + "-" + std::to_string(request_ids_++)
                              : std::string(r.id);
  {
    std::lock_guard<std::mutex> l(qmu_);
    if (stopped_) {
      c->py_owned = false;
      return false;
    }
    f.id = next_id_++;
    owned_[f.id] = c;
    inflight_++;
    fast_++;
    queue_.push_back(std::move(f));
  }
  qcv_.notify_one();
  return true;
}

bool Frontend::QueueNative(Call* c, const Model& m, const Fast& f) {
  inflight_++;  // before the runner can answer it
  std::string why;
  AddResult r = m.queue->AddNative(c, c->message.begin(), f.rows, f.offsets, f.arrival,
                                   f.deadline, f.priority, &why, TraceOf(c));
  switch (r) {
    case AddResult::kQueued:
      fast_++;
      return true;
    case AddResult::kRefused:
    case AddResult::kInvalid:
      inflight_--;
      shed_ += r == AddResult::kRefused;
      c->py_owned = false;
      c->stream.Finish(grpc::Status(AddStatus(r), why), c->T(kSFinish));
      return true;
    case AddResult::kStopping:
    default:
      inflight_--;
      c->py_owned = false;
      return false;
  }
}

Call* Frontend::Claim(uint64_t id) {
  std::lock_guard<std::mutex> l(qmu_);
  auto it = owned_.find(id);
  if (it == owned_.end()) return nullptr;
  Call* c = it->second;
  owned_.erase(it);
  inflight_--;
  busy_++;  // Stop waits until the operations this claim leads to have started
  return c;
}

void Frontend::EndBusy(size_t n) {
  if (n == 0) return;
  {
    std::lock_guard<std::mutex> l(qmu_);
    busy_ -= int64_t(n);
  }
  busy_cv_.notify_all();
}

void Frontend::Finish(Call* call, grpc::ByteBuffer* bb, const grpc::Status& st) {
  std::lock_guard<std::mutex> l(call->mu);
  call->py_owned = false;
  if (bb != nullptr) {
    call->stream.WriteAndFinish(*bb, grpc::WriteOptions(), st, call->T(kSFinish));
  } else {
    call->stream.Finish(st, call->T(kSFinish));
  }
}

}  // namespace xlaserve::native
