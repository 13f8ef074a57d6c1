// What the two C++ load generators share (native_loadgen.cc over gRPC, native_http_loadgen.cc
// over HTTP): status names, the summary and latency lines benchmarks/native_loadgen.py parses,
// and the answer records of SUT mode (benchmarks/slo_sut.py reads them).

#ifndef XLASERVE_BENCHMARKS_NATIVE_LOADGEN_COMMON_H_
#define XLASERVE_BENCHMARKS_NATIVE_LOADGEN_COMMON_H_

#include <errno.h>
#include <unistd.h>

#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <sstream>
#include <string>
#include <vector>

namespace loadgen {

using Clock = std::chrono::steady_clock;
constexpr int kEmptyResponse = 100;  // OK status but a zero-byte body: counted as an error

inline const char* CodeName(int code) {
  static const char* kNames[] = {
      "OK",        "CANCELLED",         "UNKNOWN",   "INVALID_ARGUMENT", "DEADLINE_EXCEEDED",
      "NOT_FOUND", "ALREADY_EXISTS",    "PERMISSION_DENIED", "RESOURCE_EXHAUSTED",
      "FAILED_PRECONDITION", "ABORTED", "OUT_OF_RANGE", "UNIMPLEMENTED", "INTERNAL",
      "UNAVAILABLE", "DATA_LOSS",        "UNAUTHENTICATED"};
  if (code >= 0 && code <= 16) return kNames[code];
  return code == kEmptyResponse ? "EMPTY_RESPONSE" : "UNKNOWN";
}

struct Sample {  // one recorded request: its status code and latency
  int code;
  int64_t micros;
};

struct SutRecord {  // SUT mode's answer: LoadGen's query id, status code, microseconds
  uint64_t id;
  int64_t code, micros;
};

[[noreturn]] inline void Die(const std::string& msg) {
  std::fprintf(stderr, "%s: %s\n", program_invocation_short_name, msg.c_str());
  std::exit(2);
}

// The load flags both generators take.
struct LoadFlags {
  std::string latencies_path;  // --latencies: one "CODE MICROS" line per recorded request
  int concurrency = 16;        // closed loop: requests always in flight
  double rate = 0;             // > 0: open loop, requests/s on a fixed schedule
  double duration = 5, warmup = 0.5;  // the recorded window starts after the warm-up
  double timeout = 10;         // <= 0: none
  bool sut = false;            // LoadGen's SUT: ids in on stdin, answers out on stdout

  // Reads "--flag value" pairs: the load flags here, the rest through `own(k, v)`, which says
  // whether it knew the flag (an unknown flag or a missing value ends the program).
  template <typename Own>
  void Parse(int argc, char** argv, Own own) {
    for (int i = 1; i < argc; ++i) {
      std::string k = argv[i];
      if (i + 1 >= argc) Die("missing value for " + k);
      std::string v = argv[++i];
      if (!Take(k, v) && !own(k, v)) Die("unknown flag " + k);
    }
  }

  // Takes flag `k` with value `v` when it is one of these; false otherwise.
  bool Take(const std::string& k, const std::string& v) {
    if (k == "--latencies") latencies_path = v;
    else if (k == "--concurrency") concurrency = std::stoi(v);
    else if (k == "--rate") rate = std::stod(v);
    else if (k == "--duration") duration = std::stod(v);
    else if (k == "--warmup") warmup = std::stod(v);
    else if (k == "--timeout") timeout = std::stod(v);
    else if (k == "--sut") sut = std::stoi(v) != 0;
    else return false;
    return true;
  }
};

inline std::string ReadFile(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) Die("cannot read " + path);
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

inline Clock::duration Seconds(double s) {
  return std::chrono::duration_cast<Clock::duration>(std::chrono::duration<double>(s));
}

// The summary on stdout ("window_s", "sent", "status NAME COUNT") and, with a path, one
// "CODE MICROS" line per recorded request.
inline void Report(double window_s, const std::vector<Sample>& samples,
                   const std::string& latencies_path) {
  std::vector<int64_t> counts(kEmptyResponse + 1, 0);
  for (const Sample& s : samples) ++counts[s.code];
  std::printf("window_s %.6f\nsent %zu\n", window_s, samples.size());
  for (int c = 0; c <= kEmptyResponse; ++c)
    if (counts[c]) std::printf("status %s %lld\n", CodeName(c), static_cast<long long>(counts[c]));
  if (latencies_path.empty()) return;
  FILE* f = std::fopen(latencies_path.c_str(), "w");
  if (!f) Die("cannot write " + latencies_path);
  for (const Sample& s : samples)
    std::fprintf(f, "%d %lld\n", s.code, static_cast<long long>(s.micros));
  std::fclose(f);
}

// Writes SUT-mode records to stdout, whole.
inline void WriteRecords(const std::vector<SutRecord>& out) {
  const char* p = reinterpret_cast<const char*>(out.data());
  size_t left = out.size() * sizeof(SutRecord);
  while (left > 0) {
    ssize_t n = write(1, p, left);
    if (n <= 0) Die("stdout closed");
    p += n;
    left -= static_cast<size_t>(n);
  }
}

}  // namespace loadgen

#endif  // XLASERVE_BENCHMARKS_NATIVE_LOADGEN_COMMON_H_
