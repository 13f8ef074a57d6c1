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
//
// This header (with model_table.h: the model table and a parsed ModelInfer) holds what the
// units share:
//   wire.cc    protobuf wire parsing and validation against the specs;
//   wire_encode.cc  response encoding;
//   relay.cc   a call's completion-queue events and the relay to the Python servicer;
//   auth.cc    the bearer token check (gRPC and HTTP);
//   module.cc  the server, its completion queues and the fast queue (bindings.cc: pybind11).
// The same table of models and the same batch queues (row_queue.h) serve the native HTTP front
// end (http.h), which the Frontend starts and stops with its own.

#ifndef XLASERVE_SERVING_FRONTEND_NATIVE_FRONTEND_H_
#define XLASERVE_SERVING_FRONTEND_NATIVE_FRONTEND_H_

#include <pybind11/pybind11.h>

#include <grpcpp/alarm.h>
#include <grpcpp/generic/async_generic_service.h>
#include <grpcpp/generic/generic_stub.h>
#include <grpcpp/grpcpp.h>

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <memory>
#include <mutex>
#include <string>
#include <string_view>
#include <thread>
#include <unordered_set>
#include <unordered_map>
#include <vector>

#include "model_table.h"

namespace py = pybind11;

namespace xlaserve::native {

inline constexpr std::string_view kInferMethod = "/inference.GRPCInferenceService/ModelInfer";
inline constexpr const char* kShuttingDown = "server is shutting down; retry on another replica";
// The head decision a relayed request carries to Python when tracing ("1" or "0"; trace.cc).
inline constexpr std::string_view kTraceMarker = "x-xlaserve-trace";
// Marks a request the native split relayed for Python to score with the shadow (split.cc).
inline constexpr std::string_view kShadowMarker = "x-xlaserve-shadow";

// A sampled request the native path answers: what Python's spans of it need (trace.cc).
struct TraceInfo {
  std::string name, parent, state, request_id;  // span name, client traceparent, tracestate
  double t_start = 0;  // its first message read (MonoNow); parsed by its arrival in the queue
};

// The clock of Python's time.perf_counter() on Linux (CLOCK_MONOTONIC), in seconds.
double MonoNow();
std::string RandomHex(int digits);  // from /dev/urandom (trace.cc): secrets shared with Python

class RowQueue;    // row_queue.h
class Tenants;     // tenants.h
class HttpServer;  // http.h

// Whether an Authorization value is "Bearer <token>" (constant-time compare).
bool BearerMatches(std::string_view value, const std::string& token);
// serving/frontend/http/app.py's UNAUTHENTICATED, for an HTTP request without the token.
inline constexpr std::string_view kUnauthenticatedHttp =
    "missing or wrong credentials: send the header 'Authorization: Bearer <token>'";

// Plaintext without a certificate file; else TLS from the chain and key files, re-read every
// `reload_s` seconds (a renewed certificate serves new connections without a restart); with a
// client CA bundle (also re-read), mutual TLS: clients must present a certificate it signed.
std::shared_ptr<grpc::ServerCredentials> Credentials(const std::string& cert_file,
                                                     const std::string& key_file, int reload_s,
                                                     const std::string& client_ca);

// Whether the call carries the bearer token (constant-time compare); an empty token: always.
bool Authorized(const grpc::GenericServerContext& ctx, const std::string& token);

// -- calls -------------------------------------------------------------------------------------
class Frontend;

enum Op : uint8_t {
  kRequest, kDone, kSRead, kSWrite, kSFinish, kCStart, kCRead, kCWrite, kCWritesDone, kCFinish,
  kSHeld, kOps
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

// The params generations (live updates) that scored a request, lowest and highest (a request
// split across batches may straddle an update); hi 0: the bundle's own params, not reported.
struct Generations {
  int64_t lo = 0, hi = 0;
};

// Response parameters naming them (generation.cc): ModelInferResponse field 4 entries, and
// the HTTP header's "parameters" object ("" when hi is 0).
std::string GenerationParamsProto(const Generations& g);
std::string GenerationParamsJson(const Generations& g);

// A request a RowQueue holds natively until it is answered: a gRPC call (below) or an HTTP
// request (http.h). Reply is called once, with no lock held; the responder may be gone after.
struct Responder {
  virtual ~Responder() = default;
  // This request's row 0 of every model output (model output order), or its failure.
  virtual void Reply(const std::vector<const uint8_t*>& rows0, const grpc::Status& st,
                     const Generations& gen) = 0;
  virtual std::string LogId() = 0;  // the request's id for the request log
};

// One RPC: its server stream, and for a relayed call its client stream to the Python servicer.
// Its events and the relay live in relay.cc.
struct Call final : Responder {
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
  bool counted = false;  // a relayed ModelInfer, counted in Frontend::relaying_ until released
  bool unread = false;  // a ModelInfer counted in Frontend::unread_ until its message is read
  int trace = -1;  // tracing: the head decision (1: sampled, traced; 0: not; -1: none taken)
  bool shadow = false;  // relayed by a canary split for shadow scoring (kShadowMarker)
  int tenant = -1;  // with tenants: its tenant (-1: not yet decided, or none)
  double trace_t0 = 0;  // when it was decided (its first message read)
  std::unique_ptr<grpc::Alarm> held;  // an over-quota refusal (held_status) waits for it to fire
  grpc::Status held_status;

