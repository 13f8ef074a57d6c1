"""Differential fuzzing of the native (C++) HTTP front end against the Python one: mutated binary
infers and mangled HTTP/1.1 bytes; and, as regression tests, what it found (now mended).
XLASERVE_FUZZ_EXAMPLES scales the example counts (default 500, as in test_fuzz.py)."""

import contextlib
import json
import os
import re
import socket
import time

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from serving.frontend import native as native_frontend
from servingutil import mock_rows, wait_until
from test_native_http import IHCL, INFER, _assert_mock, _body, _call, _mock_body, _normal, \
    _tensor, both  # noqa: F401  (both: the servers, a fixture)

NATIVE, WHY = native_frontend.load_extension()
pytestmark = [pytest.mark.skipif(NATIVE is None, reason=WHY),  # and as in test_fuzz.py:
              pytest.mark.filterwarnings("ignore:.*encountered in:RuntimeWarning")]

EXAMPLES = int(os.environ.get("XLASERVE_FUZZ_EXAMPLES", "500"))
FUZZ = settings(deadline=None, derandomize=True, database=None,
                suppress_health_check=list(HealthCheck))
STATUS_LINE = re.compile(rb"HTTP/1\.1 [1-5]\d\d [ -~]*\r\n")
JUNK = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70), st.floats(), st.text(
    max_size=6), st.sampled_from([[], {}, [[[]]], {"a": [1, {"b": None}]}, "FP32", 2**63, -1, 32]))
TENSOR = {  # mutation -> (key of an input, what it becomes)
    "shape": ("shape", st.lists(st.one_of(st.integers(-2, 6), st.sampled_from(
        [2**31, 2**40, 2**63 - 1, -(2**63), 2**64])), max_size=3)),
    "datatype": ("datatype", st.sampled_from(["INT32", "FP32", "FP64", "fp32", "", "BYTES"])),
    "size": ("parameters", st.fixed_dictionaries({"binary_data_size": st.sampled_from(
        [0, 1, 4, 8, 31, 33, -1, 2**31, 2**62, 2**64, 32.0, "32"])}))}
HEAD = {  # mutation -> (key of the JSON header, what it becomes)
    "id": ("id", st.text(max_size=12)),
    "params": ("parameters", st.dictionaries(st.sampled_from(
        ["binary_data_output", "timeout", "priority", "sequence_id", "", "\u00e9"]), JUNK)),
    "outputs": ("outputs", st.lists(st.fixed_dictionaries(
        {"name": st.sampled_from(["y", "z", "x", "nope", ""])}, optional={"parameters": (
            st.fixed_dictionaries({"binary_data": st.sampled_from([True, False, "true", 1])}))}),
        max_size=3))}
MUTATIONS = ("drop", "dup", "retype", "inputs", "ihcl", "binary", *TENSOR, *HEAD)


class _Obj(dict):
  """A JSON object that json.dumps writes with its `twice` (key, value) pairs after its own."""
  twice = ()

  def items(self):
    return [*super().items(), *self.twice]


def _dicts(v) -> list[dict]:
  """Every JSON object in `v`, outermost first."""
  if isinstance(v, dict):
    return [v] + [d for x in v.values() for d in _dicts(x)]
  return [d for x in v for d in _dicts(x)] if isinstance(v, list) else []


def _wire(method: str, target: str, headers: list, body: bytes = b"") -> bytes:
  """An HTTP/1.1 request's bytes."""
  lines = "".join(f"{k}: {v}\r\n" for k, v in headers)
  return f"{method} {target} HTTP/1.1\r\n{lines}\r\n".encode("latin-1") + body


def _mutate(draw, head: dict, mutation: str) -> None:
  """Applies one mutation to the JSON header `head`, in place."""
  where = draw(st.sampled_from(_dicts(head)))
  key = draw(st.sampled_from(sorted(where) or [None]))
  ins = head.get("inputs") if isinstance(head.get("inputs"), list) else []
  tensors = [t for t in ins if isinstance(t, dict)]
  if mutation in TENSOR and tensors:
    draw(st.sampled_from(tensors))[TENSOR[mutation][0]] = draw(TENSOR[mutation][1])
  elif mutation in HEAD:
    head[HEAD[mutation][0]] = draw(HEAD[mutation][1])
  elif mutation == "inputs" and ins:
    i = draw(st.integers(0, len(ins) - 1))
    head["inputs"] = draw(st.sampled_from([ins[::-1], ins[:i], ins + ins[i:i + 1]]))
  elif key is not None and mutation == "drop":
    del where[key]
  elif key is not None and mutation == "dup" and isinstance(where, _Obj):
    where.twice = ((key, draw(st.one_of(st.just(where[key]), JUNK))),)
  elif key is not None and mutation == "retype":
    where[key] = draw(JUNK)


