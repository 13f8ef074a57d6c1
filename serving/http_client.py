"""The admin CLIs' HTTP client: one request to a running server's HTTP port (http or https),
with its bearer token; errors come back as RuntimeError carrying the server's message."""

from __future__ import annotations

import http.client
import json
import urllib.parse
from typing import Any


def call(url: str, method: str, path: str, *, body: bytes | None = None,
         content_type: str | None = None, token: str | None = None,
         timeout_s: float = 600.0) -> bytes:
  """The response body of a 200 answer; RuntimeError('HTTP <status>: <error>') otherwise,
  ValueError for a malformed `url`, OSError when the server cannot be reached."""
  u = urllib.parse.urlsplit(url)
  if u.scheme not in ("http", "https") or not u.hostname:
    raise ValueError(f"--url {url!r} must be http://HOST:PORT or https://HOST:PORT")
  conn_type = http.client.HTTPSConnection if u.scheme == "https" else http.client.HTTPConnection
  conn = conn_type(u.hostname, u.port, timeout=timeout_s)
  headers = {"content-type": content_type} if content_type else {}
  if token:
    headers["authorization"] = f"Bearer {token}"
  try:
    conn.request(method, path, body=body, headers=headers)
    resp = conn.getresponse()
    data = resp.read()
  finally:
    conn.close()
  if resp.status != 200:
    try:
      message = json.loads(data).get("error", data.decode(errors="replace"))
    except (ValueError, AttributeError):
      message = data.decode(errors="replace")
    raise RuntimeError(f"HTTP {resp.status}: {message}")
  return data


def call_json(url: str, method: str, path: str, **kwargs: Any) -> Any:
  """`call`, with the answer parsed as JSON."""
  return json.loads(call(url, method, path, **kwargs))