  Call(Frontend* f, grpc::ServerCompletionQueue* q);
  ~Call() override;
  void Reply(const std::vector<const uint8_t*>& rows0, const grpc::Status& st,
             const Generations& gen) override;
  std::string LogId() override;
  void* T(Op op) {
    ++pending;
    return &tags[op];
  }
  bool Releasable() const { return pending == 0 && !py_owned; }

  void OnEvent(Op op, bool ok);
  void OnBackendEvent(Op op, bool ok);
  void StartRelay(bool have_first);
  void PumpUp();
  void MaybeFinishBackend();
};

// The pause a completion-queue worker takes instead of blocking under load, in ns (read
// coalescing): 2% of the tightest latency target among the table's models, at most 500 us; 0
// without any target (cq_poll.cc).
int64_t CoalesceNs(const Table& table);

// -- the front end (module.cc; Encode in wire_encode.cc) ------------------------------------------

class Frontend {
 public:
  Frontend(std::string backend, int64_t max_message_bytes, int64_t max_rows,
           int64_t max_tensor_bytes, std::string token, std::string id_prefix, int threads);
  ~Frontend();

  int Start(const std::string& address);

  // Serve TLS (before Start): the certificate chain and key files, re-read every `reload_s`
  // seconds, so a renewed certificate takes effect without a restart.
  void SetTls(std::string cert_file, std::string key_file, int reload_s, std::string client_ca) {
    tls_cert_ = std::move(cert_file);
    tls_key_ = std::move(key_file);
    tls_reload_s_ = reload_s;
    tls_client_ca_ = std::move(client_ca);  // "": no client certificates asked for
  }

  // Serves HTTP on host:port natively, relaying what it does not serve to the Python HTTP
  // server on the unix socket `backend` (http.h); returns the port, or raises saying why not.
  int StartHttp(const std::string& host, int port, const std::string& backend,
                double read_timeout_s, double idle_timeout_s, int64_t max_body_bytes,
                int threads);

  // Refuses what Python still holds (UNAVAILABLE), shuts the server down (cancelling calls
  // still open after `grace_s`), waits for every call to be released, then stops the threads.
  void Stop(double grace_s);

