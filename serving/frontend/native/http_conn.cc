// One client connection of the native HTTP front end (http.h): reads requests one at a time
// (keep-alive; pipelined requests wait in the buffer, so answers keep their order), offers each
// complete one to the fast path or relays it (http_relay.cc), writes the answers, enforces the
// read timeout; and parses request heads.

#include <sys/epoll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>

#include "http.h"

namespace xlaserve::native {
namespace {

constexpr size_t kMaxHead = 64 << 10;     // a longer head goes to the Python server to refuse
constexpr const char* kContinue = "HTTP/1.1 100 Continue\r\n\r\n";
// serving/frontend/http/server.py REQUEST_TIMEOUT, byte for byte.
constexpr const char* kRequestTimeout =
    "HTTP/1.1 408 Request Timeout\r\nconnection: close\r\ncontent-type: text/plain"
    "\r\ncontent-length: 30\r\n\r\nrequest not received in time\r\n";

}  // namespace

Conn::Conn(HttpServer* s, int epfd, int fd)
    : server_(s), epfd_(epfd), fd_(fd), last_active_(MonoNow()) {
  server_->connections_++;
}

Conn::~Conn() {
  if (ssl_ != nullptr) SSL_free(ssl_);
  if (bfd_ >= 0) ::close(bfd_);
  ::close(fd_);
  server_->connections_--;
}

void Conn::Register() {
  std::lock_guard<std::mutex> l(mu_);
  epoll_event ev{};
  ev.events = cmask_ = EPOLLIN;
  ev.data.ptr = &cw_;
  ::epoll_ctl(epfd_, EPOLL_CTL_ADD, fd_, &ev);
}

// -- events (the loop's thread) -----------------------------------------------------------------

void Conn::OnEvent(bool backend, uint32_t events) {
  std::lock_guard<std::mutex> l(mu_);
  if (dead_) return;
  if (backend) {
    OnBackend(events);
  } else {
    if (tls_want_write_ && (events & EPOLLOUT)) events |= EPOLLIN;  // the handshake goes on
    if (events & EPOLLOUT) Flush();
    if (!dead_ && (events & (EPOLLIN | EPOLLHUP | EPOLLERR))) {
      char buf[16 << 10];
      size_t got = 0;
      while (!dead_ && (got < kReadChunk || TlsPending())) {  // TLS: nothing left in OpenSSL
        ssize_t n = ClientRecv(buf, sizeof(buf));
        if (n > 0) {
          got += size_t(n);
          last_active_ = MonoNow();
          if (state_ == kTunnel) {
            bout_.append(buf, size_t(n));
          } else {
            in_.append(buf, size_t(n));
          }
          continue;
        }
        if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) break;
        if (n < 0 && errno == EINTR) continue;
        Close();  // the client closed (or failed): an answer still to come is dropped
        return;
      }
      if (state_ == kTunnel && bfd_ >= 0 && !connecting_) OnBackend(EPOLLOUT);
    }
  }
  if (!dead_ && state_ == kIdle) Process();
  if (!dead_) Interest();
}

void Conn::Tick(double now) {
  std::lock_guard<std::mutex> l(mu_);
  double idle = server_->options().idle_timeout_s;
  if (!dead_ && Quiet() && idle > 0 && now - last_active_ >= idle) {
    server_->idle_closed_++;  // as uvicorn's keep-alive timeout: an idle connection holds nothing
    Close();
    return;
  }
  if (dead_ || state_ != kIdle || first_byte_ == 0) return;
  if (now - first_byte_ < server_->options().read_timeout_s) return;
  server_->timeouts_++;
  first_byte_ = 0;
  in_.clear();
  close_after_ = true;
  if (Send(kRequestTimeout) && Flushed()) Close();
  if (!dead_) Interest();
}

void Conn::CloseIfIdle() {
  std::lock_guard<std::mutex> l(mu_);
  if (dead_) return;
  if (Quiet()) {
    Close();
  } else {
    close_after_ = true;  // no further request is taken
  }
}

void Conn::Abort() {
  std::lock_guard<std::mutex> l(mu_);
  if (!dead_) Close();
}

// -- requests -----------------------------------------------------------------------------------

