"""The native (C++) HTTP front end answers as the Python (uvicorn) one: binary inference natively,
the rest relayed (Python's statuses and messages); keep-alive, pipelining, 100-continue, chunked
and oversized bodies, bearer tokens, tritonclient.http clients, slow and vanishing clients."""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import gzip
import http.client
import io
import json
import socket
import struct
import time
import zlib

import numpy as np
import pytest
import tritonclient.http as th

from bundle import BY_TRITON, numpy_dtype, triton_datatype
from serving.engines.mock import MockEngine
from serving.frontend import native as native_frontend
from servingutil import FUZZ_SERVER, expected, mock_rows, serving, wait_until, \
    write_engine_bundle, write_mock_bundle
from httputil import raw_request, read_reply
from test_http import http_inputs
from test_native_parity import DTYPES, DtypeEngine

NATIVE, WHY = native_frontend.load_extension()
pytestmark = pytest.mark.skipif(NATIVE is None, reason=WHY)

LIMIT = 1 << 16  # the servers' max_message_bytes
READ_TIMEOUT_S = 1.0
TOKEN = "n4tive-Http_token"
KINDS = {"python": {"frontend": "python", "http_frontend": "python"},
         "native": {"http_frontend": "native"}}
HEADERS = ("content-type", "content-encoding", "www-authenticate")  # compared as sent
IHCL = "Inference-Header-Content-Length"
INFER = "/v2/models/mock/infer"


def _factory(path, manifest, cfg):
  return DtypeEngine(manifest.batch_buckets) if manifest.name == "dtypes" else MockEngine(
      buckets=manifest.batch_buckets, delay_s=0.3 if manifest.name == "slow" else 0)


@contextlib.contextmanager
def _pair(root, **config):
  """{kind: server}: dtypes, mock and slow (0.3 s a batch) behind each HTTP front end."""
  repo = root / "repo"
  write_engine_bundle(repo, "dtypes", DtypeEngine())
  for name in ("mock", "slow"):
    write_mock_bundle(repo, name)
  with contextlib.ExitStack() as stack:
    out = {kind: stack.enter_context(serving(repo, _factory, http_port=0, **kw, **config))
           for kind, kw in KINDS.items()}
    assert {k: bg.server.http_frontend for k, bg in out.items()} == {k: k for k in KINDS}
    yield out


@pytest.fixture(scope="module")
def both(tmp_path_factory):
  with _pair(tmp_path_factory.mktemp("native_http"), max_message_bytes=LIMIT,
             **FUZZ_SERVER) as servers:
    yield servers


def _paths(bg, since: tuple[int, int] = (0, 0)) -> tuple[int, int]:
  """HTTP requests (answered by the C++ path, relayed to Python) since the counts `since`."""
  stats = bg.server.native.stats()
  return stats["http_fast"] - since[0], stats["http_relayed"] - since[1]


def _tensor(name: str, arr: np.ndarray, binary: bool = True) -> tuple[dict, bytes]:
  """An input's entry in the JSON header and its binary data (none for JSON `data`)."""
  raw = np.ascontiguousarray(arr).tobytes() if binary else b""
  return {"name": name, "datatype": triton_datatype(arr.dtype), "shape": list(arr.shape),
          **({"parameters": {"binary_data_size": len(raw)}} if binary else
             {"data": arr.reshape(-1).tolist()})}, raw


def _body(tensors, *, outputs=None, params=None, rid=None, length=True) -> tuple[bytes, dict]:
  """Triton's binary extension: (the JSON header then the inputs' bytes, request headers)."""
  head = {k: v for k, v in (("inputs", [e for e, _ in tensors]), ("id", rid),
                            ("outputs", outputs), ("parameters", params)) if v is not None}
  header = json.dumps(head).encode()
  return header + b"".join(raw for _, raw in tensors), {IHCL: str(len(header))} if length else {}


def _mock_body(x, k, binary: bool = True, **kw) -> tuple[bytes, dict]:
  if not binary:  # all JSON: no binary data, no header length, JSON outputs
    return _body([_tensor("x", x, False), _tensor("k", k, False)], length=False, **kw)
  return _body([_tensor("x", x), _tensor("k", k)], params={"binary_data_output": True}, **kw)