@st.composite
def _mutated_infer(draw) -> tuple[bytes, dict, bool, tuple]:
  """(wire, JSON header, whether unmutated, (x, k)): a binary infer for mock, mutated."""
  x, k = mock_rows(np.random.default_rng(draw(st.integers(0, 999))), draw(st.integers(1, 5)))
  head = json.loads(json.dumps({"inputs": [
      {"name": n, "datatype": t, "shape": list(a.shape), "parameters": {
          "binary_data_size": a.nbytes}} for n, t, a in (("x", "FP32", x), ("k", "INT32", k))],
      **draw(st.sampled_from([{"parameters": {"binary_data_output": True}}, {"outputs": [
          {"name": n, "parameters": {"binary_data": True}} for n in "yz"]}]))}), object_hook=_Obj)
  binary = x.tobytes() + k.tobytes()
  mutations = draw(st.lists(st.sampled_from(MUTATIONS), max_size=3))
  for m in mutations:
    if m == "binary":
      binary = draw(st.sampled_from([binary[:draw(st.integers(0, max(len(binary) - 1, 0)))],
                                     binary + draw(st.binary(min_size=1, max_size=9))]))
    elif m != "ihcl":
      _mutate(draw, head, m)
  text = json.dumps(head, ensure_ascii=draw(st.booleans())).encode()
  body, n = text + binary, len(text)
  ihcl = [[(IHCL, v)] for v in (n - 1, n + 1, 0, len(body), len(body) + 1, -1, f" {n}", f"+{n}",
                                "abc", f"{n // 10}_{n % 10}", "", "9" * 20, f"000{n}")]
  ihcl = draw(st.sampled_from([*ihcl, [], [(IHCL, n), (IHCL, n + 1)], [(IHCL, n)] * 2])) \
      if "ihcl" in mutations else [(IHCL, n)]
  headers = [("Host", "x"), ("Content-Length", len(body)), *ihcl]
  return _wire("POST", INFER, headers, body), head, not mutations, (x, k)


def _answers(data: bytes) -> tuple[list[tuple], bytes]:
  """The final answers at the start of `data`, `_normal`ised, and the bytes after them; each must
  start with a status line and, but a 1xx, say its Content-Length."""
  out, pos = [], 0
  while (end := data.find(b"\r\n\r\n", pos)) >= 0:
    assert STATUS_LINE.match(data, pos), data[pos:pos + 200]
    status = int(data[pos + 9:pos + 12])
    headers = dict(h.split(": ", 1) for h in data[data.index(b"\r\n", pos) + 2:end].decode(
        "latin-1").lower().split("\r\n") if h)
    assert status < 200 or "content-length" in headers, headers
    if len(data) < (stop := end + 4 + int(headers.get("content-length", 0))):
      break
    out += [_normal(status, headers, data[end + 4:stop])] if status >= 200 else []
    pos = stop
  return out, data[pos:]


def _converse(port: int, wire: bytes, want: int, quiet: float, cuts=()) -> tuple:
  """`_answers` to `wire` sent on a fresh connection (in pieces 10 ms apart, cut at `cuts`) until
  the server closes, `want` are in, it is `quiet` (> 0) s silent, or 5 s pass."""
  data, end, bounds = b"", time.monotonic() + 5, [0, *sorted(cuts), len(wire)]
  with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
    with contextlib.suppress(OSError):  # the server may close before it has read everything
      for a, b in zip(bounds, bounds[1:]):
        time.sleep(0.01 if a else 0)
        s.sendall(wire[a:b])
    got = b"?"
    while got and time.monotonic() < end and len(_answers(data)[0]) < want:
      s.settimeout(quiet or max(end - time.monotonic(), 0.01))
      got = b""  # a timeout or a reset ends it too
      with contextlib.suppress(TimeoutError, ConnectionResetError):
        data += (got := s.recv(1 << 16))
  return _answers(data)


def _serves(bg) -> np.ndarray:
  """Asserts that `bg` serves a good request; the native server's requests so far by path."""
  x, k = mock_rows(np.random.default_rng(11), 3)
  _assert_mock(_call(bg.server.http_port, "POST", INFER, *_mock_body(x, k)), x, k)
  stats = bg.server.native.stats() if bg.server.native else {}
  return np.array([stats.get(f"http_{k}", 0) for k in ("fast", "relayed", "tunnels")])


