// Native HTTP/1.1 front end: owns the public HTTP port and answers the KServe v2 binary-tensor
// inference call (POST /v2/models/{m}[/versions/{v}]/infer with Triton's binary data
// extension) of a model with a native batch queue in C++, as the gRPC front end does for
// ModelInfer. Everything else (health, metadata, JSON tensors, generate, repository calls, and
// any request the fast path does not fully understand) is relayed to the Python HTTP server
// (uvicorn, serving/frontend/http/) on an internal unix socket, one connection per relayed
// request, so its statuses and messages stay the single source of truth. A connection whose
// framing the relay does not follow request by request (a chunked or oversized body, a
// malformed head, HTTP/1.0, an upgrade) becomes a byte tunnel to the Python server.
//
//   http_conn.cc    one client connection: framing, keep-alive, answers, read timeout;
//   http_relay.cc   the relay of a request, and the tunnel, to the Python server;
//   http_server.cc  the listener, the epoll loops, stop;
//   http_infer.cc   the fast path: the JSON header (RapidJSON), validation, the response;
//   http_tls.cc     HTTPS (OpenSSL) with the gRPC port's certificate files, re-read as they change.

#ifndef XLASERVE_SERVING_FRONTEND_NATIVE_HTTP_H_
#define XLASERVE_SERVING_FRONTEND_NATIVE_HTTP_H_

#include <openssl/ssl.h>

#include <cctype>
#include <map>

#include "frontend.h"

namespace xlaserve::native {

struct HttpOptions {
  std::string backend;           // the Python HTTP server's unix socket
  double read_timeout_s = 30.0;  // a request must arrive whole this long after its first byte
  double idle_timeout_s = 60.0;  // a keep-alive connection idle this long is closed (0: never)
  int64_t max_body_bytes = 64 << 20;
  int threads = 1;               // epoll loops
  // HTTPS (http_tls.cc): the certificate chain and key (empty: plain HTTP), the client CA bundle
  // (set: client certificates required), and how often to check the files for a renewal.
  std::string tls_cert, tls_key, tls_client_ca;
  int tls_reload_s = 60;
};

// The TLS context new connections get; swapped whole when the files change (live connections
// keep the one they began with: OpenSSL counts its references).
class HttpTls {
 public:
  HttpTls(const HttpOptions& opts, SSL_CTX* ctx);
  ~HttpTls();
  static std::unique_ptr<HttpTls> Create(const HttpOptions& opts, std::string* error);
  SSL* NewSsl(int fd);          // a server-side session over the connected socket `fd`
  void MaybeReload(double now);  // loop 0's timer: re-reads the files once they changed

