// HTTPS for the native HTTP front end (http.h): OpenSSL over the connections' non-blocking
// sockets, with the same certificate, key and client CA files as the gRPC port. The files are
// checked every `tls_reload_s` seconds and, once changed, loaded into a fresh context that new
// connections get, so a renewed certificate needs no restart (as grpc++'s file watcher does for
// gRPC). Requests relayed to the Python server go on in plain HTTP over its unix socket. With
// tenants, the verified client certificate's names identify one as on the gRPC port.

#include <arpa/inet.h>
#include <openssl/err.h>
#include <openssl/x509v3.h>
#include <sys/socket.h>
#include <sys/stat.h>

#include <cerrno>

#include "http.h"

namespace xlaserve::native {
namespace {

std::string LastError() {
  unsigned long e = ERR_get_error();  // NOLINT(runtime/int): OpenSSL's type
  char buf[256];
  ERR_error_string_n(e, buf, sizeof(buf));
  ERR_clear_error();
  return e == 0 ? "unknown error" : std::string(buf);
}

// A server context from the files, or null with `error` saying why.
SSL_CTX* Load(const HttpOptions& o, std::string* error) {
  SSL_CTX* ctx = SSL_CTX_new(TLS_server_method());
  if (ctx == nullptr) {
    *error = "TLS: " + LastError();
    return nullptr;
  }
  SSL_CTX_set_min_proto_version(ctx, TLS1_2_VERSION);
  // Writes resume from the unsent buffer, wherever it moved (Conn::Flush).
  SSL_CTX_set_mode(ctx, SSL_MODE_ENABLE_PARTIAL_WRITE | SSL_MODE_ACCEPT_MOVING_WRITE_BUFFER);
  bool ok = SSL_CTX_use_certificate_chain_file(ctx, o.tls_cert.c_str()) == 1 &&
            SSL_CTX_use_PrivateKey_file(ctx, o.tls_key.c_str(), SSL_FILETYPE_PEM) == 1 &&
            SSL_CTX_check_private_key(ctx) == 1;
  if (ok && !o.tls_client_ca.empty()) {
    ok = SSL_CTX_load_verify_locations(ctx, o.tls_client_ca.c_str(), nullptr) == 1;
    SSL_CTX_set_verify(ctx, SSL_VERIFY_PEER | SSL_VERIFY_FAIL_IF_NO_PEER_CERT, nullptr);
  }
  if (!ok) {
    *error = "TLS files " + o.tls_cert + ", " + o.tls_key +
             (o.tls_client_ca.empty() ? "" : ", " + o.tls_client_ca) + ": " + LastError();
    SSL_CTX_free(ctx);
    return nullptr;
  }
  return ctx;
}

}  // namespace

HttpTls::HttpTls(const HttpOptions& opts, SSL_CTX* ctx) : opts_(opts), ctx_(ctx) {
  stamp_ = Stamp();
}

HttpTls::~HttpTls() { SSL_CTX_free(ctx_); }

std::unique_ptr<HttpTls> HttpTls::Create(const HttpOptions& opts, std::string* error) {
  SSL_CTX* ctx = Load(opts, error);
  return ctx == nullptr ? nullptr : std::make_unique<HttpTls>(opts, ctx);
}

std::string HttpTls::Stamp() const {
  std::string s;
  for (const std::string* f : {&opts_.tls_cert, &opts_.tls_key, &opts_.tls_client_ca}) {
    struct stat st{};
    if (f->empty() || ::stat(f->c_str(), &st) != 0) {
      s += "-;";
      continue;
    }
    s += std::to_string(st.st_mtim.tv_sec) + "." + std::to_string(st.st_mtim.tv_nsec) + "," +
         std::to_string(st.st_size) + "," + std::to_string(st.st_ino) + ";";
  }
  return s;
}

void HttpTls::MaybeReload(double now) {
  if (now < next_check_) return;
  next_check_ = now + std::max(1, opts_.tls_reload_s);
  std::string stamp = Stamp();
  if (stamp == stamp_) return;
  std::string error;
  SSL_CTX* fresh = Load(opts_, &error);
  if (fresh == nullptr) return;  // half-written files: the next check tries again
  std::lock_guard<std::mutex> l(mu_);
  SSL_CTX_free(ctx_);  // sessions made from it hold their own reference
  ctx_ = fresh;
  stamp_ = stamp;
}

SSL* HttpTls::NewSsl(int fd) {
  std::lock_guard<std::mutex> l(mu_);
  SSL* ssl = SSL_new(ctx_);
  if (ssl == nullptr) return nullptr;
  SSL_set_fd(ssl, fd);
  SSL_set_accept_state(ssl);
  return ssl;
}

// -- the client certificate's names --------------------------------------------------------------

namespace {

// An ASN1 string's bytes.
std::string Text(const ASN1_STRING* s) {
  return std::string(reinterpret_cast<const char*>(ASN1_STRING_get0_data(s)),
                     size_t(ASN1_STRING_length(s)));
}

// A SAN as gRPC's peer property x509_subject_alternative_name has it (tsi: DNS, URI and email
// names as written, IP addresses as inet_ntop text); "" for another kind.
std::string SanText(const GENERAL_NAME* g) {
  switch (g->type) {
    case GEN_DNS: return Text(g->d.dNSName);
    case GEN_URI: return Text(g->d.uniformResourceIdentifier);
    case GEN_EMAIL: return Text(g->d.rfc822Name);
    case GEN_IPADD: {
      const ASN1_OCTET_STRING* ip = g->d.iPAddress;
      int len = ASN1_STRING_length(ip);
      char buf[INET6_ADDRSTRLEN] = {};
      if ((len != 4 && len != 16) ||
          inet_ntop(len == 4 ? AF_INET : AF_INET6, ASN1_STRING_get0_data(ip), buf,
                    sizeof(buf)) == nullptr) {
        return "";
      }
      return buf;
    }
    default: return "";
  }
}

}  // namespace

const std::vector<std::string>& Conn::PeerNames() {
  if (peer_read_ || ssl_ == nullptr) return peer_names_;
  peer_read_ = true;  // the handshake is over once a request has arrived
  const X509* cert = SSL_get0_peer_certificate(ssl_);
  if (cert == nullptr || SSL_get_verify_result(ssl_) != X509_V_OK) return peer_names_;
  // The order of the gRPC port's auth context (tenants.cc Tenants::Of): the CN, then the SANs.
  const X509_NAME* subject = X509_get_subject_name(cert);
  int at = subject ? X509_NAME_get_index_by_NID(subject, NID_commonName, -1) : -1;
  if (at >= 0) {
    peer_names_.push_back(Text(X509_NAME_ENTRY_get_data(X509_NAME_get_entry(subject, at))));
  }
  auto* sans = static_cast<GENERAL_NAMES*>(
      X509_get_ext_d2i(cert, NID_subject_alt_name, nullptr, nullptr));
  for (int i = 0; sans != nullptr && i < sk_GENERAL_NAME_num(sans); ++i) {
    std::string name = SanText(sk_GENERAL_NAME_value(sans, i));
    if (!name.empty()) peer_names_.push_back(std::move(name));
  }
  GENERAL_NAMES_free(sans);
  return peer_names_;
}

// -- a connection's bytes (the connection's lock held) -------------------------------------------

ssize_t Conn::ClientRecv(char* buf, size_t n) {
  if (ssl_ == nullptr) return ::recv(fd_, buf, n, 0);
  tls_want_write_ = false;
  ERR_clear_error();
  size_t got = 0;
  if (SSL_read_ex(ssl_, buf, n, &got) == 1) return ssize_t(got);
  switch (SSL_get_error(ssl_, 0)) {
    case SSL_ERROR_WANT_WRITE:
      tls_want_write_ = true;  // the handshake's bytes wait for room: EPOLLOUT, then read again
      [[fallthrough]];
    case SSL_ERROR_WANT_READ:
      errno = EAGAIN;
      return -1;
    case SSL_ERROR_ZERO_RETURN:
      return 0;  // the client closed TLS
    default:  // a failed handshake (no client certificate, a bad one...) or a broken stream
      ERR_clear_error();
      errno = ECONNRESET;
      return -1;
  }
}

ssize_t Conn::ClientSend(const char* data, size_t n) {
  if (ssl_ == nullptr) return ::send(fd_, data, n, MSG_NOSIGNAL);
  ERR_clear_error();
  size_t sent = 0;
  if (SSL_write_ex(ssl_, data, n, &sent) == 1) return ssize_t(sent);
  switch (SSL_get_error(ssl_, 0)) {
    case SSL_ERROR_WANT_WRITE:
    case SSL_ERROR_WANT_READ:  // still shaking hands: the reads drive it
      errno = EAGAIN;
      return -1;
    default:
      ERR_clear_error();
      errno = EPIPE;
      return -1;
  }
}

}  // namespace xlaserve::native