def _normal(status: int, headers: dict[str, str], body: bytes) -> tuple:
  """What must match between front ends: status, HEADERS, whether the answer uses the binary
  extension, its JSON (header) parsed and the binary bytes after it."""
  if headers.get("content-encoding") in ("gzip", "deflate"):
    body = zlib.decompress(body, 47)  # 32 + 15: a gzip or zlib stream
  cut = len(body) if (n := headers.get(IHCL.lower())) is None else int(n)
  head = body[:cut]
  with contextlib.suppress(ValueError):
    head = json.loads(head) if head else None
  return status, {k: headers.get(k) for k in HEADERS}, n is not None, head, body[cut:]


def _call(conn, method: str, path: str, body: bytes | None = None, headers=None) -> tuple:
  """One request on `conn` (a port: on a fresh connection), its answer `_normal`ised."""
  if isinstance(conn, int):
    with contextlib.closing(http.client.HTTPConnection("127.0.0.1", conn, timeout=30)) as c:
      return _call(c, method, path, body, headers)
  conn.request(method, path, body=body, headers=headers or {})
  resp = conn.getresponse()
  return _normal(resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read())


def _exchange(port: int, wire: bytes, replies: int = 1) -> list[tuple]:
  """Sends `wire` at once on a fresh connection; the first `replies` answers, `_normal`ised."""
  with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
    s.sendall(wire)
    fp = s.makefile("rb")
    return [_normal(*read_reply(fp)) for _ in range(replies)]


def _same(both, *request, via=_call):
  """`via(port, *request)` on each server; asserts the answers match; returns the native one."""
  got, want = (via(both[k].server.http_port, *request) for k in ("native", "python"))
  assert got == want, request[:2]
  return got


def _decoded(head: dict, binary: bytes) -> dict[str, np.ndarray]:
  """Output name -> array, from the answer's JSON header and the binary data after it."""
  out, offset = {}, 0
  for o in head["outputs"]:
    dt = numpy_dtype(BY_TRITON[o["datatype"]].numpy)
    n = 0 if "data" in o else o["parameters"]["binary_data_size"]
    arr = np.asarray(o["data"], dt) if "data" in o else np.frombuffer(binary[offset:][:n], dt)
    out[o["name"]], offset = arr.reshape(o["shape"]), offset + n
  assert offset == len(binary)
  return out


def _assert_mock(answer: tuple, x, k) -> None:
  assert answer[0] == 200, answer[3]
  got = _decoded(*answer[3:])
  for name, want in zip("yz", expected(x, k)):
    np.testing.assert_array_equal(got[name], want)


BINARY = {"binary_data": True}
VARIANTS = (  # (requested outputs, request parameters): every output comes back binary
    (None, {"binary_data_output": True}), ([{"name": "out_int8"}], {"binary_data_output": True}),
    ([{"name": f"out_{d}", "parameters": BINARY} for d in DTYPES], None),
    ([{"name": n, "parameters": BINARY} for n in ("out_bfloat16", "out_bool")], None))


def test_binary_infer_of_every_dtype_is_served_natively_like_python(both):
  rng, nat = np.random.default_rng(0), both["native"]
  before = _paths(nat)
  for rows in (1, 3, 8, 21):  # 21 rows: split across batches of the largest bucket (8)
    xs = {d: rng.random((rows, 3)) > 0.5 if d == "bool" else
          (rng.random((rows, 3)) * 100).astype(numpy_dtype(d)) for d in DTYPES}
    tensors = [_tensor(f"in_{d}", xs[d]) for d in DTYPES]
    for i, (outputs, params) in enumerate(VARIANTS):
      rid = f"r{rows}-{i}" if i % 2 else None
      path = "/v2/models/dtypes" + ("/versions/1" if rows % 2 else "") + "/infer"
      status, fields, binary_ext, head, binary = _same(
          both, "POST", path, *_body(tensors, outputs=outputs, params=params, rid=rid))
      assert status == 200 and binary_ext, head
      assert fields["content-type"] == "application/octet-stream"
      assert (head["model_name"], head["model_version"], head.get("id")) == ("dtypes", "1", rid)
      got = _decoded(head, binary)
      assert list(got) == [o["name"] for o in outputs or [{"name": f"out_{d}"} for d in DTYPES]]
      for name, arr in got.items():
        x = xs[name[4:]]
        np.testing.assert_array_equal(arr, ~x if x.dtype == bool else x + 1)
  assert _paths(nat, before) == (4 * len(VARIANTS), 0)  # the C++ path served every one


