// Native gRPC front end: owns the public port and serves ModelInfer for plain batched models
// without Python per-RPC work; every other call is relayed unchanged to the Python servicer.
//
// One AsyncGenericService sees each call as raw bytes. A ModelInfer for a model Python
// registered as "fast" is parsed here (hand-written protobuf wire parsing), validated against
// the model's input specs and queued for Python's feeder thread, which takes requests in bulk
// (`take`) and submits them to the model's runner; the runner's answers come back in bulk
// (`complete`) and are encoded here. Anything not fully understood (typed contents, BYTES,
// unknown model, other parameters, bad shapes, other methods, streams) is proxied byte for
// byte, with metadata and deadline, to the Python grpc.aio server on an internal address
// through a GenericStub, so its status codes and messages stay the single source of truth.

#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <grpcpp/generic/async_generic_service.h>
#include <grpcpp/generic/generic_stub.h>
#include <grpcpp/grpcpp.h>

#include <algorithm>
#include <atomic>
#include <cctype>
#include <chrono>
#include <condition_variable>
#include <cstring>
#include <ctime>
#include <deque>
#include <memory>
#include <mutex>
#include <string>
#include <string_view>
#include <thread>
#include <unordered_map>
#include <vector>

namespace py = pybind11;

namespace {

constexpr std::string_view kInferMethod = "/inference.GRPCInferenceService/ModelInfer";

double MonoNow() {  // the clock of Python's time.perf_counter() on Linux
  timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return ts.tv_sec + ts.tv_nsec * 1e-9;
}

// -- model table -------------------------------------------------------------------------------

struct Spec {
  std::string name, datatype;
  std::vector<int64_t> dims;  // dims[0] == -1 (rows)
  int64_t row_bytes = 0;      // bytes per row
};

struct Model {
  int slot = 0;
  std::string version;  // the response's model_version
  std::vector<Spec> inputs, outputs;
  int64_t default_timeout_us = 0;
};

using Table = std::unordered_map<std::string, std::shared_ptr<const Model>>;  // name '\0' version

std::string Key(std::string_view name, std::string_view version) {
  std::string k(name);
  k.push_back('\0');
  k.append(version);
  return k;
}

// -- protobuf wire reading ---------------------------------------------------------------------

struct Wire {
  const uint8_t* p;
  const uint8_t* end;

