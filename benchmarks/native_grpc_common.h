// What the two C++ gRPC clients share (native_loadgen.cc, a program; native_sut.cc, LoadGen's
// system under test in process): the call record, deadlines, connecting, and starting a call.

#ifndef XLASERVE_BENCHMARKS_NATIVE_GRPC_COMMON_H_
#define XLASERVE_BENCHMARKS_NATIVE_GRPC_COMMON_H_

#include <grpcpp/generic/generic_stub.h>
#include <grpcpp/grpcpp.h>

#include <chrono>
#include <cstdint>
#include <memory>
#include <mutex>
#include <string>
#include <unordered_set>
#include <vector>

#include "native_loadgen_common.h"

namespace loadgen {

constexpr char kModelInfer[] = "/inference.GRPCInferenceService/ModelInfer";

struct Call {
  grpc::ClientContext ctx;
  grpc::ByteBuffer response;
  grpc::Status status;
  std::unique_ptr<grpc::GenericClientAsyncResponseReader> reader;
  Clock::time_point t0;  // when it counts from: scheduled or actual send time
  bool recorded = false;
  uint64_t id = 0;  // LoadGen's query id (SUT modes)
};

// gRPC takes system_clock or gpr_timespec deadlines; ours are steady_clock time points.
inline gpr_timespec Deadline(Clock::time_point t) {
  int64_t ns = std::chrono::duration_cast<std::chrono::nanoseconds>(t - Clock::now()).count();
  return gpr_time_add(gpr_now(GPR_CLOCK_MONOTONIC),
                      gpr_time_from_nanos(ns > 0 ? ns : 0, GPR_TIMESPAN));
}

// One stub per channel, each its own connection, connected within 10 s; empty if one did not.
// `minimal`: gRPC's minimal client stack (no client filters a benchmark client needs).
inline std::vector<std::unique_ptr<grpc::GenericStub>> Connect(const std::string& address,
                                                               int channels, bool minimal) {
  std::vector<std::unique_ptr<grpc::GenericStub>> stubs;
  for (int i = 0; i < channels; ++i) {
    grpc::ChannelArguments args;
    args.SetMaxReceiveMessageSize(64 << 20);
    args.SetMaxSendMessageSize(64 << 20);
    args.SetInt(GRPC_ARG_USE_LOCAL_SUBCHANNEL_POOL, 1);  // one connection per channel
    args.SetInt("xlaserve.loadgen_channel", i);
    if (minimal) args.SetInt(GRPC_ARG_MINIMAL_STACK, 1);
    auto ch = grpc::CreateCustomChannel(address, grpc::InsecureChannelCredentials(), args);
    if (!ch->WaitForConnected(Deadline(Clock::now() + std::chrono::seconds(10)))) return {};
    stubs.push_back(std::make_unique<grpc::GenericStub>(ch));
  }
  return stubs;
}

// Sends `request` as `call` on `cq`, the call booked in `in_flight` (under `mu`) before Finish:
// from then on the completion thread may take and free it.
inline void StartCall(grpc::GenericStub& stub, Call* call, const grpc::ByteBuffer& request,
                      grpc::CompletionQueue* cq, std::mutex& mu,
                      std::unordered_set<Call*>& in_flight) {
  call->reader = stub.PrepareUnaryCall(&call->ctx, kModelInfer, request, cq);
  {
    std::lock_guard<std::mutex> lock(mu);
    in_flight.insert(call);
  }
  call->reader->StartCall();
  call->reader->Finish(&call->response, &call->status, call);
}

}  // namespace loadgen

#endif  // XLASERVE_BENCHMARKS_NATIVE_GRPC_COMMON_H_
