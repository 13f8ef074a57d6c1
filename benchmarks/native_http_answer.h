// The HTTP load generator's reading of an answer (native_http_loadgen.cc): the head's status
// and body length, and the gRPC code the status stands for.

#ifndef XLASERVE_BENCHMARKS_NATIVE_HTTP_ANSWER_H_
#define XLASERVE_BENCHMARKS_NATIVE_HTTP_ANSWER_H_

#include <strings.h>

#include <cstdlib>
#include <cstring>

#include "native_loadgen_common.h"

namespace loadgen {

constexpr int kOk = 0, kCancelled = 1, kDeadline = 4, kUnavailable = 14;

// The gRPC code Triton's HTTP statuses stand for (tritonclient reads them the same way).
inline int CodeOf(int http_status, size_t body_bytes) {
  switch (http_status) {
    case 200: return body_bytes > 0 ? kOk : kEmptyResponse;
    case 400: return 3;
    case 401: return 16;
    case 403: return 7;
    case 404: return 5;
    case 408: case 504: return kDeadline;
    case 429: return 8;
    case 499: return kCancelled;
    case 501: return 12;
    case 500: return 13;
    case 503: return kUnavailable;
    default: return 2;
  }
}

// The status code and the body length of the answer at the front of `s`, or false while its
// head is incomplete. `head` becomes the head's length (up to the blank line, inclusive).
inline bool ParseHead(const char* s, size_t n, int* status, size_t* body, size_t* head) {
  const char* end = static_cast<const char*>(memmem(s, n, "\r\n\r\n", 4));
  if (end == nullptr) return false;
  *head = static_cast<size_t>(end - s) + 4;
  if (*head < 12 || std::memcmp(s, "HTTP/1.", 7) != 0) loadgen::Die("not an HTTP/1.x answer");
  *status = std::atoi(s + 9);
  *body = 0;
  for (const char* line = static_cast<const char*>(memchr(s, '\n', *head)) + 1; line < end;) {
    const char* next = static_cast<const char*>(memchr(line, '\n', static_cast<size_t>(end - line)));
    if (strncasecmp(line, "content-length:", 15) == 0) *body = std::strtoull(line + 15, nullptr, 10);
    if (next == nullptr) break;
    line = next + 1;
  }
  return true;
}

}  // namespace loadgen

#endif  // XLASERVE_BENCHMARKS_NATIVE_HTTP_ANSWER_H_
