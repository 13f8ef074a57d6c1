// A lean C++ HTTP/1.1 load generator for KServe v2 inference with Triton's binary tensor
// extension: one thread, one epoll set, keep-alive connections (requests pipelined on them and
// answered in order, as HTTP/1.1 allows), no library beyond libc.
//
// It POSTs one pre-built body (benchmarks/native_http_loadgen.py writes it: the JSON header, then
// the tensors' bytes) to --path, with `Inference-Header-Content-Length: --header-length`, over
// `--connections` connections (default: one per request in flight in a closed loop, else 256,
// opening more up to `--max-connections`, default 768, while none is idle: the server reads a
// connection's next request once it answered the last, so a pipelined one waits out of its
// sight, where it can neither be batched nor shed):
//   closed loop: `--concurrency` requests always in flight, spread evenly over the connections;
//   open loop:   `--rate` requests/s on a fixed schedule (a timerfd) whatever the answers, each
//                on an idle connection (else the next in turn), latency measured from the
//                *scheduled* send time (coordinated omission shows);
//   SUT mode:    `--sut 1`: MLPerf LoadGen's system under test (benchmarks/slo_sut.py), the
//                protocol of native_loadgen.cc: query ids (native uint64) in on stdin, one
//                request each at once, a record (uint64 id, int64 status code, int64 microseconds)
//                out on stdout per answer, until stdin closes and nothing is in flight.
// A request in flight longer than `--timeout` closes its connection: it and those queued behind
// it are recorded as DEADLINE_EXCEEDED, and the connection reopens. Statuses are reported as the
// gRPC codes Triton maps them from (200 with a body: OK; 400 INVALID_ARGUMENT; 429
// RESOURCE_EXHAUSTED; 503 UNAVAILABLE; ...), so the output is native_loadgen.cc's: "window_s",
// "sent", "status NAME COUNT" lines, and with --latencies FILE one "CODE MICROS" line per
// recorded request (only requests issued in [warmup, warmup + duration) are recorded).
//
//   g++ -O2 -std=c++17 native_http_loadgen.cc -o native_http_loadgen

#include <arpa/inet.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <strings.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <sys/timerfd.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <fstream>
#include <sstream>
#include <string>
#include <vector>

#include "native_http_answer.h"
#include "native_loadgen_common.h"

namespace {

using loadgen::Clock;
using loadgen::Die;
using loadgen::Sample;
using loadgen::Seconds;
using Record = loadgen::SutRecord;
using loadgen::kCancelled;
using loadgen::kDeadline;
using loadgen::kUnavailable;

struct Options : loadgen::LoadFlags {
  std::string host = "127.0.0.1", path, body_path;
  std::vector<std::string> headers;  // --header "Name: value", repeated
  int port = 0, header_length = -1, connections = 0, max_connections = 0;
};

Options Parse(int argc, char** argv) {
  Options o;
  o.Parse(argc, argv, [&o](const std::string& k, const std::string& v) {
    if (k == "--address") {
      size_t colon = v.rfind(':');
      if (colon == std::string::npos) Die("--address is HOST:PORT");
      o.host = v.substr(0, colon);
      o.port = std::stoi(v.substr(colon + 1));
    } else if (k == "--path") o.path = v;
    else if (k == "--body") o.body_path = v;
    else if (k == "--header-length") o.header_length = std::stoi(v);
    else if (k == "--header") o.headers.push_back(v);
    else if (k == "--connections") o.connections = std::stoi(v);
    else if (k == "--max-connections") o.max_connections = std::stoi(v);
    else return false;
    return true;
  });
  if (o.port <= 0 || o.path.empty() || o.body_path.empty() || o.header_length < 0)
    Die("--address, --path, --body and --header-length are required");
  if (o.concurrency < 1 || o.duration <= 0) Die("bad concurrency/duration");
  if (o.connections <= 0) o.connections = o.sut || o.rate > 0 ? 256 : o.concurrency;
  if (o.max_connections <= 0) o.max_connections = o.sut || o.rate > 0 ? 768 : o.connections;
  o.max_connections = std::max(o.max_connections, o.connections);
  return o;
}

int64_t Micros(Clock::duration d) {
  return std::chrono::duration_cast<std::chrono::microseconds>(d).count();
}

struct Pending {
  Clock::time_point t0;  // scheduled (open loop) or actual send time
  uint64_t id;           // SUT mode: LoadGen's query id
  bool recorded;
};

struct Conn {
  int fd = -1;
  std::string out;  // bytes not yet written
  size_t out_at = 0;
  std::string in;   // bytes read, not yet parsed past `in_at`
  size_t in_at = 0;
  std::deque<Pending> q;  // requests sent or queued on it, answered in order
  bool want_out = false;
};

class LoadGen {
 public:
  explicit LoadGen(const Options& o) : o_(o) {
    std::string body = loadgen::ReadFile(o.body_path);
    request_ = "POST " + o.path + " HTTP/1.1\r\nHost: " + o.host + ":" + std::to_string(o.port) +
               "\r\nContent-Type: application/octet-stream\r\nInference-Header-Content-Length: " +
               std::to_string(o.header_length) + "\r\nContent-Length: " +
               std::to_string(body.size()) + "\r\n";
    for (const std::string& h : o.headers) request_ += h + "\r\n";
    request_ += "\r\n" + body;
    ep_ = epoll_create1(0);
    conns_.resize(static_cast<size_t>(o.connections));
    for (size_t i = 0; i < conns_.size(); ++i) Connect(i);
    for (size_t i = conns_.size(); i-- > 0;) idle_.push_back(i);
  }

