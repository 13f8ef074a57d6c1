// The native HTTP front end's relay (http.h): a request the fast path leaves goes to the Python
// server on its unix socket with "connection: close", so the response ends at the backend's end
// of file; it is forwarded as it comes, that header dropped unless the client asked for it. A
// connection the relay cannot frame request by request becomes a byte tunnel to the backend.

#include <sys/epoll.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>

#include "http.h"
#include "tenants.h"

namespace xlaserve::native {
namespace {


// Headers a relayed request must not carry on (the relay frames it with "connection: close").
bool HopByHop(std::string_view name) {
  return IEquals(name, "connection") || IEquals(name, "keep-alive") || IEquals(name, "expect") ||
         IEquals(name, "proxy-connection");
}

}  // namespace

bool Conn::OpenBackend() {
  bfd_ = ::socket(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
  sockaddr_un addr{};
  addr.sun_family = AF_UNIX;
  const std::string& path = server_->options().backend;
  std::memcpy(addr.sun_path, path.data(), std::min(path.size(), sizeof(addr.sun_path) - 1));
  int rc = bfd_ < 0 ? -1 : ::connect(bfd_, reinterpret_cast<sockaddr*>(&addr), sizeof(addr));
  if (rc < 0 && errno != EINPROGRESS && errno != EAGAIN) {
    if (bfd_ >= 0) ::close(bfd_);
    bfd_ = -1;
    return false;
  }
  connecting_ = rc < 0;
  backend_write_done_ = false;
  bmask_ = 0;
  epoll_event ev{};
  ev.events = EPOLLOUT | EPOLLIN;
  ev.data.ptr = &bw_;
  bmask_ = ev.events;
  ::epoll_ctl(epfd_, EPOLL_CTL_ADD, bfd_, &ev);
  return true;
}

void Conn::Relay(const std::string& request, const HttpHead& h, int trace) {
  server_->relayed_++;
  std::string head;
  head.reserve(h.head_len + 32);
  head.append(h.method).append(" ").append(h.target).append(" HTTP/1.1\r\n");
  for (auto& [name, value] : h.headers) {
    if (HopByHop(name) || IEquals(name, kTraceMarker) || IEquals(name, kTenantMarker)) {
      continue;  // only ours reach Python
    }
    head.append(name).append(": ").append(value).append("\r\n");
  }
  if (trace >= 0) {  // with the secret: Python also hears connections tunnelled unparsed
    head.append(kTraceMarker).append(": ").append(server_->fe()->TraceMark(trace)).append("\r\n");
  }
  // The tenant decided here, from the token or the client certificate Python never sees.
  if (Tenants* ts = server_->fe()->tenants()) {
    int tenant = server_->TenantOf(h, PeerNames());
    if (tenant >= 0) {
      head.append(kTenantMarker).append(": ").append(ts->RelayMark(tenant)).append("\r\n");
    }
  }
  head.append("connection: close\r\n\r\n");
  bout_ = std::move(head);
  bout_.append(request, h.head_len, std::string::npos);
  bout_off_ = 0;
  resp_head_.clear();
  resp_started_ = false;
  state_ = kRelay;
  if (!OpenBackend()) EndRelay(false);
}

void Conn::Tunnel() {
  server_->tunnels_++;
  state_ = kTunnel;
  first_byte_ = 0;
  bout_.swap(in_);
  in_.clear();
  bout_off_ = 0;
  if (!OpenBackend()) {
    Send(HttpErrorResponse(14, "the HTTP server behind the front end is not reachable", true));
    close_after_ = true;
    state_ = kIdle;
    if (Flushed()) Close();
  }
}

void Conn::OnBackend(uint32_t events) {
  if (bfd_ < 0) return;
  if (connecting_ && (events & (EPOLLOUT | EPOLLERR | EPOLLHUP))) {
    int err = 0;
    socklen_t len = sizeof(err);
    ::getsockopt(bfd_, SOL_SOCKET, SO_ERROR, &err, &len);
    connecting_ = false;
    if (err != 0) {
      EndRelay(false);
      return;
    }
  }
  while (!connecting_ && !backend_write_done_ && bout_off_ < bout_.size()) {
    ssize_t n = ::send(bfd_, bout_.data() + bout_off_, bout_.size() - bout_off_, MSG_NOSIGNAL);
    if (n > 0) {
      bout_off_ += size_t(n);
      continue;
    }
    if (n < 0 && errno == EINTR) continue;
    if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) break;
    backend_write_done_ = true;  // it stopped reading: its answer may still come
  }
  if (bout_off_ >= bout_.size()) {
    bout_.clear();
    bout_off_ = 0;
  }
  if (connecting_ || !(events & (EPOLLIN | EPOLLHUP | EPOLLERR))) return;
  char buf[16 << 10];
  size_t got = 0;
  while (!dead_ && got < kReadChunk && out_.size() - out_off_ < kHighWater) {
    ssize_t n = ::recv(bfd_, buf, sizeof(buf), 0);
    if (n > 0) {
      got += size_t(n);
      ForwardResponse(std::string_view(buf, size_t(n)));
      continue;
    }
    if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) return;
    if (n < 0 && errno == EINTR) continue;
    EndRelay(n == 0);
    return;
  }
}

void Conn::ForwardResponse(std::string_view data) {
  if (state_ == kTunnel || resp_started_) {
    Send(data);
    return;
  }
  resp_head_.append(data);
  size_t end = resp_head_.find("\r\n\r\n");
  if (end == std::string::npos) return;
  // The head without the relay's "connection: close", unless the client asked for it.
  std::string head;
  size_t pos = 0, stop = end + 2;
  while (pos < stop) {
    size_t eol = resp_head_.find("\r\n", pos);
    std::string_view line(resp_head_.data() + pos, eol - pos);
    size_t colon = line.find(':');
    std::string_view name = line.substr(0, colon == std::string_view::npos ? 0 : colon);
    std::string_view value = colon == std::string_view::npos ? "" : line.substr(colon + 1);
    value = TrimBlanks(value);
    // Not the app's own answer (it always sends JSON, binary or events): uvicorn refused the
    // request itself (it could not read it), so the connection closes, as it would there.
    if (IEquals(name, "content-type") && value.substr(0, 10) == "text/plain") close_ = true;
    bool drop = IEquals(name, "connection");
    if (!drop) head.append(line).append("\r\n");
    pos = eol + 2;
  }
  if (close_) head.append("connection: close\r\n");
  head.append("\r\n");
  resp_started_ = true;
  std::string rest = resp_head_.substr(end + 4);
  resp_head_.clear();
  if (Send(head) && !rest.empty()) Send(rest);
}

void Conn::EndRelay(bool eof) {
  if (bfd_ >= 0) {
    ::epoll_ctl(epfd_, EPOLL_CTL_DEL, bfd_, nullptr);
    ::close(bfd_);
    bfd_ = -1;
  }
  bout_.clear();
  bout_off_ = 0;
  bool tunnel = state_ == kTunnel;
  state_ = kIdle;
  last_active_ = MonoNow();
  if (tunnel) {
    close_after_ = true;
  } else if (!resp_started_) {
    Send(HttpErrorResponse(14, eof ? "the HTTP server behind the front end closed without an"
                                     " answer" : "the HTTP server behind the front end is not"
                                     " reachable", true));
    close_after_ = true;
  } else if (close_) {
    close_after_ = true;
  }
  if (!dead_ && close_after_ && Flushed()) Close();
}

}  // namespace xlaserve::native
