// A lean C++ gRPC load generator for ModelInfer: one completion queue, one thread taking
// completions (plus, in open loop, one keeping the send schedule).
//
// It sends one pre-serialized ModelInferRequest (written by benchmarks/native_loadgen.py) with
// grpc::GenericStub, so it needs no generated protobuf code, over `--channels` connections:
//   closed loop: `--concurrency` requests always in flight;
//   open loop:   `--rate` requests/s issued on a fixed schedule whatever the completions, with
//                latency measured from the *scheduled* send time (coordinated omission shows);
//   SUT mode:    `--sut 1`: a system under test for MLPerf LoadGen (benchmarks/slo_sut.py). It
//                reads query ids (native uint64) from stdin, sends one request per id at once,
//                and writes a record per answer to stdout (uint64 id, int64 status code, int64
//                microseconds since the id was read), until stdin closes and nothing is in flight.
//                `--timeout` there cancels calls in flight longer (checked once a second).
// `--metadata KEY=VALUE` (repeatable) goes with every call (e.g. authorization=Bearer TOKEN).
// Only requests issued inside the measured window [warmup, warmup + duration) are recorded.
// stdout: a compact summary ("window_s", "sent", "status NAME COUNT" lines); --latencies FILE:
// one "STATUS_CODE LATENCY_US" line per recorded request. Responses are checked for status and
// a non-empty body only.
//
//   g++ -O2 -std=c++17 -pthread native_loadgen.cc $(pkg-config --cflags --libs grpc++) -o native_loadgen

#include <absl/synchronization/mutex.h>
#include <grpcpp/generic/generic_stub.h>
#include <grpcpp/grpcpp.h>

#include <atomic>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <memory>
#include <mutex>
#include <sstream>
#include <string>
#include <thread>
#include <unistd.h>
#include <unordered_set>
#include <vector>

#include "native_grpc_common.h"

namespace {

using loadgen::Call;
using loadgen::Clock;
using loadgen::Deadline;
using loadgen::Die;
using loadgen::kEmptyResponse;
using loadgen::Sample;
using loadgen::Seconds;
using loadgen::SutRecord;

struct Options : loadgen::LoadFlags {
  std::string address, request_path;
  int channels = 1;
  std::vector<std::pair<std::string, std::string>> metadata;  // --metadata KEY=VALUE, repeated
};

Options Parse(int argc, char** argv) {
  Options o;
  o.Parse(argc, argv, [&o](const std::string& k, const std::string& v) {
    if (k == "--address") o.address = v;
    else if (k == "--request") o.request_path = v;
    else if (k == "--channels") o.channels = std::stoi(v);
    else if (k == "--metadata" && v.find('=') != std::string::npos)
      o.metadata.emplace_back(v.substr(0, v.find('=')), v.substr(v.find('=') + 1));
    else return false;
    return true;
  });
  if (o.address.empty() || o.request_path.empty()) Die("--address and --request are required");
  if (o.concurrency < 1 || o.channels < 1 || o.duration <= 0) Die("bad concurrency/channels/duration");
  return o;
}

class LoadGen {
 public:
  explicit LoadGen(const Options& o) : o_(o) {
    grpc::Slice slice(loadgen::ReadFile(o.request_path));
    request_ = grpc::ByteBuffer(&slice, 1);
    stubs_ = loadgen::Connect(o.address, o.channels, /*minimal=*/false);
    if (stubs_.empty()) Die("cannot connect to " + o.address);
  }

  void Run() {
    start_ = Clock::now();
    window_begin_ = start_ + Seconds(o_.warmup);
    window_end_ = window_begin_ + Seconds(o_.duration);
    if (o_.sut) {
      SutLoop();
      return;
    }
    if (o_.rate > 0) {
      OpenLoop();
    } else {
      ClosedLoop();
    }
    Drain();
  }

  void Report() const { loadgen::Report(o_.duration, samples_, o_.latencies_path); }

 private:
  void Issue(Clock::time_point t0, uint64_t id = 0) {
    auto* call = new Call;
    call->t0 = t0;
    call->id = id;
    call->recorded = t0 >= window_begin_ && t0 < window_end_;
    // SUT mode: no gRPC deadline (SweepLate cancels late calls instead). A deadline is a timer
    // on both ends, and with tens of thousands of calls in flight (an open-loop overload)
    // gRPC's timers took most of this client's CPU and the server's, so the run measured them.
    if (o_.timeout > 0 && !o_.sut) call->ctx.set_deadline(Deadline(Clock::now() + Seconds(o_.timeout)));
    for (const auto& [key, value] : o_.metadata) call->ctx.AddMetadata(key, value);
    loadgen::StartCall(*stubs_[next_stub_++ % stubs_.size()], call, request_, &cq_, mu_,
                       in_flight_);
  }

  // Records a finished call (SUT mode: into `out`) and frees it.
  void Complete(Call* call, Clock::time_point now, std::vector<SutRecord>* out = nullptr) {
    {
      std::lock_guard<std::mutex> lock(mu_);
      in_flight_.erase(call);
    }
    int code = call->status.error_code();
    if (code == 0 && call->response.Length() == 0) code = kEmptyResponse;
    int64_t micros = std::chrono::duration_cast<std::chrono::microseconds>(now - call->t0).count();
    if (out != nullptr) {
      out->push_back({call->id, code, micros});
    } else if (call->recorded) {
      samples_.push_back({code, micros});
    }
    delete call;
  }

