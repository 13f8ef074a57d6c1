"""Slow clients (slowloris) hold nothing: on the real server (gRPC and HTTP on 127.0.0.1), many
connections that dribble a request a byte at a time, on both ports, while a well-behaved client
keeps calling. The well-behaved client is answered throughout; every dribbling HTTP request,
whether stuck in its head or its body, gets 408 once `http_read_timeout_s` has passed since its
first byte (though it never went quiet), and its connection is closed. An idle keep-alive
connection is closed after `http_idle_timeout_s`, on both HTTP front ends.
"""

from __future__ import annotations

import socket
import threading
import time

import numpy as np
import pytest
import tritonclient.grpc as tg

from httputil import Http, both_protocols, raw_request, read_reply
from servingutil import mock_reference

READ_TIMEOUT_S = 1.0
DRIBBLE_S = 0.1  # a byte this often: never idle long enough for an idle timeout


def _dribbler(sockets: list[socket.socket], stop: threading.Event) -> None:
  """Sends one more byte on every socket each DRIBBLE_S until `stop` (or the server closed it)."""
  while not stop.wait(DRIBBLE_S):
    for s in sockets:
      try:
        s.sendall(b"x")
      except OSError:  # closed by the server: what the test expects
        pass


def _answer(s: socket.socket) -> bytes:
  """Everything the server sent before closing the connection (10 s at most)."""
  s.settimeout(10)
  data = b""
  while chunk := s.recv(4096):
    data += chunk
  return data


def test_dribbling_clients_time_out_and_others_are_served(tmp_path):
  with both_protocols(tmp_path, http_read_timeout_s=READ_TIMEOUT_S) as bg:
    server = bg.server
    http_port, grpc_port = server.http_port, server.grpc_port
    heads = [socket.create_connection(("127.0.0.1", http_port)) for _ in range(16)]
    for s in heads:  # a request line and a header, never finished
      s.sendall(b"POST /v2/models/mock/infer HTTP/1.1\r\nhost: x\r\nx-slow: ")
    bodies = [socket.create_connection(("127.0.0.1", http_port)) for _ in range(8)]
    for s in bodies:  # a whole head announcing 100000 body bytes, then a trickle
      s.sendall(b"POST /v2/models/mock/infer HTTP/1.1\r\nhost: x\r\n"
                b"content-type: application/json\r\ncontent-length: 100000\r\n\r\n{")
    h2 = [socket.create_connection(("127.0.0.1", grpc_port)) for _ in range(16)]
    for s in h2:  # the start of the HTTP/2 client preface, never finished
      s.sendall(b"PRI * HTTP/2.0\r\n")
    stop = threading.Event()
    dribble = threading.Thread(target=_dribbler, args=(heads + bodies + h2, stop), daemon=True)
    dribble.start()
    t0 = time.monotonic()
    try:
      http = Http(http_port)
      with tg.InferenceServerClient(f"127.0.0.1:{grpc_port}") as grpc_client:
        calls = 0
        while time.monotonic() - t0 < 3 * READ_TIMEOUT_S:  # while the dribblers are at it
          x = np.full((2, 4), calls, np.float32)
          k = np.full((2, 1), 3, np.int32)
          ins = [tg.InferInput("x", [2, 4], "FP32"), tg.InferInput("k", [2, 1], "INT32")]
          ins[0].set_data_from_numpy(x)
          ins[1].set_data_from_numpy(k)
          out = grpc_client.infer("mock", ins, client_timeout=10)
          np.testing.assert_array_equal(out.as_numpy("y"), mock_reference(x, k)["y"])
          status, _, _ = http.get("/v2/health/ready")
          assert status == 200
          calls += 1
        assert calls >= 3
      answers = [_answer(s) for s in heads + bodies]
    finally:
      stop.set()
      dribble.join(5)
      for s in heads + bodies + h2:
        s.close()
  assert all(a.startswith(b"HTTP/1.1 408 ") for a in answers), answers
  assert all(b"request not received in time" in a for a in answers), answers


@pytest.mark.parametrize("http_frontend", ["native", "python"])
def test_idle_keep_alive_connections_close_and_busy_ones_stay_open(tmp_path, http_frontend):
  """A keep-alive connection with no request for `http_idle_timeout_s` is closed (it holds a
  descriptor for nothing); one that keeps asking, each time within the timeout, stays open."""
  idle_s, ready = 0.6, raw_request("GET", "/v2/health/ready")
  with both_protocols(tmp_path, http_idle_timeout_s=idle_s, http_frontend=http_frontend) as bg:
    assert bg.server.http_frontend == http_frontend
    idle, busy = (socket.create_connection(("127.0.0.1", bg.server.http_port)) for _ in "ib")
    with idle, busy:
      for s in (idle, busy):
        s.sendall(ready)
        assert read_reply(s.makefile("rb"))[0] == 200
      busy_reader, t0 = busy.makefile("rb"), time.monotonic()
      while time.monotonic() - t0 < 3 * idle_s:  # the busy one asks every idle_s / 3
        time.sleep(idle_s / 3)
        busy.sendall(ready)
        assert read_reply(busy_reader)[0] == 200
      assert _answer(idle) == b""  # closed by the server long ago, nothing more sent