 private:
  std::string Stamp() const;
  HttpOptions opts_;
  std::mutex mu_;
  SSL_CTX* ctx_;
  std::string stamp_;
  double next_check_ = 0;
};

// A request head parsed in place: views into the bytes it was parsed from.
struct HttpHead {
  std::string_view method, target;
  int minor = 1;  // HTTP/1.minor
  std::vector<std::pair<std::string_view, std::string_view>> headers;  // names as sent
  size_t head_len = 0;  // up to and including the blank line
  int64_t content_length = 0;
  bool tunnel = false;  // framing the relay does not follow request by request
  bool expect_continue = false, close = false;
  // The value of header `name` (lower-case), "" when absent; `count` gets its occurrences.
  std::string_view Get(std::string_view name, int* count = nullptr) const;
  // Points the views at the same bytes copied from `from` to `to` (no second parse).
  void Rebase(const char* from, const char* to);
};

// Parses the head at the start of `buf`: 1 complete, 0 incomplete, -1 malformed.
int ParseHead(std::string_view buf, HttpHead* h);

class HttpServer;
class Conn;

inline constexpr size_t kHighWater = 4 << 20;  // unsent bytes on one side before reads pause
inline constexpr size_t kReadChunk = 256 << 10;  // most read per event from one socket

// `v` without leading and trailing spaces and tabs (header values, list items).
inline std::string_view TrimBlanks(std::string_view v) {
  while (!v.empty() && (v.front() == ' ' || v.front() == '\t')) v.remove_prefix(1);
  while (!v.empty() && (v.back() == ' ' || v.back() == '\t')) v.remove_suffix(1);
  return v;
}

// Case-insensitive ASCII equality (header names and tokens).
inline bool IEquals(std::string_view a, std::string_view b) {
  if (a.size() != b.size()) return false;
  for (size_t i = 0; i < a.size(); ++i) {
    if (std::tolower(uint8_t(a[i])) != std::tolower(uint8_t(b[i]))) return false;
  }
  return true;
}

// kHeld: refused at the door, answered `HttpCall::hold_s` later (HttpServer::Later).
enum class FastResult { kQueued, kAnswered, kHeld, kRelay };

// What an epoll event points at: a connection's client side or its backend (relay) side.
struct HttpWatch {
  Conn* conn;
  bool backend;
};

// An inference request the fast path queued: it owns the request's bytes until answered.
struct HttpCall final : Responder {
  std::shared_ptr<Conn> conn;
  HttpServer* server = nullptr;
  std::string bytes;  // the whole request; the body starts at body_at
  size_t body_at = 0;
  std::shared_ptr<const Model> model;
  std::vector<int> out_index;
  std::string model_name, id;
  int64_t rows = 0;
  bool close = false;
  int trace = -1;  // tracing: the head decision the relay passes on (Call::trace)
  double hold_s = 0;  // FastResult::kHeld: how long the refusal waits (Frontend::Refuse's rule)

  void Reply(const std::vector<const uint8_t*>& rows0, const grpc::Status& st,
             const Generations& gen) override;
  std::string LogId() override;
};

// A sampled HTTP request's trace record (trace.cc).
std::unique_ptr<TraceInfo> HttpTrace(const HttpHead& h, std::string id, double t_start);

// A response with a JSON body: Triton's {"error": message} with the status its code maps to.
// `status` > 0 overrides the mapping (429: a tenant over its quota).
std::string HttpErrorResponse(int grpc_code, const std::string& message, bool close,
                              int status = 0);

// One client connection, served by one epoll loop; answers may come from any thread.
class Conn : public std::enable_shared_from_this<Conn> {
 public:
  Conn(HttpServer* s, int epfd, int fd);
  ~Conn();
  void Register();  // starts watching the client's socket
  void SetSsl(SSL* ssl) { ssl_ = ssl; }  // HTTPS: its TLS session (owned), before Register
  void OnEvent(bool backend, uint32_t events);  // its loop's thread
  void Finish(const std::string& response, bool close);  // the request in progress is answered
  void Tick(double now);  // the loop's timer: the read and idle timeouts
  void CloseIfIdle();     // stop: closes a connection with nothing in progress
  void Abort();           // stop: closes it now
  bool dead() const { return dead_; }

 private:
  enum State { kIdle, kFast, kRelay, kTunnel };
  void Process();
  bool Send(std::string_view data);
  void Flush();
  void Relay(const std::string& request, const HttpHead& h, int trace = -1);
  void Tunnel();
  bool OpenBackend();
  void OnBackend(uint32_t events);
  void EndRelay(bool eof);
  void ForwardResponse(std::string_view data);
  void Interest();
  void Close();
  // The client's bytes, through TLS when the server serves HTTPS (http_tls.cc): as recv/send,
  // -1 with errno EAGAIN when TLS must wait for the socket.
  ssize_t ClientRecv(char* buf, size_t n);
  ssize_t ClientSend(const char* data, size_t n);
  bool TlsPending() const { return ssl_ != nullptr && SSL_pending(ssl_) > 0; }
  // HTTPS: the verified client certificate's CN, then its SANs, as gRPC reports them (read once
  // per connection; empty without one).
  const std::vector<std::string>& PeerNames();
  bool Flushed() const { return out_off_ >= out_.size(); }  // nothing left to write
  // Between requests: nothing received, nothing in progress, nothing to write.
  bool Quiet() const { return state_ == kIdle && in_.empty() && Flushed(); }