  void Run() {
    start_ = Clock::now();
    window_begin_ = start_ + Seconds(o_.warmup);
    window_end_ = window_begin_ + Seconds(o_.duration);
    if (o_.sut) {
      Watch(0, EPOLLIN, kStdin);
    } else if (o_.rate > 0) {
      timer_ = timerfd_create(CLOCK_MONOTONIC, TFD_NONBLOCK);
      Watch(timer_, EPOLLIN, kTimer);
      next_send_ = start_;
      Arm();
    } else {
      for (int i = 0; i < o_.concurrency; ++i) Issue(static_cast<size_t>(i) % conns_.size(), start_);
    }
    Loop();
  }

  void Report() const { loadgen::Report(o_.duration, samples_, o_.latencies_path); }

 private:
  static constexpr uint64_t kStdin = ~0ull, kTimer = ~0ull - 1;

  void Watch(int fd, uint32_t events, uint64_t key, int op = EPOLL_CTL_ADD) {
    epoll_event ev{};
    ev.events = events;
    ev.data.u64 = key;
    if (epoll_ctl(ep_, op, fd, &ev) != 0) Die(std::string("epoll_ctl: ") + std::strerror(errno));
  }

  void Connect(size_t i) {
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    sockaddr_in addr{};
    addr.sin_family = AF_INET;
    addr.sin_port = htons(static_cast<uint16_t>(o_.port));
    if (inet_pton(AF_INET, o_.host.c_str(), &addr.sin_addr) != 1) Die("bad host " + o_.host);
    if (connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) != 0)
      Die("cannot connect to " + o_.host + ":" + std::to_string(o_.port) + ": " +
          std::strerror(errno));
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
    fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK);
    Conn& c = conns_[i];
    c.fd = fd;
    c.want_out = false;
    Watch(fd, EPOLLIN, i);
  }

  // Sends one request on connection i (pipelined behind what it has in flight).
  void Issue(size_t i, Clock::time_point t0, uint64_t id = 0) {
    Conn& c = conns_[i];
    c.q.push_back({t0, id, o_.sut || (t0 >= window_begin_ && t0 < window_end_)});
    ++in_flight_;
    if (c.out_at < c.out.size()) {  // still writing: append behind it
      c.out += request_;
      return;
    }
    ssize_t n = send(c.fd, request_.data(), request_.size(), MSG_NOSIGNAL);
    if (n == static_cast<ssize_t>(request_.size())) return;
    if (n < 0 && errno != EAGAIN) return Fail(i, kUnavailable);
    c.out.assign(request_, static_cast<size_t>(n < 0 ? 0 : n), std::string::npos);
    c.out_at = 0;
    SetWantOut(i, true);
  }

  void SetWantOut(size_t i, bool on) {
    Conn& c = conns_[i];
    if (c.want_out == on) return;
    c.want_out = on;
    Watch(c.fd, EPOLLIN | (on ? static_cast<uint32_t>(EPOLLOUT) : 0u), i, EPOLL_CTL_MOD);
  }

  void Flush(size_t i) {
    Conn& c = conns_[i];
    while (c.out_at < c.out.size()) {
      ssize_t n = send(c.fd, c.out.data() + c.out_at, c.out.size() - c.out_at, MSG_NOSIGNAL);
      if (n < 0 && errno == EAGAIN) return;
      if (n <= 0) return Fail(i, kUnavailable);
      c.out_at += static_cast<size_t>(n);
    }
    c.out.clear();
    c.out_at = 0;
    SetWantOut(i, false);
  }

  // Records the answer to connection i's oldest request.
  void Answer(size_t i, int code, Clock::time_point now) {
    Pending p = conns_[i].q.front();
    conns_[i].q.pop_front();
    if (conns_[i].q.empty()) idle_.push_back(i);
    Done(i, p, code, now);
  }

  // Records a request's answer; in a closed loop, sends the next one on its connection.
  void Done(size_t i, const Pending& p, int code, Clock::time_point now) {
    --in_flight_;
    if (o_.sut) {
      records_.push_back({p.id, code, Micros(now - p.t0)});
    } else if (p.recorded) {
      samples_.push_back({code, Micros(now - p.t0)});
    }
    if (!o_.sut && o_.rate <= 0 && now < window_end_) Issue(i, now);  // closed loop: next one
  }

  // The connection failed or timed out: what it had in flight is answered `code`; it reopens.
  void Fail(size_t i, int code) {
    Conn& c = conns_[i];
    epoll_ctl(ep_, EPOLL_CTL_DEL, c.fd, nullptr);
    close(c.fd);
    std::deque<Pending> lost;
    lost.swap(c.q);
    c = Conn();
    Connect(i);
    Clock::time_point now = Clock::now();
    idle_.push_back(i);
    for (const Pending& p : lost) Done(i, p, code, now);
  }

  void Read(size_t i, Clock::time_point now) {
    Conn& c = conns_[i];
    char buf[65536];
    ssize_t n = recv(c.fd, buf, sizeof(buf), 0);
    if (n < 0 && errno == EAGAIN) return;
    if (n <= 0) return Fail(i, kUnavailable);
    c.in.append(buf, static_cast<size_t>(n));
    int status;
    size_t body, head;
    while (!c.q.empty() &&
           loadgen::ParseHead(c.in.data() + c.in_at, c.in.size() - c.in_at, &status, &body, &head) &&
           c.in.size() - c.in_at >= head + body) {
      c.in_at += head + body;
      Answer(i, loadgen::CodeOf(status, body), now);
    }
    if (c.in_at == c.in.size()) {
      c.in.clear();
      c.in_at = 0;
    } else if (c.in_at > (1u << 16)) {
      c.in.erase(0, c.in_at);
      c.in_at = 0;
    }
  }

  // An idle connection when there is one (the server reads a connection's next request only
  // once it answered the last), else a new one up to --max-connections, else the next in turn.
  size_t Pick() {
    while (!idle_.empty()) {
      size_t i = idle_.back();
      idle_.pop_back();
      if (conns_[i].q.empty()) return i;
    }
    if (conns_.size() < static_cast<size_t>(o_.max_connections)) {
      conns_.emplace_back();  // a deque: the other connections stay where they are
      Connect(conns_.size() - 1);
      return conns_.size() - 1;
    }
    return next_conn_++ % conns_.size();
  }

  void Arm() {
    itimerspec t{};
    auto ns = std::chrono::duration_cast<std::chrono::nanoseconds>(next_send_.time_since_epoch());
    t.it_value.tv_sec = static_cast<time_t>(ns.count() / 1000000000);
    t.it_value.tv_nsec = static_cast<long>(ns.count() % 1000000000);
    if (t.it_value.tv_sec == 0 && t.it_value.tv_nsec == 0) t.it_value.tv_nsec = 1;
    timerfd_settime(timer_, TFD_TIMER_ABSTIME, &t, nullptr);
  }

  // Open loop: every send due by now (catching up when behind), then the timer for the next.
  void SendDue(Clock::time_point now) {
    uint64_t expirations;
    while (read(timer_, &expirations, sizeof(expirations)) > 0) {
    }
    const Clock::duration interval = Seconds(1.0 / o_.rate);
    for (; next_send_ <= now && next_send_ < window_end_; next_send_ += interval)
      Issue(Pick(), next_send_);
    if (next_send_ < window_end_) Arm();
  }

  bool ReadIds(Clock::time_point now) {
    char* buf = ids_buf_;
    ssize_t n = read(0, buf + ids_have_, sizeof(ids_buf_) - ids_have_);
    if (n <= 0) return false;
    ids_have_ += static_cast<size_t>(n);
    size_t whole = ids_have_ / 8 * 8;
    for (size_t i = 0; i < whole; i += 8) {
      uint64_t id;
      std::memcpy(&id, buf + i, 8);
      Issue(Pick(), now, id);
    }
    std::memmove(buf, buf + whole, ids_have_ - whole);  // a partial id waits for its rest
    ids_have_ -= whole;
    return true;
  }

  // Connections whose oldest request has waited past --timeout fail (checked every 100 ms).
  void SweepLate(Clock::time_point now) {
    if (o_.timeout <= 0 || now < next_sweep_) return;
    next_sweep_ = now + std::chrono::milliseconds(100);
    for (size_t i = 0; i < conns_.size(); ++i)
      if (!conns_[i].q.empty() && now - conns_[i].q.front().t0 > Seconds(o_.timeout))
        Fail(i, o_.sut ? kCancelled : kDeadline);
  }

  bool Finished(Clock::time_point now) const {
    if (in_flight_ > 0) return false;
    if (o_.sut) return !reading_ids_;
    return now >= window_end_ && (o_.rate <= 0 || next_send_ >= window_end_);
  }

  void Loop() {
    epoll_event events[256];
    for (;;) {
      int n = epoll_wait(ep_, events, 256, 100);
      if (n < 0 && errno != EINTR) Die(std::string("epoll_wait: ") + std::strerror(errno));
      Clock::time_point now = Clock::now();
      for (int e = 0; e < n; ++e) {
        uint64_t key = events[e].data.u64;
        if (key == kStdin) {
          if (!ReadIds(now)) {
            reading_ids_ = false;
            epoll_ctl(ep_, EPOLL_CTL_DEL, 0, nullptr);
          }
        } else if (key == kTimer) {
          SendDue(now);
        } else {
          size_t i = static_cast<size_t>(key);
          if (events[e].events & EPOLLOUT) Flush(i);
          if (events[e].events & (EPOLLIN | EPOLLERR | EPOLLHUP)) Read(i, now);
        }
      }
      if (o_.sut && !records_.empty()) {
        loadgen::WriteRecords(records_);
        records_.clear();
      }
      SweepLate(now);
      if (Finished(now)) return;
    }
  }

  Options o_;
  std::string request_;
  std::deque<Conn> conns_;
  std::vector<size_t> idle_;  // connections with nothing in flight (maybe stale: Pick checks)
  size_t next_conn_ = 0;
  std::vector<Record> records_;
  std::vector<Sample> samples_;
  int ep_ = -1, timer_ = -1;
  int64_t in_flight_ = 0;
  bool reading_ids_ = true;
  char ids_buf_[8 * 4096];
  size_t ids_have_ = 0;
  Clock::time_point start_, window_begin_, window_end_, next_send_, next_sweep_;
};

}  // namespace

int main(int argc, char** argv) {
  Options o = Parse(argc, argv);
  LoadGen gen(o);
  gen.Run();
  if (!o.sut) gen.Report();
  return 0;
}