  void SetModels(const std::vector<py::tuple>& entries);
  void SetAccepting(bool v) { accepting_ = v; }
  // Tracing (trace.cc): head decisions by a client's traceparent, else a draw against `rate`.
  void SetTracing(bool on, double rate) {
    trace_rate_ = rate;
    tracing_ = on;
  }
  bool Tracing() const { return tracing_; }
  // The HTTP relay's trace mark for Python ("<secret> 1" or "<secret> 0"): the secret is drawn per
  // front end, so a client whose connection is tunnelled unparsed cannot forge a decision.
  std::string TraceMark(bool sampled) const { return trace_secret_ + (sampled ? " 1" : " 0"); }
  const std::string& TraceSecret() const { return trace_secret_; }
  int TraceDecision(std::string_view traceparent);  // 1 sampled, 0 not
  void DecideTrace(Call* c);  // a ModelInfer's head decision (c->trace), when tracing
  std::unique_ptr<TraceInfo> TraceOf(Call* c);  // a sampled call's trace record, else null
  bool Accepting() const { return accepting_; }
  // Tenants and quotas (before Start): every ModelInfer is charged to its tenant (tenants.h).
  void SetTenants(std::shared_ptr<Tenants> t) { tenants_ = std::move(t); }
  // Beyond this many accepted ModelInfer calls awaiting their message, further RPCs wait inside
  // gRPC, unaccepted (before Start). Every accepted call holds completion-queue operations, and
  // Debian's gRPC (built with its debug checks) pays per operation for every one outstanding:
  // an unbounded backlog of accepted calls made each later one slower, and an open-loop
  // overload collapsed to a fifth of the server's rate without recovering.
  void SetAcceptBacklog(int64_t n) { max_unread_ = std::max<int64_t>(n, 1); }
  // On: under a latency target, the completion-queue workers pause to read arrivals together
  // (cq_poll.cc); off (the default): they never pause.
  void SetReadCoalesce(bool on) { coalesce_on_ = on; }
  Tenants* tenants() const { return tenants_.get(); }
  // Charges a parsed ModelInfer of `rows` to its tenant: true when refused over quota (answered
  // RESOURCE_EXHAUSTED once the quota would admit it; call->mu held); else `priority` becomes
  // its tenant's (tenants.cc).
  bool OverQuota(Call* c, int64_t rows, int64_t* priority);
  void Refuse(Call* c, const grpc::Status& st, double hold_s);  // answered hold_s later
  // Answers a ModelInfer no tenant's credentials match UNAUTHENTICATED (Python's message); true.
  bool RefuseUnknown(Call* c);
  // Answers a ModelInfer without the server's bearer token UNAUTHENTICATED (auth.py's message).
  bool RefuseUnauthorized(Call* c);

  // Blocks (GIL released) until requests are queued, `timeout_s` passes, or the front end stops
  // (None). Each item: (call, slot, rows, buffer, offsets, arrival, deadline, priority, id).
  py::object Take(size_t max_items, double timeout_s);

  // Answers fast calls: items of (call, outputs dict or None, grpc code, message).
  void Complete(const py::list& items);

  // Hands fast calls back to the relay: Python's servicer answers them.
  void Forward(const std::vector<uint64_t>& ids);

  // ModelInfer calls accepted and not yet answered: queued or held natively, being admitted
  // (`entering_`), handed back, or relayed to the Python servicer. Graceful shutdown waits for 0.
  int64_t Inflight();
  void Answered() { inflight_--; }  // a call held by a RowQueue was answered
  std::string NewRequestId() { return id_prefix_ + "-" + std::to_string(request_ids_++); }
  py::dict Stats() const;

  // -- used by calls (no GIL) --

  // The published model (name, version: "" the default), or null.
  std::shared_ptr<const Model> Lookup(std::string_view name, std::string_view version);
  // The entry a request goes to: its version's, or the one a split picks (null: relay).
  std::shared_ptr<const Model> Route(Call* c, const Request& r);
  void SetSplit(Model* m, const std::string& name, const py::tuple& split);  // GIL held
  py::dict RoutedCounts();  // (model, version) -> requests a split sent there
  const std::string& token() const { return token_; }
  int64_t max_rows() const { return max_rows_; }
  int64_t max_tensor_bytes() const { return max_tensor_bytes_; }

