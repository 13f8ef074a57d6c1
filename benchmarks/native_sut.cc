// MLPerf LoadGen's system under test as a CPython extension: gRPC ModelInfer sent from the
// thread that calls `send` (LoadGen's issue thread, the GIL released), answers taken by one
// completion-queue thread that hands each burst of them to a Python callable.
//
// benchmarks/slo_sut.py's NativeSut ran the same client as a child process: every query crossed
// two pipes and woke two more threads (the child's reader, this process's), ~10-15 us of the 2
// shared cores per query in an open loop. Here a query costs one gRPC send on LoadGen's thread
// and one completion. The records handed over are native_loadgen.cc's SutRecord, packed: (uint64
// id, int64 status code, int64 microseconds since `send`), so the Python side parses both alike.
//
//   module _native_sut:
//     open(address: str, request: bytes, channels: int, timeout_s: float, on_records) -> handle
//     send(handle, ids: list[int][, indices]) -> None   one ModelInfer per id, at once (with
//         functools.partial(send, handle) as LoadGen's issue callback, no Python frame runs)
//     close(handle) -> None                     waits for what is in flight, then stops
//
// `timeout_s` > 0 cancels calls in flight longer (checked once a second), so a server that
// stopped answering cannot hang LoadGen. Built by benchmarks/native_sut.py with g++.

#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <absl/synchronization/mutex.h>

#include <atomic>
#include <chrono>
#include <memory>
#include <mutex>
#include <stdexcept>
#include <string>
#include <thread>
#include <unordered_set>
#include <vector>

#include "native_grpc_common.h"

namespace {

using loadgen::Call;
using loadgen::Clock;
using loadgen::Deadline;
using loadgen::SutRecord;
constexpr char kCapsule[] = "xlaserve.native_sut";

class Client {
 public:
  Client(const std::string& address, const std::string& request, int channels, double timeout_s,
         PyObject* on_records)
      : timeout_s_(timeout_s), on_records_(on_records) {  // owns a reference Open took
    grpc::Slice slice(request);
    request_ = grpc::ByteBuffer(&slice, 1);
    stubs_ = loadgen::Connect(address, channels, /*minimal=*/true);
    if (stubs_.empty()) throw std::runtime_error("cannot connect to " + address);
    thread_ = std::thread([this] { Complete(); });
  }

  ~Client() {  // with the GIL held: close() has joined the thread
    Py_DECREF(on_records_);
  }

  void Send(const std::vector<uint64_t>& ids) {
    Clock::time_point now = Clock::now();
    for (uint64_t id : ids) {
      auto* call = new Call;
      call->t0 = now;
      call->id = id;
      loadgen::StartCall(*stubs_[next_stub_++ % stubs_.size()], call, request_, &cq_, mu_,
                         in_flight_);
    }
  }

  // Stops once nothing is in flight (cancelling what is still there after the timeout).
  void Close() {
    closing_ = true;
    thread_.join();
    cq_.Shutdown();
    void* tag;
    bool ok;
    while (cq_.Next(&tag, &ok)) {
    }
  }

 private:
  // The completion thread: every answer ready at once goes to Python in one call.
  void Complete() {
    std::vector<SutRecord> out;
    void* tag;
    bool ok;
    Clock::time_point give_up{};
    for (;;) {
      auto r = cq_.AsyncNext(&tag, &ok, Deadline(Clock::now() + std::chrono::milliseconds(20)));
      while (r == grpc::CompletionQueue::GOT_EVENT) {
        out.push_back(Record(static_cast<Call*>(tag)));
        r = cq_.AsyncNext(&tag, &ok, gpr_time_0(GPR_CLOCK_MONOTONIC));  // whatever else is ready
      }
      if (!out.empty()) Deliver(&out);
      Clock::time_point now = Clock::now();
      SweepLate(now);
      if (!closing_) continue;
      std::lock_guard<std::mutex> lock(mu_);
      if (in_flight_.empty()) break;
      if (give_up == Clock::time_point{}) {
        give_up = now + loadgen::Seconds(timeout_s_ > 0 ? timeout_s_ + 5 : 15);
      } else if (now > give_up) {
        for (Call* c : in_flight_) c->ctx.TryCancel();
      }
    }
  }

  SutRecord Record(Call* call) {
    {
      std::lock_guard<std::mutex> lock(mu_);
      in_flight_.erase(call);
    }
    int code = call->status.error_code();
    if (code == 0 && call->response.Length() == 0) code = loadgen::kEmptyResponse;
    int64_t micros =
        std::chrono::duration_cast<std::chrono::microseconds>(Clock::now() - call->t0).count();
    SutRecord rec{call->id, code, micros};
    delete call;
    return rec;
  }

  void Deliver(std::vector<SutRecord>* out) {
    PyGILState_STATE gil = PyGILState_Ensure();
    PyObject* data = PyBytes_FromStringAndSize(reinterpret_cast<const char*>(out->data()),
                                               Py_ssize_t(out->size() * sizeof(SutRecord)));
    PyObject* result = data ? PyObject_CallOneArg(on_records_, data) : nullptr;
    if (result == nullptr) PyErr_WriteUnraisable(on_records_);  // printed; the run goes on
    Py_XDECREF(result);
    Py_XDECREF(data);
    PyGILState_Release(gil);
    out->clear();
  }