def _relay_cases() -> dict[str, tuple]:
  """name -> (method, path, body, headers): requests the fast path hands to Python."""
  x, k = mock_rows(np.random.default_rng(3), 2)
  good = [_tensor("x", x), _tensor("k", k)]
  body, headers = _mock_body(x, k)

  def post(tensors=good, path=INFER, **kw):
    return ("POST", path, *_body(tensors, **{"params": {"binary_data_output": True}, **kw}))

  def asks(**params):
    return post(params={"binary_data_output": True, **params})

  short = ({**good[0][0], "parameters": {"binary_data_size": 28}}, good[0][1][:28])
  return {
      "unknown model": post(path="/v2/models/nope/infer"),
      "unknown version": post(path="/v2/models/mock/versions/7/infer"),
      "version not a number": post(path="/v2/models/mock/versions/x/infer"),
      "wrong datatype": post([_tensor("x", x.astype(np.float16)), good[1]]),
      "int64 for int32": post([good[0], _tensor("k", k.astype(np.int64))]),
      "wrong shape": post([_tensor("x", np.zeros((2, 5), np.float32)), good[1]]),
      "missing input": post(good[:1]), "binary_data_size short": post([short, good[1]]),
      "binary data past the body": ("POST", INFER, body[:-2], headers),
      "binary data left over": ("POST", INFER, body + bytes(4), headers),
      "header length past the body": ("POST", INFER, body, {IHCL: str(len(body) + 1)}),
      "header length not a number": ("POST", INFER, body, {IHCL: "abc"}),
      "header not JSON": ("POST", INFER, b"{inputs: [" + body, {IHCL: "10"}),
      "all JSON, no header length": ("POST", INFER, *_mock_body(x, k, binary=False)),
      "JSON data beside binary": post([good[0], _tensor("k", k, False)]),
      "JSON outputs by default": post(params=None),
      "binary_data false": post(outputs=[{"name": "y", "parameters": {"binary_data": False}}]),
      "unknown output": post(outputs=[{"name": "nope"}]),
      "gzip body": ("POST", INFER, gzip.compress(body), {**headers, "Content-Encoding": "gzip"}),
      "gzip answer": ("POST", INFER, body, {**headers, "Accept-Encoding": "gzip"}),
      "unknown parameter": asks(sequence_id=3), "timeout": asks(timeout=10_000_000),
      "negative timeout": asks(timeout=-1), "timeout not a number": asks(timeout="soon"),
      "priority": asks(priority=2), "negative priority": asks(priority=-1),
      "server metadata": ("GET", "/v2"), "server live": ("GET", "/v2/health/live"),
      "server ready": ("GET", "/v2/health/ready"), "model ready": ("GET", "/v2/models/mock/ready"),
      "model": ("GET", "/v2/models/mock/versions/1"), "config": ("GET", "/v2/models/dtypes/config"),
      "no metadata": ("GET", "/v2/models/nope"), "repository": ("POST", "/v2/repository/index"),
      "unknown path": ("GET", "/v2/nothing/here"), "GET infer": ("GET", INFER),
      "infer with a tail": ("POST", INFER + "/more", body, headers),
      "PUT infer": ("PUT", INFER, body, headers),
  }


def test_what_the_fast_path_does_not_serve_is_relayed_with_python_answers(both):
  nat, cases = both["native"], _relay_cases()
  ans, paths = {}, {}
  for name, case in cases.items():
    before = _paths(nat)
    ans[name] = _same(both, *case)
    paths[name] = {(0, 1): "relayed", (1, 0): "fast"}.get(_paths(nat, before), "?")
  assert paths == dict.fromkeys(cases, "relayed")
  assert (ans["unknown model"][0], ans["gzip answer"][1]["content-encoding"]) == (404, "gzip")
  _assert_mock(ans["gzip body"], *mock_rows(np.random.default_rng(3), 2))
  for path in ("/v2/models/stats", "/v2/models/mock/stats"):  # counts and times differ
    got, want = ((a[:3], [(m["name"], sorted(m)) for m in a[3]["model_stats"]]) for a in (
        _call(both[k].server.http_port, "GET", path) for k in ("native", "python")))
    assert got == want and got[0][0] == 200 and got[1], path
  # A body over the limit, refused from its Content-Length before it is sent.
  wire = raw_request("POST", INFER, b"", {"Content-Length": str(LIMIT + 1), IHCL: "10"})
  status, _, _, head, _ = _same(both, wire, via=_exchange)[0]
  assert status == 413 and "exceeds the limit" in head["error"]