void Conn::Process() {
  while (!dead_ && state_ == kIdle && !close_after_) {
    if (in_.empty()) {
      first_byte_ = 0;
      return;
    }
    if (first_byte_ == 0) first_byte_ = MonoNow();
    HttpHead h;
    int parsed = ParseHead(in_, &h);
    if (parsed == 0 && in_.size() <= kMaxHead) return;
    if (parsed <= 0 || h.tunnel || h.minor != 1 ||
        h.content_length > server_->options().max_body_bytes) {
      Tunnel();
      return;
    }
    size_t total = h.head_len + size_t(h.content_length);
    if (in_.size() < total) {
      if (h.expect_continue && !continued_) {
        continued_ = true;
        Send(kContinue);
      }
      return;
    }
    continued_ = false;
    first_byte_ = 0;
    close_ = h.close;
    auto call = std::make_unique<HttpCall>();
    const char* base = in_.data();
    if (in_.size() == total) {
      call->bytes.swap(in_);
    } else {
      call->bytes.assign(in_, 0, total);
      in_.erase(0, total);
    }
    h.Rebase(base, call->bytes.data());  // the views now point into the request's own bytes
    call->body_at = h.head_len;
    call->conn = shared_from_this();
    std::string answer;
    switch (server_->TryFast(&call, h, PeerNames(), &answer)) {
      case FastResult::kQueued:
        state_ = kFast;
        return;
      case FastResult::kAnswered:  // refused at the door
        if (close_) close_after_ = true;
        if (!Send(answer)) return;
        if (close_after_ && Flushed()) Close();
        continue;
      case FastResult::kHeld:  // refused at the door, answered later (nothing read meanwhile)
        state_ = kFast;
        server_->Later(shared_from_this(), std::move(answer), close_, MonoNow() + call->hold_s);
        return;
      case FastResult::kRelay:
      default:
        Relay(call->bytes, h, call->trace);
    }
  }
}

void Conn::Finish(const std::string& response, bool close) {
  std::lock_guard<std::mutex> l(mu_);
  if (dead_) return;
  state_ = kIdle;
  last_active_ = MonoNow();
  if (close) close_after_ = true;
  if (!Send(response)) return;
  if (close_after_ && Flushed()) {
    Close();
    return;
  }
  Process();
  if (!dead_) Interest();
}

// -- writing to the client ----------------------------------------------------------------------

bool Conn::Send(std::string_view data) {
  if (dead_) return false;
  if (Flushed()) {
    out_.clear();
    out_off_ = 0;
    while (!data.empty()) {
      ssize_t n = ClientSend(data.data(), data.size());
      if (n > 0) {
        data.remove_prefix(size_t(n));
        continue;
      }
      if (n < 0 && errno == EINTR) continue;
      if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) break;
      Close();
      return false;
    }
  }
  out_.append(data);
  return true;
}

void Conn::Flush() {
  while (out_off_ < out_.size()) {
    ssize_t n = ClientSend(out_.data() + out_off_, out_.size() - out_off_);
    if (n > 0) {
      out_off_ += size_t(n);
      continue;
    }
    if (n < 0 && errno == EINTR) continue;
    if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) return;
    Close();
    return;
  }
  out_.clear();
  out_off_ = 0;
  if (close_after_ && state_ == kIdle) Close();
}

// -- epoll interest and closing -----------------------------------------------------------------

void Conn::Interest() {
  size_t unsent = out_.size() - out_off_;
  uint32_t want = 0;
  if (!close_after_) {
    size_t cap = state_ == kIdle ? size_t(server_->options().max_body_bytes) + kMaxHead
                                 : kMaxHead;
    if (state_ == kTunnel ? bout_.size() < kHighWater : in_.size() < cap) want |= EPOLLIN;
  }
  if (unsent > 0 || tls_want_write_) want |= EPOLLOUT;
  if (want != cmask_) {
    epoll_event ev{};
    ev.events = want;
    ev.data.ptr = &cw_;
    ::epoll_ctl(epfd_, EPOLL_CTL_MOD, fd_, &ev);
    cmask_ = want;
  }
  if (bfd_ < 0) return;
  uint32_t bwant = 0;
  if (unsent < kHighWater) bwant |= EPOLLIN;
  if (connecting_ || (!backend_write_done_ && bout_off_ < bout_.size())) bwant |= EPOLLOUT;
  if (bwant != bmask_) {
    epoll_event ev{};
    ev.events = bwant;
    ev.data.ptr = &bw_;
    ::epoll_ctl(epfd_, EPOLL_CTL_MOD, bfd_, &ev);
    bmask_ = bwant;
  }
}

void Conn::Close() {
  if (dead_) return;
  dead_ = true;
  ::epoll_ctl(epfd_, EPOLL_CTL_DEL, fd_, nullptr);
  ::shutdown(fd_, SHUT_RDWR);  // the descriptor itself closes with the last reference
  if (bfd_ >= 0) {
    ::epoll_ctl(epfd_, EPOLL_CTL_DEL, bfd_, nullptr);
    ::close(bfd_);
    bfd_ = -1;
  }
  in_.clear();
  out_.clear();
  bout_.clear();
}

// -- parsing a head -----------------------------------------------------------------------------