  bool Varint(uint64_t* v) {
    uint64_t out = 0;
    for (int shift = 0; shift < 64; shift += 7) {
      if (p >= end) return false;
      uint8_t b = *p++;
      out |= uint64_t(b & 0x7f) << shift;
      if (!(b & 0x80)) {
        *v = out;
        return true;
      }
    }
    return false;
  }
  bool Tag(uint32_t* field, uint32_t* type) {
    uint64_t t;
    if (!Varint(&t) || (t >> 3) == 0 || (t >> 3) > 0x1fffffff) return false;
    *field = uint32_t(t >> 3);
    *type = uint32_t(t & 7);
    return true;
  }
  bool Bytes(std::string_view* out) {
    uint64_t n;
    if (!Varint(&n) || n > uint64_t(end - p)) return false;
    *out = std::string_view(reinterpret_cast<const char*>(p), n);
    p += n;
    return true;
  }
};

bool ValidUtf8(std::string_view s) {
  const auto* p = reinterpret_cast<const uint8_t*>(s.data());
  const auto* e = p + s.size();
  while (p < e) {
    uint8_t c = *p;
    if (c < 0x80) { ++p; continue; }
    int n = (c >> 5) == 6 ? 1 : (c >> 4) == 14 ? 2 : (c >> 3) == 30 ? 3 : -1;
    if (n < 0 || e - p <= n) return false;
    uint32_t cp = c & (0x3f >> n);
    for (int i = 1; i <= n; ++i) {
      if ((p[i] & 0xc0) != 0x80) return false;
      cp = (cp << 6) | (p[i] & 0x3f);
    }
    if ((n == 1 && cp < 0x80) || (n == 2 && cp < 0x800) || (n == 3 && cp < 0x10000) ||
        cp > 0x10ffff || (cp >= 0xd800 && cp <= 0xdfff)) return false;
    p += n + 1;
  }
  return true;
}

struct InTensor {
  std::string_view name, datatype;
  std::vector<int64_t> shape;
};

struct Request {
  std::string_view model_name, model_version, id;
  std::vector<InTensor> inputs;
  std::vector<std::string_view> outputs;
  std::vector<std::string_view> raw;
  int64_t timeout_us = -1;  // absent
  int64_t priority = -1;    // absent
};

// An InferParameter holding a non-negative integer; anything else is left to Python.
bool IntParam(std::string_view msg, int64_t* out) {
  Wire w{reinterpret_cast<const uint8_t*>(msg.data()),
         reinterpret_cast<const uint8_t*>(msg.data()) + msg.size()};
  int seen = 0;
  while (w.p < w.end) {
    uint32_t f, t;
    uint64_t v;
    if (!w.Tag(&f, &t) || t != 0 || (f != 2 && f != 5) || !w.Varint(&v)) return false;
    if (v > (uint64_t(1) << 62)) return false;  // negative int64 or absurd
    *out = int64_t(v);
    ++seen;
  }
  return seen == 1;
}

// A well-formed InferParameter of any kind (Python ignores the ones it does not use).
bool AnyParam(std::string_view msg) {
  Wire w{reinterpret_cast<const uint8_t*>(msg.data()),
         reinterpret_cast<const uint8_t*>(msg.data()) + msg.size()};
  while (w.p < w.end) {
    uint32_t f, t;
    uint64_t v;
    std::string_view s;
    if (!w.Tag(&f, &t)) return false;
    if ((f == 1 || f == 2 || f == 5) && t == 0) {
      if (!w.Varint(&v)) return false;
    } else if (f == 3 && t == 2) {
      if (!w.Bytes(&s) || !ValidUtf8(s)) return false;
    } else if (f == 4 && t == 1) {
      if (w.end - w.p < 8) return false;
      w.p += 8;
    } else {
      return false;
    }
  }
  return true;
}

bool ParseParameter(std::string_view entry, Request* r) {
  Wire w{reinterpret_cast<const uint8_t*>(entry.data()),
         reinterpret_cast<const uint8_t*>(entry.data()) + entry.size()};
  std::string_view key, value;
  bool has_value = false;
  while (w.p < w.end) {
    uint32_t f, t;
    if (!w.Tag(&f, &t) || t != 2) return false;
    if (f == 1) {
      if (!w.Bytes(&key)) return false;
    } else if (f == 2) {
      if (!w.Bytes(&value)) return false;
      has_value = true;
    } else {
      return false;
    }
  }
  if (key == "timeout" || key == "priority") {  // validated and used, as in servicer.py
    int64_t v;
    if (!has_value || !IntParam(value, &v)) return false;
    int64_t* slot = key == "timeout" ? &r->timeout_us : &r->priority;
    if (*slot >= 0) return false;  // given twice: the Python servicer decides
    *slot = v;
    return true;
  }
  // Any other parameter (e.g. perf_analyzer's triton_enable_empty_final_response): plain
  // batched models ignore it, exactly as the Python servicer does.
  return ValidUtf8(key) && (!has_value || AnyParam(value));
}

bool ParseInput(std::string_view msg, InTensor* t) {
  Wire w{reinterpret_cast<const uint8_t*>(msg.data()),
         reinterpret_cast<const uint8_t*>(msg.data()) + msg.size()};
  while (w.p < w.end) {
    uint32_t f, type;
    if (!w.Tag(&f, &type)) return false;
    if (f == 1 && type == 2) {
      if (!w.Bytes(&t->name)) return false;
    } else if (f == 2 && type == 2) {
      if (!w.Bytes(&t->datatype)) return false;
    } else if (f == 3 && type == 2) {  // packed
      std::string_view packed;
      if (!w.Bytes(&packed)) return false;
      Wire pw{reinterpret_cast<const uint8_t*>(packed.data()),
              reinterpret_cast<const uint8_t*>(packed.data()) + packed.size()};
      while (pw.p < pw.end) {
        uint64_t v;
        if (!pw.Varint(&v) || t->shape.size() >= 16) return false;
        t->shape.push_back(int64_t(v));
      }
    } else if (f == 3 && type == 0) {
      uint64_t v;
      if (!w.Varint(&v) || t->shape.size() >= 16) return false;
      t->shape.push_back(int64_t(v));
    } else {
      return false;  // parameters, typed contents, unknown fields: Python decides
    }
  }
  return true;
}

bool ParseOutput(std::string_view msg, std::string_view* name) {
  Wire w{reinterpret_cast<const uint8_t*>(msg.data()),
         reinterpret_cast<const uint8_t*>(msg.data()) + msg.size()};
  bool named = false;
  while (w.p < w.end) {
    uint32_t f, t;
    std::string_view v;
    if (!w.Tag(&f, &t) || t != 2 || !w.Bytes(&v)) return false;
    if (f == 1) {
      *name = v;
      named = true;
    } else if (f != 2) {  // 2: output parameters, which Python ignores too
      return false;
    }
  }
  return named;
}

bool ParseRequest(std::string_view msg, Request* r) {
  Wire w{reinterpret_cast<const uint8_t*>(msg.data()),
         reinterpret_cast<const uint8_t*>(msg.data()) + msg.size()};
  while (w.p < w.end) {
    uint32_t f, t;
    std::string_view v;
    if (!w.Tag(&f, &t) || t != 2 || !w.Bytes(&v)) return false;
    switch (f) {
      case 1: r->model_name = v; break;
      case 2: r->model_version = v; break;
      case 3: r->id = v; break;
      case 4: if (!ParseParameter(v, r)) return false; break;
      case 5:
        if (r->inputs.size() >= 64) return false;
        r->inputs.emplace_back();
        if (!ParseInput(v, &r->inputs.back())) return false;
        break;
      case 6:
        if (r->outputs.size() >= 64) return false;
        r->outputs.emplace_back();
        if (!ParseOutput(v, &r->outputs.back())) return false;
        break;
      case 7: r->raw.push_back(v); break;
      default: return false;
    }
  }
  return ValidUtf8(r->id);
}

// -- protobuf wire writing ---------------------------------------------------------------------

size_t VarintSize(uint64_t v) {
  size_t n = 1;
  while (v >= 0x80) { v >>= 7; ++n; }
  return n;
}
uint8_t* PutVarint(uint8_t* p, uint64_t v) {
  while (v >= 0x80) { *p++ = uint8_t(v) | 0x80; v >>= 7; }
  *p++ = uint8_t(v);
  return p;
}
size_t FieldSize(size_t len) { return 1 + VarintSize(len) + len; }  // field numbers < 16
uint8_t* PutField(uint8_t* p, int field, const void* data, size_t len) {
  *p++ = uint8_t(field << 3 | 2);
  p = PutVarint(p, len);
  if (len) std::memcpy(p, data, len);
  return p + len;
}

// -- calls -------------------------------------------------------------------------------------

class Frontend;

enum Op : uint8_t {
  kRequest, kDone, kSRead, kSWrite, kSFinish, kCStart, kCRead, kCWrite, kCWritesDone, kCFinish,
  kOps
};

struct Call;
struct Tag {
  Call* call;
  Op op;
};

// One queued fast request, as Python's feeder takes it.
struct Fast {
  Call* call;
  uint64_t id;
  int slot;
  int64_t rows;
  std::vector<size_t> offsets;  // per input, in spec order, into the message bytes
  double arrival, deadline;     // deadline < 0: none
  int64_t priority;
  std::string request_id;
};

// The request's bytes, shared by its Call and Python's arrays (buffer protocol).
struct RequestBuffer {
  grpc::Slice slice;
};

struct Call {
  Frontend* fe;
  grpc::ServerCompletionQueue* cq;
  std::mutex mu;
  grpc::GenericServerContext sctx;
  grpc::GenericServerAsyncReaderWriter stream{&sctx};
  Tag tags[kOps];
  int pending = 0;       // outstanding completion-queue operations (the done tag included)
  bool py_owned = false;  // queued for, or held by, Python
  bool started = false;
  // fast path
  grpc::ByteBuffer in;
  grpc::Slice message;
  std::shared_ptr<const Model> model;
  std::vector<int> out_index;  // requested outputs (indexes into model->outputs)
  std::string_view model_name, id;
  int64_t rows = 0;
  // relay
  std::unique_ptr<grpc::ClientContext> cctx;
  std::unique_ptr<grpc::GenericClientAsyncReaderWriter> cstream;
  grpc::ByteBuffer down;  // backend -> client
  grpc::Status cstatus;
  bool relaying = false, up_pending = false, up_closed = false, s_reading = false, c_started = false;
  bool c_writing = false, writes_done = false, c_read_done = false, c_failed = false;
  bool c_finishing = false, s_dead = false, done = false;