def test_keep_alive_and_pipelined_requests_mix_fast_and_relayed_in_order(both):
  nat, rng = both["native"], np.random.default_rng(4)
  conns = {k: http.client.HTTPConnection("127.0.0.1", bg.server.http_port, timeout=30)
           for k, bg in both.items()}
  before, sock = _paths(nat), None
  with contextlib.closing(conns["native"]), contextlib.closing(conns["python"]):
    for i in range(50):
      x, k = mock_rows(rng, i % 7 + 1)
      request = (("POST", INFER, *_mock_body(x, k)), ("POST", INFER, *_mock_body(x, k, False)),
                 ("GET", "/v2/models/mock"), ("POST", "/v2/models/nope/infer", *_mock_body(x, k)),
                 ("POST", "/v2/models/mock/versions/1/infer", *_mock_body(x, k, rid=str(i)))
                 )[i % 5]
      got = _call(conns["native"], *request)
      assert got == _call(conns["python"], *request), (i, got)
      sock = sock or conns["native"].sock
      assert conns["native"].sock is sock  # the same connection throughout
      if i % 5 in (0, 1, 4):
        _assert_mock(got, x, k)
  assert _paths(nat, before) == (20, 30)
  rows = [mock_rows(rng, n) for n in (3, 5)]
  wire = (raw_request("POST", INFER, *_mock_body(*rows[0]))
          + raw_request("GET", "/v2/models/mock/ready")
          + raw_request("POST", INFER, *_mock_body(*rows[1])))
  first, ready, last = _same(both, wire, 3, via=_exchange)  # all sent before any answer
  _assert_mock(first, *rows[0])
  _assert_mock(last, *rows[1])
  assert ready[0] == 200


def _in_pieces(port: int, body: bytes, headers: dict, how: str) -> tuple[int | None, tuple]:
  """(interim status, answer) of an infer whose body follows `Expect: 100-continue`'s interim
  response (how="continue", else None) or goes in three chunks (how="chunked")."""
  extra = ({"Expect": "100-continue"} if how == "continue" else
           {"Content-Length": None, "Transfer-Encoding": "chunked"})
  with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
    fp, interim = s.makefile("rb"), None
    s.sendall(raw_request("POST", INFER, b"", {"Content-Length": str(len(body)), **headers, **extra}))
    if how == "continue":
      interim = read_reply(fp)[0]
      s.sendall(body)
    else:
      for piece in (body[:7], body[7:40], body[40:], b""):
        s.sendall(b"%x\r\n%s\r\n" % (len(piece), piece))
    return interim, _normal(*read_reply(fp))


@pytest.mark.parametrize("how", ["continue", "chunked"])
def test_bodies_sent_after_100_continue_or_chunked_are_answered_like_python(both, how):
  x, k = mock_rows(np.random.default_rng(6), 4)
  for binary in (True, False):  # served natively, relayed
    interim, answer = _same(both, *_mock_body(x, k, binary), how, via=_in_pieces)
    assert interim == (100 if how == "continue" else None)
    _assert_mock(answer, x, k)