std::string_view HttpHead::Get(std::string_view name, int* count) const {
  std::string_view found;
  int n = 0;
  for (auto& [k, v] : headers) {
    if (!IEquals(k, name)) continue;
    if (n++ == 0) found = v;
  }
  if (count != nullptr) *count = n;
  return found;
}

namespace {

// RFC 9110 token characters (methods, header names).
bool Token(std::string_view s) {
  if (s.empty()) return false;
  for (char ch : s) {
    auto c = uint8_t(ch);
    if (!(std::isalnum(c) || std::strchr("!#$%&'*+-.^_`|~", c) != nullptr) || c == 0) {
      return false;
    }
  }
  return true;
}

// Where the head ends (after its blank line), 0 while incomplete, or npos when a line ends
// in a bare LF or holds a bare CR: the Python server is the one to refuse those.
size_t HeadEnd(std::string_view buf) {
  size_t end = buf.find("\r\n\r\n");
  size_t limit = end == std::string_view::npos ? buf.size() : end + 4;
  for (size_t i = 0; i < limit; ++i) {
    if (buf[i] == '\n' && (i == 0 || buf[i - 1] != '\r')) return std::string_view::npos;
    if (buf[i] == '\r' && i + 1 < limit && buf[i + 1] != '\n') return std::string_view::npos;
  }
  return end == std::string_view::npos ? 0 : limit;
}

bool RequestLine(std::string_view line, HttpHead* h) {
  size_t sp1 = line.find(' ');
  if (sp1 == std::string_view::npos) return false;
  size_t sp2 = line.find(' ', sp1 + 1);
  if (sp2 == std::string_view::npos || line.find(' ', sp2 + 1) != std::string_view::npos) {
    return false;
  }
  h->method = line.substr(0, sp1);
  h->target = line.substr(sp1 + 1, sp2 - sp1 - 1);
  std::string_view version = line.substr(sp2 + 1);
  for (char ch : h->method) {
    if (ch < 'A' || ch > 'Z') return false;  // the methods HTTP defines are upper case
  }
  for (char ch : h->target) {
    if (uint8_t(ch) <= 0x20 || uint8_t(ch) >= 0x7f) return false;
  }
  if (version.size() != 8 || version.substr(0, 7) != "HTTP/1." || h->target.empty()) return false;
  h->minor = version[7] - '0';
  return true;
}

// Whether a Connection value lists the token "close".
bool ListsClose(std::string_view v) {
  while (!v.empty()) {
    size_t comma = v.find(',');
    if (IEquals(TrimBlanks(v.substr(0, comma)), "close")) return true;
    if (comma == std::string_view::npos) break;
    v.remove_prefix(comma + 1);
  }
  return false;
}

}  // namespace

void HttpHead::Rebase(const char* from, const char* to) {
  auto move = [from, to](std::string_view v) { return std::string_view(to + (v.data() - from),
                                                                        v.size()); };
  method = move(method);
  target = move(target);
  for (auto& [k, v] : headers) {
    k = move(k);
    v = move(v);
  }
}

int ParseHead(std::string_view buf, HttpHead* h) {
  size_t end = HeadEnd(buf);
  if (end == 0) return 0;
  if (end == std::string_view::npos) return -1;
  h->head_len = end;
  size_t eol = buf.find("\r\n");
  if (!RequestLine(buf.substr(0, eol), h)) return -1;
  for (size_t pos = eol + 2; pos < end - 2;) {
    size_t next = buf.find("\r\n", pos);
    std::string_view l = buf.substr(pos, next - pos);
    size_t colon = l.find(':');
    if (colon == std::string_view::npos || !Token(l.substr(0, colon))) return -1;
    std::string_view name = l.substr(0, colon), value = l.substr(colon + 1);
    for (char ch : value) {
      if ((uint8_t(ch) < 0x20 && ch != '\t') || uint8_t(ch) == 0x7f) return -1;
    }
    value = TrimBlanks(value);
    h->headers.emplace_back(name, value);
    if (IEquals(name, "connection") && ListsClose(value)) h->close = true;
    pos = next + 2;
  }
  int n = 0;
  std::string_view cl = h->Get("content-length", &n);
  if (n > 1 || (n == 1 && (cl.empty() || cl.size() > 15))) h->tunnel = true;
  for (char ch : cl) {
    if (ch < '0' || ch > '9') h->tunnel = true;
  }
  if (!h->tunnel && n == 1) h->content_length = std::stoll(std::string(cl));
  h->Get("transfer-encoding", &n);
  if (n > 0) h->tunnel = true;
  h->Get("upgrade", &n);
  if (n > 0 || h->method == "CONNECT") h->tunnel = true;
  h->expect_continue = IEquals(h->Get("expect"), "100-continue");
  return 1;
}

}  // namespace xlaserve::native