  Call(Frontend* f, grpc::ServerCompletionQueue* q);
  ~Call();
  void* T(Op op) {
    ++pending;
    return &tags[op];
  }
  bool Releasable() const { return pending == 0 && !py_owned; }

  void OnEvent(Op op, bool ok);  // defined after Frontend
  void StartRelay(bool have_first);
  void PumpUp();
  void MaybeFinishBackend();
};

// -- the front end -----------------------------------------------------------------------------

class Frontend {
 public:
  Frontend(std::string backend, int64_t max_message_bytes, int64_t max_rows,
           int64_t max_tensor_bytes, std::string token, std::string id_prefix, int threads)
      : backend_(std::move(backend)), max_message_bytes_(max_message_bytes), max_rows_(max_rows),
        max_tensor_bytes_(max_tensor_bytes), token_(std::move(token)),
        id_prefix_(std::move(id_prefix)), threads_(threads < 1 ? 1 : threads),
        table_(std::make_shared<Table>()) {}

  ~Frontend() { Stop(0.0); }

  int Start(const std::string& address) {
    grpc::ChannelArguments args;
    args.SetMaxReceiveMessageSize(-1);
    args.SetMaxSendMessageSize(-1);
    args.SetInt(GRPC_ARG_ENABLE_RETRIES, 0);
    channel_ = grpc::CreateCustomChannel(backend_, grpc::InsecureChannelCredentials(), args);
    stub_ = std::make_unique<grpc::GenericStub>(channel_);
    grpc::ServerBuilder builder;
    int port = 0;
    builder.AddListeningPort(address, grpc::InsecureServerCredentials(), &port);
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

  // Refuses what Python still holds (UNAVAILABLE), shuts the server down (cancelling calls
  // still open after `grace_s`), waits for every call to be released, then stops the threads.
  void Stop(double grace_s) {
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
      Finish(c, nullptr, grpc::Status(grpc::StatusCode::UNAVAILABLE,
                                      "server is shutting down; retry on another replica"));
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
      for (auto& cq : cqs_) cq->Shutdown();
      for (auto& t : workers_) t.join();
      workers_.clear();
      server_.reset();
    }
  }

