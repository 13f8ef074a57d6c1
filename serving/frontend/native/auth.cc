// The native front ends' security: TLS credentials for the gRPC port (grpc++'s file-watching
// certificate provider, so a renewed certificate needs no restart; with a client CA, mutual
// TLS), and the bearer token check:
// the first gRPC authorization header, or an HTTP request's one Authorization header, must be
// "Bearer <token>" (as in serving/frontend/auth.py), compared in constant time.

#include <grpcpp/security/server_credentials.h>
#include <grpcpp/security/tls_certificate_provider.h>
#include <grpcpp/security/tls_credentials_options.h>

#include <algorithm>
#include <cctype>

#include "frontend.h"
#include "tenants.h"

namespace xlaserve::native {

bool BearerMatches(std::string_view v, const std::string& token) {
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
  return diff == 0;
}

bool Authorized(const grpc::GenericServerContext& ctx, const std::string& token) {
  if (token.empty()) return true;
  for (const auto& [key, value] : ctx.client_metadata()) {
    if (std::string_view(key.data(), key.size()) != "authorization") continue;
    // the first authorization header decides, as in serving/frontend/auth.py
    return BearerMatches(std::string_view(value.data(), value.size()), token);
  }
  return false;
}

bool Frontend::RefuseUnauthorized(Call* c) {
  // Refused here, not relayed to Python's interceptor: bad tokens must not cost a round trip.
  denied_++;
  Refuse(c, grpc::Status(grpc::StatusCode::UNAUTHENTICATED,
                         "missing or wrong credentials: send metadata 'authorization: Bearer"
                         " <token>'"),
         kMaxRefusalHoldS);
  return true;
}

std::shared_ptr<grpc::ServerCredentials> Credentials(const std::string& cert_file,
                                                     const std::string& key_file, int reload_s,
                                                     const std::string& client_ca) {
  if (cert_file.empty()) return grpc::InsecureServerCredentials();
  // With a client CA the same provider watches it too: a renewed CA bundle needs no restart.
  auto certs = std::make_shared<grpc::experimental::FileWatcherCertificateProvider>(
      key_file, cert_file, client_ca, unsigned(std::max(1, reload_s)));
  grpc::experimental::TlsServerCredentialsOptions options(certs);
  options.watch_identity_key_cert_pairs();
  if (client_ca.empty()) {
    options.set_cert_request_type(GRPC_SSL_DONT_REQUEST_CLIENT_CERTIFICATE);
  } else {  // mutual TLS: no handshake completes without a certificate the CA signed
    options.watch_root_certs();
    options.set_cert_request_type(GRPC_SSL_REQUEST_AND_REQUIRE_CLIENT_CERTIFICATE_AND_VERIFY);
  }
  return grpc::experimental::TlsServerCredentials(options);
}

}  // namespace xlaserve::native