  // Offers a fresh call object for the next RPC, until the completion queues close.
  void Spawn(grpc::ServerCompletionQueue* cq);
  // A call started: offers the next call object at once while fewer than max_unread_ ModelInfer
  // calls wait for their message, else owes the offer until one is read (FirstRead).
  void Accepted(Call* c);
  void FirstRead(Call* c);  // its first message was read (or failed): pays one owed offer

  // Parses and validates a ModelInfer; true when it was queued (for Python's feeder or in the
  // model's RowQueue) or refused at the door (call->mu held).
  bool TryFast(Call* c);

  grpc::GenericStub* stub() { return stub_.get(); }
  std::atomic<int64_t> relayed_{0}, live_calls_{0};
  std::atomic<int64_t> unread_{0};  // accepted calls whose first message is not yet read
  int64_t max_unread_ = 1024;  // SetAcceptBacklog
  std::mutex owed_mu_;
  std::vector<grpc::ServerCompletionQueue*> owed_;  // offers owed (Accepted), one per entry
  // First messages being decided (TryFast, then queue/refuse/relay), and relayed ModelInfers.
  std::atomic<int64_t> entering_{0}, relaying_{0}, held_refusals_{0};  // held: Refuse
  std::atomic<int64_t> refused_{0};  // ModelInfer refused (UNAVAILABLE) because shutting down
  std::atomic<int64_t> denied_{0};  // ModelInfer refused (UNAUTHENTICATED): not the bearer token

  // Answers a call held outside the completion queue (call->mu not held).
  void Finish(Call* call, grpc::ByteBuffer* bb, const grpc::Status& st);

 private:
  Call* Claim(uint64_t id);
  void EndBusy(size_t n);
  std::string Encode(Call* c, const py::dict& outputs, grpc::ByteBuffer* bb);
  void Poll(grpc::ServerCompletionQueue* cq);  // a worker thread (cq_poll.cc)

  std::string backend_;
  int64_t max_message_bytes_, max_rows_, max_tensor_bytes_;
  std::string token_, id_prefix_;
  std::string tls_cert_, tls_key_, tls_client_ca_;
  int tls_reload_s_ = 60;
  int threads_;
  std::shared_ptr<grpc::Channel> channel_;
  std::unique_ptr<grpc::GenericStub> stub_;
  grpc::AsyncGenericService service_;
  std::unique_ptr<grpc::Server> server_;
  std::vector<std::unique_ptr<grpc::ServerCompletionQueue>> cqs_;
  std::vector<std::thread> workers_;
  std::mutex table_mu_;
  // Split counters by "model\0version", never freed while the front end lives (table_mu_).
  std::unordered_map<std::string, std::unique_ptr<std::atomic<int64_t>>> routed_;
  std::shared_ptr<Table> table_;
  std::atomic<bool> accepting_{true}, tracing_{false};
  const std::string trace_secret_ = RandomHex(32);
  double trace_rate_ = 0;
  std::mutex qmu_;
  std::condition_variable qcv_, busy_cv_;
  int64_t busy_ = 0;
  std::deque<Fast> queue_;
  std::unordered_map<uint64_t, Call*> owned_;
  bool stopped_ = false;
  bool cq_closed_ = false;  // set just before the completion queues shut down (Spawn stops)
  uint64_t next_id_ = 1;
  std::atomic<int64_t> inflight_{0}, fast_{0}, forwarded_{0}, shed_{0};
  // The read-coalescing pause (CoalesceNs of the table) and how many were taken (cq_poll.cc).
  std::atomic<int64_t> coalesce_ns_{0}, coalesce_pauses_{0};
  std::atomic<bool> coalesce_on_{false};  // SetReadCoalesce
  // Queues a validated request in its model's RowQueue, or refuses it there (call->mu held);
  // false: the queue is stopping and Python decides (a hot reload's new version).
  bool QueueNative(Call* c, const Model& m, const Fast& f);
  std::atomic<uint64_t> request_ids_{1};
  std::unique_ptr<HttpServer> http_;
  std::shared_ptr<Tenants> tenants_;
};

}  // namespace xlaserve::native

#endif  // XLASERVE_SERVING_FRONTEND_NATIVE_FRONTEND_H_