  void SetModels(const std::vector<py::tuple>& entries) {
    auto table = std::make_shared<Table>();
    for (const auto& e : entries) {
      auto m = std::make_shared<Model>();
      auto name = e[0].cast<std::string>();
      auto version_key = e[1].cast<std::string>();
      m->slot = e[2].cast<int>();
      m->version = e[3].cast<std::string>();
      for (int which = 4; which <= 5; ++which) {
        for (auto s : e[which].cast<py::list>()) {
          auto t = s.cast<py::tuple>();
          Spec spec{t[0].cast<std::string>(), t[1].cast<std::string>(),
                    t[2].cast<std::vector<int64_t>>(), 0};
          int64_t n = t[3].cast<int64_t>();
          for (size_t d = 1; d < spec.dims.size(); ++d) n *= spec.dims[d];
          spec.row_bytes = n;
          (which == 4 ? m->inputs : m->outputs).push_back(std::move(spec));
        }
      }
      m->default_timeout_us = e[6].cast<int64_t>();
      (*table)[Key(name, version_key)] = m;
    }
    std::lock_guard<std::mutex> l(table_mu_);
    table_ = std::move(table);
  }

  void SetAccepting(bool v) { accepting_ = v; }

  // Blocks (GIL released) until requests are queued, `timeout_s` passes, or the front end stops
  // (None). Each item: (call, slot, rows, buffer, offsets, arrival, deadline, priority, id).
  py::object Take(size_t max_items, double timeout_s) {
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

  // Answers fast calls: items of (call, outputs dict or None, grpc code, message).
  void Complete(const py::list& items) {
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

  // Hands fast calls back to the relay: Python's servicer answers them.
  void Forward(const std::vector<uint64_t>& ids) {
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

  int64_t Inflight() const { return inflight_; }
  py::dict Stats() const {
    py::dict d;
    d["fast"] = int64_t(fast_);
    d["relayed"] = int64_t(relayed_);
    d["forwarded"] = int64_t(forwarded_);
    d["inflight"] = int64_t(inflight_);
    d["live_calls"] = int64_t(live_calls_);  // call objects, including those awaiting an RPC
    return d;
  }

  // -- used by calls (no GIL) --

  // Offers a fresh call object for the next RPC, unless stopping (then the queue may be shut).
  void Spawn(grpc::ServerCompletionQueue* cq) {
    std::lock_guard<std::mutex> stop_guard(qmu_);
    if (stopped_) return;
    auto* c = new Call(this, cq);
    c->sctx.AsyncNotifyWhenDone(&c->tags[kDone]);  // delivered only once the call starts
    std::lock_guard<std::mutex> l(c->mu);
    service_.RequestCall(&c->sctx, &c->stream, cq, cq, c->T(kRequest));
  }

  // Parses and validates a ModelInfer; true when it was queued for Python (call->mu held).
  bool TryFast(Call* c);

  grpc::GenericStub* stub() { return stub_.get(); }
  std::atomic<int64_t> relayed_{0}, live_calls_{0};

 private:
  Call* Claim(uint64_t id) {
    std::lock_guard<std::mutex> l(qmu_);
    auto it = owned_.find(id);
    if (it == owned_.end()) return nullptr;
    Call* c = it->second;
    owned_.erase(it);
    inflight_--;
    busy_++;  // Stop waits until the operations this claim leads to have started
    return c;
  }

  void EndBusy(size_t n) {
    if (n == 0) return;
    {
      std::lock_guard<std::mutex> l(qmu_);
      busy_ -= int64_t(n);
    }
    busy_cv_.notify_all();
  }

  void Finish(Call* call, grpc::ByteBuffer* bb, const grpc::Status& st) {
    std::lock_guard<std::mutex> l(call->mu);
    call->py_owned = false;
    if (bb != nullptr) {
      call->stream.WriteAndFinish(*bb, grpc::WriteOptions(), st, call->T(kSFinish));
    } else {
      call->stream.Finish(st, call->T(kSFinish));
    }
  }

  std::string Encode(Call* c, const py::dict& outputs, grpc::ByteBuffer* bb);

  void Poll(grpc::ServerCompletionQueue* cq) {
    void* raw;
    bool ok;
    while (cq->Next(&raw, &ok)) {
      auto* tag = static_cast<Tag*>(raw);
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

  std::string backend_;
  int64_t max_message_bytes_, max_rows_, max_tensor_bytes_;
  std::string token_, id_prefix_;
  int threads_;
  std::shared_ptr<grpc::Channel> channel_;
  std::unique_ptr<grpc::GenericStub> stub_;
  grpc::AsyncGenericService service_;
  std::unique_ptr<grpc::Server> server_;
  std::vector<std::unique_ptr<grpc::ServerCompletionQueue>> cqs_;
  std::vector<std::thread> workers_;
  std::mutex table_mu_;
  std::shared_ptr<Table> table_;
  std::atomic<bool> accepting_{true};
  std::mutex qmu_;
  std::condition_variable qcv_, busy_cv_;
  int64_t busy_ = 0;
  std::deque<Fast> queue_;
  std::unordered_map<uint64_t, Call*> owned_;
  bool stopped_ = false;
  uint64_t next_id_ = 1;
  std::atomic<int64_t> inflight_{0}, fast_{0}, forwarded_{0};
  std::atomic<uint64_t> request_ids_{1};
};

Call::Call(Frontend* f, grpc::ServerCompletionQueue* q) : fe(f), cq(q) {
  for (int i = 0; i < kOps; ++i) tags[i] = Tag{this, Op(i)};
  fe->live_calls_++;
}

Call::~Call() { fe->live_calls_--; }

bool Authorized(const grpc::GenericServerContext& ctx, const std::string& token) {
  if (token.empty()) return true;
  for (const auto& [key, value] : ctx.client_metadata()) {
    if (std::string_view(key.data(), key.size()) != "authorization") continue;
    std::string_view v(value.data(), value.size());
    auto sp = v.find(' ');
    std::string_view scheme = v.substr(0, sp == std::string_view::npos ? v.size() : sp);
    std::string_view tok = sp == std::string_view::npos ? std::string_view() : v.substr(sp + 1);
    while (!tok.empty() && std::isspace(uint8_t(tok.front()))) tok.remove_prefix(1);
    while (!tok.empty() && std::isspace(uint8_t(tok.back()))) tok.remove_suffix(1);
    if (scheme.size() != 6) return false;
    for (size_t i = 0; i < 6; ++i) {
      if (std::tolower(uint8_t(scheme[i])) != "bearer"[i]) return false;
    }
    if (tok.size() != token.size()) return false;
    uint8_t diff = 0;  // constant time
    for (size_t i = 0; i < tok.size(); ++i) diff |= uint8_t(tok[i]) ^ uint8_t(token[i]);
    return diff == 0;  // the first authorization header decides, as in serving/frontend/auth.py
  }
  return false;
}

bool Frontend::TryFast(Call* c) {
  if (std::string_view(c->sctx.method()) != kInferMethod || !accepting_) return false;
  if (!Authorized(c->sctx, token_)) return false;
  if (!c->in.Valid() || !c->in.TrySingleSlice(&c->message).ok()) {
    if (!c->in.Valid() || !c->in.DumpToSingleSlice(&c->message).ok()) return false;
  }
  std::string_view msg(reinterpret_cast<const char*>(c->message.begin()), c->message.size());
  Request r;
  if (!ParseRequest(msg, &r)) return false;
  std::shared_ptr<const Model> m;
  {
    std::lock_guard<std::mutex> l(table_mu_);
    auto it = table_->find(Key(r.model_name, r.model_version));
    if (it == table_->end()) return false;
    m = it->second;
  }
  const size_t n = m->inputs.size();
  if (r.inputs.size() != n || r.raw.size() != n) return false;
  Fast f;
  f.offsets.assign(n, 0);
  std::vector<bool> seen(n, false);
  int64_t rows = -1;
  for (size_t i = 0; i < n; ++i) {
    const InTensor& t = r.inputs[i];
    size_t k = 0;
    while (k < n && m->inputs[k].name != t.name) ++k;
    if (k == n || seen[k]) return false;
    seen[k] = true;
    const Spec& s = m->inputs[k];
    if (t.datatype != s.datatype || t.shape.size() != s.dims.size()) return false;
    for (size_t d = 1; d < s.dims.size(); ++d) {
      if (t.shape[d] != s.dims[d]) return false;
    }
    int64_t nr = t.shape[0];
    if (nr < 1 || nr > max_rows_ || (rows >= 0 && nr != rows)) return false;
    rows = nr;
    if (s.row_bytes != 0 && nr > max_tensor_bytes_ / s.row_bytes) return false;
    if (int64_t(r.raw[i].size()) != nr * s.row_bytes) return false;
    f.offsets[k] = size_t(r.raw[i].data() - msg.data());
  }
  c->out_index.clear();
  for (auto name : r.outputs) {
    size_t k = 0;
    while (k < m->outputs.size() && m->outputs[k].name != name) ++k;
    if (k == m->outputs.size()) return false;
    c->out_index.push_back(int(k));
  }
  if (r.outputs.empty()) {
    for (size_t k = 0; k < m->outputs.size(); ++k) c->out_index.push_back(int(k));
  }
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
  f.priority = r.priority > 0 ? r.priority : (int64_t(1) << 30);
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

std::string Frontend::Encode(Call* c, const py::dict& outputs, grpc::ByteBuffer* bb) {
  const Model& m = *c->model;
  struct Piece {
    const Spec* spec;
    Py_buffer view;
    py::object holder;
    size_t tensor_len;
  };
  std::vector<Piece> pieces;
  pieces.reserve(c->out_index.size());
  auto release_all = [&pieces] {
    for (auto& p : pieces) PyBuffer_Release(&p.view);
  };
  size_t total = FieldSize(c->model_name.size()) + FieldSize(m.version.size()) +
                 (c->id.empty() ? 0 : FieldSize(c->id.size()));
  for (int k : c->out_index) {
    const Spec& s = m.outputs[k];
    PyObject* arr = PyDict_GetItemString(outputs.ptr(), s.name.c_str());
    if (arr == nullptr) {
      release_all();
      return "model output '" + s.name + "' is missing";
    }
    Piece p{&s, {}, py::reinterpret_borrow<py::object>(arr), 0};
    if (PyObject_GetBuffer(arr, &p.view, PyBUF_C_CONTIGUOUS) != 0) {
      PyErr_Clear();  // non-contiguous, or a dtype numpy cannot export (bfloat16): bytes
      try {
        p.holder = py::reinterpret_borrow<py::object>(arr).attr("tobytes")();
      } catch (py::error_already_set&) {
        release_all();
        return "model output '" + s.name + "' is not an array";
      }
      if (PyObject_GetBuffer(p.holder.ptr(), &p.view, PyBUF_SIMPLE) != 0) {
        PyErr_Clear();
        release_all();
        return "model output '" + s.name + "' is not an array";
      }
    }
    if (p.view.len != c->rows * s.row_bytes) {
      PyBuffer_Release(&p.view);
      release_all();
      return "model output '" + s.name + "' has " + std::to_string(p.view.len) +
             " bytes, expected " + std::to_string(c->rows * s.row_bytes);
    }
    size_t shape_len = VarintSize(uint64_t(c->rows));
    for (size_t d = 1; d < s.dims.size(); ++d) shape_len += VarintSize(uint64_t(s.dims[d]));
    p.tensor_len = FieldSize(s.name.size()) + FieldSize(s.datatype.size()) + FieldSize(shape_len);
    total += FieldSize(p.tensor_len) + FieldSize(size_t(p.view.len));
    pieces.push_back(std::move(p));
  }
  grpc::Slice slice(total);
  auto* out = const_cast<uint8_t*>(slice.begin());
  out = PutField(out, 1, c->model_name.data(), c->model_name.size());
  out = PutField(out, 2, m.version.data(), m.version.size());
  if (!c->id.empty()) out = PutField(out, 3, c->id.data(), c->id.size());
  for (auto& p : pieces) {
    const Spec& s = *p.spec;
    *out++ = uint8_t(5 << 3 | 2);
    out = PutVarint(out, p.tensor_len);
    out = PutField(out, 1, s.name.data(), s.name.size());
    out = PutField(out, 2, s.datatype.data(), s.datatype.size());
    size_t shape_len = VarintSize(uint64_t(c->rows));
    for (size_t d = 1; d < s.dims.size(); ++d) shape_len += VarintSize(uint64_t(s.dims[d]));
    *out++ = uint8_t(3 << 3 | 2);
    out = PutVarint(out, shape_len);
    out = PutVarint(out, uint64_t(c->rows));
    for (size_t d = 1; d < s.dims.size(); ++d) out = PutVarint(out, uint64_t(s.dims[d]));
  }
  for (auto& p : pieces) out = PutField(out, 6, p.view.buf, size_t(p.view.len));
  release_all();
  *bb = grpc::ByteBuffer(&slice, 1);
  return "";
}

// -- call events (call->mu held) -----------------------------------------------------------------

void Call::OnEvent(Op op, bool ok) {
  switch (op) {
    case kRequest:
      if (!ok) return;  // shutting down; the done tag never comes for a call that never started
      started = true;
      ++pending;  // the done tag
      fe->Spawn(cq);
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
        bool fast = false;
        if (ok) {
          try {
            fast = fe->TryFast(this);
          } catch (...) {
            fast = false;
          }
        }
        if (!fast) {
          fe->relayed_++;
          StartRelay(ok);
        }
        return;
      }
      if (ok) {
        up_pending = true;
      } else {
        up_closed = true;
      }
      PumpUp();
      return;
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
    case kSWrite:
      if (!ok && !s_dead) {
        s_dead = true;
        cctx->TryCancel();
      }
      cstream->Read(&down, T(kCRead));
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
    case kSFinish:
      return;
    default:
      return;
  }
}

void Call::StartRelay(bool have_first) {
  relaying = true;
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
        key == "te" || key == "content-type" || key == "host") {
      continue;
    }
    bool valid = true;
    for (char ch : key) {
      valid = valid && ((ch >= 'a' && ch <= 'z') || (ch >= '0' && ch <= '9') || ch == '-' ||
                        ch == '_' || ch == '.');
    }
    if (valid) cctx->AddMetadata(key, std::string(v.data(), v.size()));
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

}  // namespace

PYBIND11_MODULE(_native, m) {
  m.doc() = "xlaserve's native gRPC front end (see serving/frontend/native.py)";
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
      .def("start", &Frontend::Start, py::call_guard<py::gil_scoped_release>())
      .def("stop", &Frontend::Stop, py::call_guard<py::gil_scoped_release>())
      .def("set_models", &Frontend::SetModels)
      .def("set_accepting", &Frontend::SetAccepting)
      .def("take", &Frontend::Take)
      .def("complete", &Frontend::Complete)
      .def("forward", &Frontend::Forward)
      .def("inflight", &Frontend::Inflight)
      .def("stats", &Frontend::Stats);
}