def test_bearer_token_refusals_match_and_the_token_holder_is_served_natively(tmp_path):
  x, k = mock_rows(np.random.default_rng(7), 3)
  body, headers = _mock_body(x, k)
  refused = [("POST", INFER, body, {**headers, **auth}) for auth in (
      {}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {TOKEN}"})]
  refused.append(("GET", "/v2/models/mock"))
  with _pair(tmp_path, auth_token=TOKEN) as pair:
    nat, before = pair["native"], _paths(pair["native"])
    denied = nat.server.native.stats()["http_denied"]
    for case in refused:
      status, fields, *_ = _same(pair, *case)
      assert status == 401 and fields["www-authenticate"] == "Bearer", case
    assert _same(pair, "GET", "/v2/health/ready")[0] == 200  # open without the token
    # The inference calls are refused in C++ (a wrong-token flood costs no Python); the model
    # metadata GET and the health check are relayed, as every non-inference request is.
    assert nat.server.native.stats()["http_denied"] - denied == len(refused) - 1
    assert _paths(nat, before) == (0, 2)
    before = _paths(nat)
    allowed = {**headers, "Authorization": f"Bearer {TOKEN}"}
    _assert_mock(_same(pair, "POST", INFER, body, allowed), x, k)
    assert _paths(nat, before) == (1, 0)


def test_a_header_nested_two_million_deep_is_refused_and_the_server_serves_on(tmp_path):
  """The JSON header is parsed without recursion: a recursive parser overflows its stack."""
  x, k = mock_rows(np.random.default_rng(8), 2)
  with _pair(tmp_path) as pair:
    assert _same(pair, "POST", INFER, b"[" * 2_000_000, {IHCL: "2000000"})[0] == 400
    _assert_mock(_same(pair, "POST", INFER, *_mock_body(x, k)), x, k)


def test_tritonclient_http_concurrent_clients_get_their_own_rows(both):
  nat, calls, before = both["native"], 6, _paths(both["native"])

  def client(seed: int) -> None:
    rng = np.random.default_rng(100 + seed)
    with th.InferenceServerClient(f"127.0.0.1:{nat.server.http_port}") as c:
      for i in range(calls):
        binary, (x, k) = i % 2 == 0, mock_rows(rng, int(rng.integers(1, 12)))
        outputs = [th.InferRequestedOutput(n, binary_data=binary) for n in ("y", "z")]
        res = c.infer("mock", http_inputs({"x": x, "k": k}, binary), outputs=outputs,
                      request_id=f"{seed}-{i}")
        assert res.get_response()["id"] == f"{seed}-{i}"
        for name, want in zip("yz", expected(x, k)):
          np.testing.assert_array_equal(res.as_numpy(name), want)

  with cf.ThreadPoolExecutor(16) as pool:
    list(pool.map(client, range(16)))
  assert _paths(nat, before) == (16 * calls // 2, 16 * calls // 2)  # binary ones natively


def test_slow_clients_get_408_while_others_are_served(tmp_path):
  with _pair(tmp_path, http_read_timeout_s=READ_TIMEOUT_S) as pair, \
      contextlib.ExitStack() as stack:
    port = {kind: bg.server.http_port for kind, bg in pair.items()}
    slow = [stack.enter_context(socket.create_connection(("127.0.0.1", port[kind]), timeout=10))
            for kind in ("native", "python") for _ in range(4)]
    for i, s in enumerate(slow):  # heads never finished, and (the 4th of each) a body
      s.sendall(raw_request("POST", INFER, b"{", {"Content-Length": "100000"}) if i % 4 == 3 else
                b"POST /v2/models/mock/infer HTTP/1.1\r\nhost: x\r\nx-slow: ")
    rng, t0, calls = np.random.default_rng(8), time.monotonic(), 0
    while time.monotonic() - t0 < 2.5 * READ_TIMEOUT_S:
      for s in slow:  # one more byte on each every 0.1 s or so: never idle
        with contextlib.suppress(OSError):  # closed by the server: what the test expects
          s.sendall(b"x")
      x, k = mock_rows(rng, 2)
      _assert_mock(_call(port["native"], "POST", INFER, *_mock_body(x, k)), x, k)
      calls += 1
      time.sleep(0.1)
    # Everything each one was sent until the server closed it.
    answers = [_normal(*read_reply(io.BufferedReader(io.BytesIO(b"".join(
        iter(lambda s=s: s.recv(4096), b"")))))) for s in slow]
  assert calls >= 5 and answers[:4] == answers[4:]  # native, python
  assert all(a[0] == 408 and b"not received in time" in a[3] for a in answers), answers


def test_clients_that_vanish_leave_nothing_in_flight(both):
  nat, rng, port = both["native"], np.random.default_rng(9), both["native"].server.http_port
  x1, k1 = mock_rows(rng, 1)
  body, headers = _mock_body(x1, k1)
  for model in ("slow", "mock"):  # slow: gone well before the answer (0.3 s a batch)
    wire = raw_request("POST", f"/v2/models/{model}/infer", body, headers)
    cut = [wire[:len(wire) - len(body) // 2], wire[:-1]]  # gone mid-body, or once all is sent
    for i, data in enumerate(cut + [wire] * 6):
      with socket.create_connection(("127.0.0.1", port)) as s:
        if i % 2:  # half of them go with a TCP RST
          s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        s.sendall(data)
  for model in ("mock", "slow", "mock"):  # the others are answered meanwhile and after
    x, k = mock_rows(rng, 3)
    _assert_mock(_call(port, "POST", f"/v2/models/{model}/infer", *_mock_body(x, k)), x, k)
  assert wait_until(lambda: nat.server.native.inflight() == 0, timeout=10)
  _assert_mock(_same(both, "POST", "/v2/models/slow/infer", body, headers), x1, k1)