  // One thread reads ids from stdin and sends at once; this one writes every answer's record,
  // those that arrived together in one write.
  void SutLoop() {
    std::atomic<bool> reading{true};
    std::thread reader([&] {
      std::vector<char> buf(8 * 4096);
      size_t have = 0;
      for (;;) {
        ssize_t n = read(0, buf.data() + have, buf.size() - have);
        if (n <= 0) break;
        have += static_cast<size_t>(n);
        Clock::time_point now = Clock::now();
        size_t whole = have / 8 * 8;
        for (size_t i = 0; i < whole; i += 8) {
          uint64_t id;
          std::memcpy(&id, buf.data() + i, 8);
          Issue(now, id);
        }
        std::memmove(buf.data(), buf.data() + whole, have - whole);
        have -= whole;
      }
      reading = false;
    });
    std::vector<SutRecord> out;
    void* tag;
    bool ok;
    for (;;) {
      auto r = cq_.AsyncNext(&tag, &ok, Deadline(Clock::now() + std::chrono::milliseconds(20)));
      while (r == grpc::CompletionQueue::GOT_EVENT) {
        Complete(static_cast<Call*>(tag), Clock::now(), &out);
        r = cq_.AsyncNext(&tag, &ok, gpr_time_0(GPR_CLOCK_MONOTONIC));  // whatever else is ready
      }
      loadgen::WriteRecords(out);
      out.clear();
      SweepLate();
      if (!reading) {
        std::lock_guard<std::mutex> lock(mu_);
        if (in_flight_.empty()) break;
      }
    }
    reader.join();
  }

  // SUT mode's deadline, once a second: calls in flight longer than --timeout are cancelled
  // (answered CANCELLED), so a server that stopped answering cannot hang LoadGen.
  void SweepLate() {
    Clock::time_point now = Clock::now();
    if (o_.timeout <= 0 || now < next_sweep_) return;
    next_sweep_ = now + std::chrono::seconds(1);
    std::lock_guard<std::mutex> lock(mu_);
    for (Call* c : in_flight_)
      if (now - c->t0 > Seconds(o_.timeout)) c->ctx.TryCancel();
  }

  void ClosedLoop() {
    for (int i = 0; i < o_.concurrency; ++i) Issue(Clock::now());
    void* tag;
    bool ok;
    while (cq_.Next(&tag, &ok)) {
      Clock::time_point now = Clock::now();
      Complete(static_cast<Call*>(tag), now);
      if (now >= window_end_) break;
      Issue(now);
    }
  }

  // A sender thread keeps the schedule with sleep_until (tens of microseconds late at most);
  // this thread takes completions. Waiting for send times in AsyncNext instead made sends up
  // to ~2 ms late (its deadline is polled at millisecond granularity), and since latency counts
  // from the scheduled time, that lateness showed up as server latency.
  void OpenLoop() {
    const Clock::duration interval = Seconds(1.0 / o_.rate);
    std::atomic<bool> sending{true};
    std::thread sender([&] {
      for (Clock::time_point next = start_; next < window_end_; next += interval) {
        std::this_thread::sleep_until(next);  // returns at once when behind: catch up
        Issue(next);
      }
      sending = false;
    });
    void* tag;
    bool ok;
    while (sending) {
      if (cq_.AsyncNext(&tag, &ok, Deadline(Clock::now() + std::chrono::milliseconds(20))) ==
          grpc::CompletionQueue::GOT_EVENT)
        Complete(static_cast<Call*>(tag), Clock::now());
    }
    sender.join();
  }

  // Waits for what is still in flight; cancels it after the deadline (or 15 s without one).
  void Drain() {
    Clock::time_point give_up = Clock::now() + Seconds(o_.timeout > 0 ? o_.timeout + 5 : 15);
    bool cancelled = false;
    void* tag;
    bool ok;
    while (!in_flight_.empty()) {
      Clock::time_point wait = cancelled ? Clock::now() + std::chrono::seconds(5) : give_up;
      auto r = cq_.AsyncNext(&tag, &ok, Deadline(wait));
      if (r == grpc::CompletionQueue::GOT_EVENT) {
        Complete(static_cast<Call*>(tag), Clock::now());
      } else if (!cancelled) {
        for (Call* c : in_flight_) c->ctx.TryCancel();
        cancelled = true;
      } else {
        Die("calls did not finish after cancellation");
      }
    }
    cq_.Shutdown();
    while (cq_.Next(&tag, &ok)) {
    }
  }

  Options o_;
  grpc::ByteBuffer request_;
  std::vector<std::unique_ptr<grpc::GenericStub>> stubs_;
  grpc::CompletionQueue cq_;
  std::mutex mu_;  // in_flight_ is shared with the open loop's sender thread
  std::unordered_set<Call*> in_flight_;
  std::vector<Sample> samples_;
  size_t next_stub_ = 0;
  Clock::time_point start_, window_begin_, window_end_, next_sweep_;
};

}  // namespace

int main(int argc, char** argv) {
  // gRPC's absl mutexes: no debug lock-order graph (Debian's absl keeps it on; the server turns
  // it off too): up to a tenth of this client's CPU, taken from the server it shares cores with.
  absl::SetMutexDeadlockDetectionMode(absl::OnDeadlockCycle::kIgnore);
  Options o = Parse(argc, argv);
  LoadGen gen(o);
  gen.Run();
  if (!o.sut) gen.Report();
  return 0;
}