def test_mutated_binary_infer_requests_get_python_answers(both):
  seen, before = {"same": 0}, _serves(both["native"])

  @settings(FUZZ, max_examples=EXAMPLES * 6 // 5)
  @given(_mutated_infer())
  def run(case):
    wire, head, unmutated, rows = case
    got, want = (_converse(both[k].server.http_port, wire, 1, 0)[0] for k in ("native", "python"))
    if unmutated:  # y and z by `expected`, binary
      _assert_mock(want[0], *rows)
      assert want[0][1]["content-type"] == "application/octet-stream" and want[0][2], want
    assert got == want and len(got) == 1, wire
    seen["same"] += 1

  run()
  fast, relayed, _ = _serves(both["native"]) - _serves(both["python"]) - before
  assert fast >= EXAMPLES // 20 and relayed >= EXAMPLES // 5, (seen, fast, relayed)


CLEAN = (("Accept", "*/*"), ("Connection", "keep-alive"), ("Connection", "close"),
         ("Connection", "keep-alive, close"), ("Expect", "100-continue"), ("Expect", "200-ok"),
         ("Accept-Encoding", "gzip"), ("Accept-Encoding", "identity"), ("X-Pct", "%zz"),
         ("Content-Encoding", "identity"), ("Content-Type", "text/plain"), ("X-L", "v" * 6000))
DIRTY = {  # mangling -> (what goes in, how: (bytes, what, a place in the head) -> bytes)
    "header": ((b"NoColon", b"X-Fold: a\r\n b", b"X-LF: a\nContent-Length: 3", b"X-Nul: a\0b",
                b"Content-Length : 0", b"X(a: 1", b": v", b"X-Big: " + b"a" * 70000, b"X: \x01\x7f",
                b"X-8bit: \xe9", b"Upgrade: h2c", b"Upgrade: websocket", b"Expect: 100-continue\0",
                b"%s: -1" % IHCL.encode(), b"%s: 1e3" % IHCL.encode(), *(b"Content-Length: " + v
                for v in (b"+1", b"-1", b"9" * 20, b"1, 1", b"0", b"7")), *(
                b"Transfer-Encoding: " + v for v in (b"chunked", b"gzip, chunked", b"identity",
                                                     b"chunked, gzip", b" chunked", b"chunked\v"))),
               lambda w, j, at: w[:(at := w.index(b"\r\n", at) + 2)] + j + b"\r\n" + w[at:]),
    "method": ((b"post", b"G\0T", b"", b"CONNECT", b"PRI", b"X" * 300, b"GET GET"),
               lambda w, j, at: j + w[w.index(b" "):]),
    "target": ((b"%zz", b"%0", b"%00", b" ", b"\0", b"\x7f", b"\xe9", b"a" * 70000, b"#", b"?"),
               lambda w, j, at: w[:(at := w.index(b" ") + 1 + at % 12)] + j + w[at:]),
    "version": ((b"HTTP/1.0", b"HTTP/2.0", b"HTTP/1.2", b"HTTP/1.", b"http/1.1", b"HTTP/11", b"",
                 b"HTTP/1.1 ", b"HTTP/1.1\0"), lambda w, j, at: w[:w.rindex(
                     b" ", 0, w.index(b"\r\n")) + 1] + j + w[w.index(b"\r\n"):]),
    "eol": ((b"\n", b"\r", b"\n\r", b"\r\r\n"),
            lambda w, j, at: w[:(at := w.index(b"\r\n", at))] + j + w[at + 2:]),
    "byte": ((b"", b"\0", b"\xff", b"\r\n", b":"), lambda w, j, at: w[:at] + j + w[at + 1:]),
    "host": ((b"",), lambda w, j, at: w.replace(b"Host: x\r\n", b"", 1)),
    "short": ((b"",), lambda w, j, at: w[:-1 - at % 40]),  # a body shorter than it says
    "long": ((b"\r\n\0junk", b"x"), lambda w, j, at: w + j)}
TARGETS = (INFER, INFER, "/v2/models/mock/versions/1/infer", "/v2/health/live", "/v2/nothing",
           "/v2/models/m%6fck/infer", "/v2/models/mock", "/v2/models/nope/infer", "/v2")
DECOR = ("", "", "?a=1&b=%20", "/", "#f", "?" + "q" * 3000)


@st.composite
def _raw_request(draw) -> tuple[bytes, bool, bool]:
  """(bytes, whether well-formed): maybe mangled."""
  method = draw(st.sampled_from(("POST", "POST", "GET", "PUT", "DELETE", "OPTIONS")))
  target = draw(st.sampled_from(("", "/"))) + draw(st.sampled_from(TARGETS)) + draw(
      st.sampled_from(DECOR))
  body, extra = _mock_body(*mock_rows(np.random.default_rng(draw(st.integers(0, 9))), 2))
  body, extra = (body, list(extra.items())) if "/infer" in target else (b"", [])
  chunked = draw(st.sampled_from((False, False, False, True)))
  headers = [("Host", "x"), *extra, *draw(st.lists(st.sampled_from(CLEAN), max_size=3)),
             ("Transfer-Encoding", "chunked") if chunked else ("Content-Length", len(body))]
  if chunked:  # in two chunks
    body = b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in (body[:9], body[9:]) if p) + b"0\r\n\r\n"
  wire, dirt = _wire(method, target, headers, body), draw(
      st.lists(st.sampled_from(sorted(DIRTY)), max_size=2))
  for d in dirt:
    with contextlib.suppress(ValueError):  # (not there any more after another mangling)
      wire = DIRTY[d][1](wire, draw(st.sampled_from(DIRTY[d][0])), draw(st.integers(
          0, max(wire.find(b"\r\n\r\n"), 0))))
  return wire, not dirt


