// The native HTTP front end's listener and epoll loops (http.h): loop 0 accepts and hands each
// connection to a loop in turn; every loop serves its connections' events and, ten times a
// second, their read timeouts, dropping connections that closed. Stopping closes the listener
// and idle connections, lets requests in progress finish within the grace, then closes the rest.

#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cerrno>
#include <chrono>
#include <cstring>

#include "http.h"

namespace xlaserve::native {
namespace {

char kListenTag, kWakeTag;  // epoll data for the listener and a loop's wake-up descriptor
constexpr double kTick = 0.1;

int Listen(const std::string& host, int port, std::string* error) {
  addrinfo hints{};
  hints.ai_family = AF_UNSPEC;
  hints.ai_socktype = SOCK_STREAM;
  hints.ai_flags = AI_PASSIVE;
  addrinfo* res = nullptr;
  int rc = ::getaddrinfo(host.empty() ? nullptr : host.c_str(), std::to_string(port).c_str(),
                         &hints, &res);
  if (rc != 0) {
    *error = gai_strerror(rc);
    return -1;
  }
  int fd = ::socket(res->ai_family, res->ai_socktype | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
  int one = 1;
  if (fd >= 0) ::setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
  if (fd < 0 || ::bind(fd, res->ai_addr, res->ai_addrlen) < 0 || ::listen(fd, 2048) < 0) {
    *error = std::strerror(errno);
    if (fd >= 0) ::close(fd);
    fd = -1;
  }
  ::freeaddrinfo(res);
  return fd;
}

}  // namespace

int Frontend::StartHttp(const std::string& host, int port, const std::string& backend,
                        double read_timeout_s, double idle_timeout_s, int64_t max_body_bytes,
                        int threads) {
  if (http_) throw std::runtime_error("the native HTTP front end is already started");
  auto server = std::make_unique<HttpServer>(
      this, HttpOptions{backend, read_timeout_s, idle_timeout_s, max_body_bytes, threads,
                        tls_cert_, tls_key_, tls_client_ca_, tls_reload_s_});
  std::string error;
  int bound = server->Start(host, port, &error);
  if (bound == 0) {
    throw std::runtime_error("cannot listen for HTTP on " + host + ":" + std::to_string(port) +
                             " (" + error + "); pick another --http-port (-1 disables HTTP)");
  }
  http_ = std::move(server);
  return bound;
}

HttpServer::HttpServer(Frontend* fe, HttpOptions opts) : fe_(fe), opts_(std::move(opts)) {}

HttpServer::~HttpServer() { Stop(0.0); }

int HttpServer::Start(const std::string& host, int port, std::string* error) {
  if (!opts_.tls_cert.empty() && !(tls_ = HttpTls::Create(opts_, error))) return 0;
  listen_fd_ = Listen(host, port, error);
  if (listen_fd_ < 0) return 0;
  sockaddr_storage addr{};
  socklen_t len = sizeof(addr);
  ::getsockname(listen_fd_, reinterpret_cast<sockaddr*>(&addr), &len);
  int bound = ntohs(addr.ss_family == AF_INET6 ? reinterpret_cast<sockaddr_in6*>(&addr)->sin6_port
                                               : reinterpret_cast<sockaddr_in*>(&addr)->sin_port);
  for (int i = 0; i < std::max(1, opts_.threads); ++i) {
    auto loop = std::make_unique<Loop>();
    loop->epfd = ::epoll_create1(EPOLL_CLOEXEC);
    loop->wakefd = ::eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    epoll_event ev{};
    ev.events = EPOLLIN;
    ev.data.ptr = &kWakeTag;
    ::epoll_ctl(loop->epfd, EPOLL_CTL_ADD, loop->wakefd, &ev);
    loops_.push_back(std::move(loop));
  }
  epoll_event ev{};
  ev.events = EPOLLIN;
  ev.data.ptr = &kListenTag;
  ::epoll_ctl(loops_[0]->epfd, EPOLL_CTL_ADD, listen_fd_, &ev);
  for (auto& loop : loops_) {
    Loop* l = loop.get();
    l->thread = std::thread([this, l] { Run(l); });
  }
  later_thread_ = std::thread([this] { RunLater(); });
  return bound;
}

void HttpServer::Later(std::shared_ptr<Conn> c, std::string answer, bool close, double due) {
  {
    std::lock_guard<std::mutex> l(later_mu_);
    later_.emplace(due, Held{std::move(c), std::move(answer), close});
  }
  later_cv_.notify_one();
}

void HttpServer::RunLater() {
  std::unique_lock<std::mutex> l(later_mu_);
  while (true) {
    double now = MonoNow();
    while (!later_.empty() && (later_stop_ || later_.begin()->first <= now)) {
      Held held = std::move(later_.begin()->second);
      later_.erase(later_.begin());
      l.unlock();
      held.conn->Finish(held.answer, held.close);  // a closed connection drops it
      l.lock();
    }
    if (later_stop_) return;
    if (later_.empty()) {
      later_cv_.wait(l);
    } else {
      later_cv_.wait_for(l, std::chrono::microseconds(int64_t((later_.begin()->first - now) * 1e6)));
    }
  }
}

void HttpServer::Accept() {
  while (true) {
    int fd = ::accept4(listen_fd_, nullptr, nullptr, SOCK_NONBLOCK | SOCK_CLOEXEC);
    if (fd < 0) {
      if (errno == EINTR || errno == ECONNABORTED) continue;
      if (errno == EMFILE || errno == ENFILE || errno == ENOBUFS || errno == ENOMEM) {
        // Out of descriptors: stop listening for a tick rather than spin on the listener.
        ::epoll_ctl(loops_[0]->epfd, EPOLL_CTL_DEL, listen_fd_, nullptr);
        accept_paused_until_ = MonoNow() + kTick;
      }
      return;
    }
    if (stopping_) {
      ::close(fd);
      continue;
    }
    int one = 1;
    ::setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
    Loop* l = loops_[next_loop_++ % loops_.size()].get();
    SSL* ssl = tls_ ? tls_->NewSsl(fd) : nullptr;
    if (tls_ && ssl == nullptr) {  // never plaintext on an HTTPS port
      ::close(fd);
      continue;
    }
    auto c = std::make_shared<Conn>(this, l->epfd, fd);
    c->SetSsl(ssl);
    {
      std::lock_guard<std::mutex> g(l->mu);
      l->conns[c.get()] = c;
    }
    c->Register();
  }
}

void HttpServer::Run(Loop* loop) {
  epoll_event evs[128];
  double last_tick = MonoNow();
  while (!stop_loops_) {
    int n = ::epoll_wait(loop->epfd, evs, 128, int(kTick * 1000));
    for (int i = 0; i < n; ++i) {
      void* p = evs[i].data.ptr;
      if (p == &kListenTag) {
        Accept();
      } else if (p == &kWakeTag) {
        uint64_t v;
        while (::read(loop->wakefd, &v, sizeof(v)) > 0) {
        }
      } else {
        auto* w = static_cast<HttpWatch*>(p);
        w->conn->OnEvent(w->backend, evs[i].events);
      }
    }
    double now = MonoNow();
    if (now - last_tick < kTick) continue;
    last_tick = now;
    if (tls_ && loop == loops_[0].get()) tls_->MaybeReload(now);
    if (loop == loops_[0].get() && accept_paused_until_ > 0 && now >= accept_paused_until_ &&
        listen_fd_ >= 0) {
      accept_paused_until_ = 0;
      epoll_event ev{};
      ev.events = EPOLLIN;
      ev.data.ptr = &kListenTag;
      ::epoll_ctl(loop->epfd, EPOLL_CTL_ADD, listen_fd_, &ev);
    }
    std::vector<std::shared_ptr<Conn>> conns;
    {
      std::lock_guard<std::mutex> g(loop->mu);
      for (auto it = loop->conns.begin(); it != loop->conns.end();) {
        if (it->second->dead()) {
          it = loop->conns.erase(it);
        } else {
          conns.push_back(it->second);
          ++it;
        }
      }
    }
    for (auto& c : conns) c->Tick(now);
  }
}

int64_t HttpServer::Open() {
  int64_t n = 0;
  for (auto& loop : loops_) {
    std::lock_guard<std::mutex> g(loop->mu);
    for (auto& [p, c] : loop->conns) n += c->dead() ? 0 : 1;
  }
  return n;
}

void HttpServer::ForEach(void (Conn::*fn)()) {
  for (auto& loop : loops_) {
    std::vector<std::shared_ptr<Conn>> conns;
    {
      std::lock_guard<std::mutex> g(loop->mu);
      for (auto& [p, c] : loop->conns) conns.push_back(c);
    }
    for (auto& c : conns) ((*c).*fn)();
  }
}

void HttpServer::Stop(double grace_s) {
  if (stopping_.exchange(true) || loops_.empty()) return;
  ::epoll_ctl(loops_[0]->epfd, EPOLL_CTL_DEL, listen_fd_, nullptr);
  ::close(listen_fd_);
  listen_fd_ = -1;
  ForEach(&Conn::CloseIfIdle);  // a busy one closes once its answer is written
  auto until = std::chrono::steady_clock::now() +
               std::chrono::microseconds(int64_t(grace_s * 1e6));
  while (Open() > 0 && std::chrono::steady_clock::now() < until) {
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
  }
  ForEach(&Conn::Abort);
  stop_loops_ = true;
  for (auto& loop : loops_) {
    uint64_t one = 1;
    (void)!::write(loop->wakefd, &one, sizeof(one));
  }
  for (auto& loop : loops_) {
    loop->thread.join();
    ::close(loop->epfd);
    ::close(loop->wakefd);
    std::lock_guard<std::mutex> g(loop->mu);
    loop->conns.clear();  // a connection an unanswered request holds lives on until its answer
  }
  {
    std::lock_guard<std::mutex> l(later_mu_);
    later_stop_ = true;
  }
  later_cv_.notify_one();
  if (later_thread_.joinable()) later_thread_.join();
}

void HttpServer::Stats(py::dict* d) const {
  (*d)["http_fast"] = int64_t(fast_);        // inference requests answered natively
  (*d)["http_shed"] = int64_t(shed_);        // of those, refused at admission
  (*d)["http_denied"] = int64_t(denied_);    // inference requests without the token (401)
  (*d)["http_inflight"] = int64_t(inflight_);
  (*d)["http_relayed"] = int64_t(relayed_);  // requests relayed to the Python server
  (*d)["http_tunnels"] = int64_t(tunnels_);  // connections passed through whole
  (*d)["http_timeouts"] = int64_t(timeouts_);  // requests not received in time (408)
  (*d)["http_connections"] = int64_t(connections_);
  (*d)["http_idle_closed"] = int64_t(idle_closed_);  // keep-alive connections closed idle
}

}  // namespace xlaserve::native