  // Once a second: calls in flight longer than the timeout are cancelled (CANCELLED answers).
  void SweepLate(Clock::time_point now) {
    if (timeout_s_ <= 0 || now < next_sweep_) return;
    next_sweep_ = now + std::chrono::seconds(1);
    std::lock_guard<std::mutex> lock(mu_);
    for (Call* c : in_flight_)
      if (now - c->t0 > loadgen::Seconds(timeout_s_)) c->ctx.TryCancel();
  }

  double timeout_s_;
  PyObject* on_records_;
  grpc::ByteBuffer request_;
  std::vector<std::unique_ptr<grpc::GenericStub>> stubs_;
  grpc::CompletionQueue cq_;
  std::mutex mu_;
  std::unordered_set<Call*> in_flight_;
  std::atomic<size_t> next_stub_{0};
  std::atomic<bool> closing_{false};
  Clock::time_point next_sweep_{};
  std::thread thread_;
};

Client* FromHandle(PyObject* handle) {
  return static_cast<Client*>(PyCapsule_GetPointer(handle, kCapsule));
}

void DropHandle(PyObject* handle) {  // the capsule's destructor: a client never closed
  Client* c = static_cast<Client*>(PyCapsule_GetPointer(handle, kCapsule));
  if (c == nullptr) {
    PyErr_Clear();
    return;
  }
  Py_BEGIN_ALLOW_THREADS c->Close();
  Py_END_ALLOW_THREADS delete c;
}

PyObject* Open(PyObject*, PyObject* args) {
  const char* address;
  const char* request;
  Py_ssize_t size;
  int channels;
  double timeout_s;
  PyObject* on_records;
  if (!PyArg_ParseTuple(args, "sy#idO", &address, &request, &size, &channels, &timeout_s,
                        &on_records))
    return nullptr;
  if (channels < 1 || !PyCallable_Check(on_records)) {
    PyErr_SetString(PyExc_ValueError, "channels must be >= 1 and on_records callable");
    return nullptr;
  }
  std::string req(request, size_t(size)), addr(address), error;
  Client* client = nullptr;
  Py_INCREF(on_records);  // with the GIL; the client owns it from here
  Py_BEGIN_ALLOW_THREADS try {
    client = new Client(addr, req, channels, timeout_s, on_records);
  } catch (const std::exception& e) {
    error = e.what();
  }
  Py_END_ALLOW_THREADS if (client == nullptr) {
    Py_DECREF(on_records);
    PyErr_SetString(PyExc_ConnectionError, error.c_str());
    return nullptr;
  }
  return PyCapsule_New(client, kCapsule, DropHandle);
}

PyObject* Send(PyObject*, PyObject* args) {
  PyObject *handle, *seq, *indices = nullptr;  // indices: LoadGen's second argument, unused
  if (!PyArg_ParseTuple(args, "OO|O", &handle, &seq, &indices)) return nullptr;
  Client* c = FromHandle(handle);
  if (c == nullptr) return nullptr;
  PyObject* fast = PySequence_Fast(seq, "ids must be a sequence of ints");
  if (fast == nullptr) return nullptr;
  std::vector<uint64_t> ids(size_t(PySequence_Fast_GET_SIZE(fast)));
  for (size_t i = 0; i < ids.size(); ++i)
    ids[i] = PyLong_AsUnsignedLongLong(PySequence_Fast_GET_ITEM(fast, Py_ssize_t(i)));
  Py_DECREF(fast);
  if (PyErr_Occurred()) return nullptr;
  Py_BEGIN_ALLOW_THREADS c->Send(ids);
  Py_END_ALLOW_THREADS Py_RETURN_NONE;
}

PyObject* CloseHandle(PyObject*, PyObject* args) {
  PyObject* handle;
  if (!PyArg_ParseTuple(args, "O", &handle)) return nullptr;
  Client* c = FromHandle(handle);
  if (c == nullptr) return nullptr;
  Py_BEGIN_ALLOW_THREADS c->Close();
  Py_END_ALLOW_THREADS delete c;
  PyCapsule_SetDestructor(handle, nullptr);
  PyCapsule_SetName(handle, "xlaserve.native_sut.closed");  // a later use fails, not crashes
  Py_RETURN_NONE;
}

PyMethodDef kMethods[] = {
    {"open", Open, METH_VARARGS, "open(address, request, channels, timeout_s, on_records)"},
    {"send", Send, METH_VARARGS, "send(handle, ids[, indices]): one ModelInfer per id"},
    {"close", CloseHandle, METH_VARARGS, "close(handle): waits for what is in flight"},
    {nullptr, nullptr, 0, nullptr}};

PyModuleDef kModule = {PyModuleDef_HEAD_INIT, "_native_sut",
                       "LoadGen's gRPC system under test, in process", -1, kMethods};

}  // namespace

PyMODINIT_FUNC PyInit__native_sut() {
  // gRPC's absl mutexes: no debug lock-order graph (Debian's absl keeps it on).
  absl::SetMutexDeadlockDetectionMode(absl::OnDeadlockCycle::kIgnore);
  return PyModule_Create(&kModule);
}