def test_mangled_http_never_breaks_the_native_server(both):
  nat, py, seen = both["native"], both["python"], {"compared": 0}
  before = _serves(nat)

  @settings(FUZZ, max_examples=EXAMPLES * 3 // 5)
  @given(st.data())
  def run(data):
    n = data.draw(st.integers(1, 3))
    reqs = [data.draw(_raw_request()) for _ in range(n)]
    wire = b"".join(r[0] for r in reqs)
    if cut := data.draw(st.sampled_from((False, False, False, False, True))):
      wire, n = wire[:data.draw(st.integers(1, len(wire) - 1))], 0  # then the client goes
    clean, cuts = all(r[1] for r in reqs) and not cut, data.draw(
        st.lists(st.integers(1, max(len(wire) - 1, 1)), max_size=2, unique=True))
    got, left = _converse(nat.server.http_port, wire, n, 0 if clean else 0.3, cuts)
    assert left == b"", left  # nothing but whole answers
    if clean:
      assert (got, left) == _converse(py.server.http_port, wire, n, 0, cuts), wire[:2000]
      seen["compared"] += 1
    _serves(nat)

  run()
  fast, relayed, tunnels = _serves(nat) - _serves(py) - before
  assert wait_until(lambda: nat.server.native.inflight() == 0, timeout=10)
  assert seen["compared"] >= EXAMPLES // 25, seen
  assert min(fast, relayed, tunnels) >= EXAMPLES // 50, (fast, relayed, tunnels)


def _found_cases() -> dict[str, tuple[bytes, int, str]]:
  """name -> (bytes, answers to read, what native did before the mend): what fuzzing found."""
  x, k = mock_rows(np.random.default_rng(11), 3)
  (body, hl), (empty, n) = _mock_body(x, k), _body([_tensor("x", x), _tensor("k", k)], outputs=[])
  live, nope = b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\n", _wire("GET", "/v2/x", [])

  def infer(*headers, data=body, n=hl[IHCL]):
    return _wire("POST", INFER, [(IHCL, n), ("Content-Length", len(data)), *headers], data)

  return {"empty outputs list": (infer(data=empty, n=n[IHCL]), 1, "all outputs binary; Python's"
                                 " are JSON (binary_data_output is not set)"),
          **{f"repeated {h}": (infer((h, "identity"), (h, "gzip")), 1, "reads the first; Python"
                               " the last") for h in ("Accept-Encoding", "Content-Encoding")},
          **{name: (infer(h), 1, "served; Python refuses it (400)") for name, h in (
              ("NUL in a header value", ("X-A", "a\0b")), ("non-token header name", ("X(", 1)))},
          "close among Connection tokens": (live + b"Connection: keep-alive, close\r\n\r\n" + live
                                            + b"\r\n", 2, "answers both; Python closes first"),
          "body hidden by a bare LF": (live[:-2] + b"\nContent-Length: %d\r\n\r\n" % len(
              nope) + nope, 2, "relays Python's 400 without its close, then serves the body"),
          "bare-LF request": (b"GET /v2/health/live HTTP/1.1\nHost: x\n\n", 1, "no answer till the"
                              " read timeout (30 s, 408); Python refuses at once (400)")}


@pytest.mark.parametrize("name", list(_found_cases()))
def test_what_fuzzing_found_is_answered_as_python_does(both, name):
  wire, n, _ = _found_cases()[name]
  got, want = (_converse(both[k].server.http_port, wire, n, 0.5) for k in ("native", "python"))
  assert got == want
