// An independent reference for the gRPC fuzz target: whether protobuf (upb, as the Python
// servicer's grpc_service_pb2 parses) accepts the bytes of a ModelInferRequest. Written from
// protobuf's wire rules as measured against the Python package (tags and lengths at most 5
// bytes, lengths under 2^31, varints at most 10, groups matched, proto3 strings valid UTF-8,
// a known field of another wire type kept as unknown), not from wire.cc. The target asserts
// that what ParseRequest serves natively, Python would have parsed: otherwise a client would
// get an answer from one front end and INVALID_ARGUMENT from the other for the same bytes.

#ifndef XLASERVE_FUZZ_PROTO_ORACLE_H_
#define XLASERVE_FUZZ_PROTO_ORACLE_H_

#include <cstdint>
#include <string_view>

namespace xlaserve::fuzz {

// The message types of grpc_service.proto that a ModelInferRequest holds.
enum class Msg { kRequest, kParamEntry, kParameter, kInput, kOutput, kOpaque };

// What a field of `m` is: 'S' a string (UTF-8), 'M' a message (its type in `*sub`), 'P' an
// integer that may also come packed, 'V' a varint, 'D' fixed64, 'B' bytes, 0 unknown.
inline char FieldKind(Msg m, uint32_t f, Msg* sub) {
  switch (m) {
    case Msg::kRequest:
      if (f <= 3) return 'S';
      if (f == 4) return *sub = Msg::kParamEntry, 'M';
      if (f == 5) return *sub = Msg::kInput, 'M';
      if (f == 6) return *sub = Msg::kOutput, 'M';
      return f == 7 ? 'B' : 0;
    case Msg::kParamEntry:
      if (f == 1) return 'S';
      return f == 2 ? (*sub = Msg::kParameter, 'M') : 0;
    case Msg::kParameter:
      return f == 1 || f == 2 || f == 5 ? 'V' : f == 3 ? 'S' : f == 4 ? 'D' : 0;
    case Msg::kInput:
      if (f <= 2) return 'S';
      if (f == 3) return 'P';
      if (f == 4) return *sub = Msg::kParamEntry, 'M';
      return f == 5 ? (*sub = Msg::kOpaque, 'M') : 0;
    case Msg::kOutput:
      if (f == 1) return 'S';
      return f == 2 ? (*sub = Msg::kParamEntry, 'M') : 0;
    default:
      return 0;  // contents: wire.cc never serves them; checked as unknown fields
  }
}

struct Reader {
  const uint8_t *p, *end;
  bool Varint(uint64_t* v, int max_bytes) {
    uint64_t out = 0;
    for (int i = 0; i < max_bytes; ++i) {
      if (p >= end) return false;
      uint8_t b = *p++;
      if (i < 10) out |= uint64_t(b & 0x7f) << (7 * i);
      if (!(b & 0x80)) return *v = out, true;
    }
    return false;
  }
  bool Skip(size_t n) {
    if (size_t(end - p) < n) return false;
    p += n;
    return true;
  }
};

inline bool Utf8(std::string_view s) {
  size_t i = 0;
  while (i < s.size()) {
    auto c = uint8_t(s[i]);
    size_t n = c < 0x80 ? 0 : c >= 0xc2 && c <= 0xdf ? 1 : c >= 0xe0 && c <= 0xef ? 2
             : c >= 0xf0 && c <= 0xf4 ? 3 : 9;
    if (n == 9 || s.size() - i <= n) return n == 0;
    uint32_t cp = n == 0 ? c : c & (0x3f >> n);
    for (size_t k = 1; k <= n; ++k) {
      auto b = uint8_t(s[i + k]);
      if ((b & 0xc0) != 0x80) return false;
      cp = cp << 6 | (b & 0x3f);
    }
    if ((n == 2 && (cp < 0x800 || (cp >= 0xd800 && cp <= 0xdfff))) ||
        (n == 3 && (cp < 0x10000 || cp > 0x10ffff))) {
      return false;
    }
    i += n + 1;
  }
  return true;
}

// Whether protobuf parses `data` as a message of type `m` (`group`: inside a group of field
// `group`, which must end with its end tag).
inline bool ProtoAccepts(Msg m, Reader* r, uint32_t group = 0, int depth = 0) {
  if (depth > 90) return false;
  while (r->p < r->end) {
    uint64_t tag;
    if (!r->Varint(&tag, 5) || tag > 0xffffffffu || (tag >> 3) == 0) return false;
    auto f = uint32_t(tag >> 3), wt = uint32_t(tag & 7);
    Msg sub = Msg::kOpaque;
    char kind = FieldKind(m, f, &sub);
    uint64_t v;
    if (wt == 0) {
      if (!r->Varint(&v, 10)) return false;
    } else if (wt == 1 || wt == 5) {
      if (!r->Skip(wt == 1 ? 8 : 4)) return false;
    } else if (wt == 2) {
      if (!r->Varint(&v, 5) || v > 0x7fffffff || size_t(r->end - r->p) < v) return false;
      std::string_view s(reinterpret_cast<const char*>(r->p), size_t(v));
      Reader in{r->p, r->p + v};
      r->p += v;
      if (kind == 'S' && !Utf8(s)) return false;
      if (kind == 'M' && !ProtoAccepts(sub, &in, 0, depth + 1)) return false;
      if (kind == 'P') {
        while (in.p < in.end) {
          if (!in.Varint(&v, 10)) return false;
        }
      }
      // kind 0 or 'B': unknown or bytes, any content
    } else if (wt == 3) {
      Reader rest{r->p, r->end};
      if (!ProtoAccepts(Msg::kOpaque, &rest, f, depth + 1)) return false;
      r->p = rest.p;
    } else if (wt == 4) {
      return group == f;  // the end of the group being read (an unmatched end: corrupt)
    } else {
      return false;
    }
  }
  return group == 0;
}

inline bool ProtoAcceptsRequest(std::string_view msg) {
  Reader r{reinterpret_cast<const uint8_t*>(msg.data()),
           reinterpret_cast<const uint8_t*>(msg.data()) + msg.size()};
  return ProtoAccepts(Msg::kRequest, &r);
}

}  // namespace xlaserve::fuzz

#endif  // XLASERVE_FUZZ_PROTO_ORACLE_H_