  HttpServer* server_;
  int epfd_, fd_, bfd_ = -1;
  HttpWatch cw_{this, false}, bw_{this, true};
  std::mutex mu_;
  State state_ = kIdle;
  std::string in_, out_, bout_, resp_head_;
  size_t out_off_ = 0, bout_off_ = 0;
  uint32_t cmask_ = 0, bmask_ = 0;
  double first_byte_ = 0;  // when the request being received began (0: none)
  double last_active_ = 0;  // the last byte read or answer sent
  bool continued_ = false, close_ = false, close_after_ = false, resp_started_ = false;
  bool connecting_ = false, backend_write_done_ = false;
  std::atomic<bool> dead_{false};
  SSL* ssl_ = nullptr;           // HTTPS: the connection's TLS session (null: plain HTTP)
  bool tls_want_write_ = false;  // a TLS read waits for the socket to take the handshake's bytes
  bool peer_read_ = false;
  std::vector<std::string> peer_names_;
};

class HttpServer {
 public:
  HttpServer(Frontend* fe, HttpOptions opts);
  ~HttpServer();
  // Listens on host:port (0: any free port); returns the port, or 0 with `error` set.
  int Start(const std::string& host, int port, std::string* error);
  // Closes the listener and idle connections, lets requests in progress finish for `grace_s`,
  // then closes everything.
  void Stop(double grace_s);
  int64_t Inflight() const { return inflight_; }
  void Stats(py::dict* d) const;

  // -- used by connections --
  // A complete request (call->bytes; the connection's lock held): queued (the call is taken),
  // answered at the door (`answer`: the response), or to relay (call->bytes untouched). `peer`:
  // the client certificate's names (Conn::PeerNames).
  FastResult TryFast(std::unique_ptr<HttpCall>* call, const HttpHead& h,
                     const std::vector<std::string>& peer, std::string* answer);
  // With tenants, a request's tenant: its one Authorization header's token, else the first of
  // the certificate's names that is a tenant's (the gRPC port's rule, Tenants::Identify); -1:
  // none, or several Authorization headers (Python decides those).
  int TenantOf(const HttpHead& h, const std::vector<std::string>& peer) const;
  const HttpOptions& options() const { return opts_; }
  Frontend* fe() const { return fe_; }
  bool stopping() const { return stopping_; }
  void Answered() { inflight_--; }
  // Sends `answer` on `c` at `due` (MonoNow clock; Conn::Finish) from the hold thread: a refusal
  // held as the gRPC port holds its own (Frontend::Refuse). At Stop, the rest go at once.
  void Later(std::shared_ptr<Conn> c, std::string answer, bool close, double due);
  std::atomic<int64_t> relayed_{0}, tunnels_{0}, timeouts_{0}, connections_{0}, idle_closed_{0};

 private:
  struct Loop {
    int epfd = -1, wakefd = -1;
    std::thread thread;
    std::mutex mu;
    std::unordered_map<Conn*, std::shared_ptr<Conn>> conns;
  };
  void Run(Loop* loop);
  void Accept();
  int64_t Open();                  // connections not yet closed
  void ForEach(void (Conn::*fn)());
  void RunLater();  // the hold thread
  struct Held {
    std::shared_ptr<Conn> conn;
    std::string answer;
    bool close;
  };
  std::mutex later_mu_;
  std::condition_variable later_cv_;
  std::multimap<double, Held> later_;  // by due time
  bool later_stop_ = false;
  std::thread later_thread_;

  Frontend* fe_;
  HttpOptions opts_;
  int listen_fd_ = -1;
  std::vector<std::unique_ptr<Loop>> loops_;
  size_t next_loop_ = 0;
  double accept_paused_until_ = 0;  // out of descriptors: accepting resumes then (loop 0)
  std::atomic<bool> stopping_{false}, stop_loops_{false};
  std::atomic<int64_t> inflight_{0}, fast_{0}, shed_{0}, denied_{0};
  std::unique_ptr<HttpTls> tls_;  // HTTPS; null: plain HTTP
};

}  // namespace xlaserve::native

#endif  // XLASERVE_SERVING_FRONTEND_NATIVE_HTTP_H_
