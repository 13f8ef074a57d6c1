"""docs/export.md runs as written: its python blocks in order, its `xlaserve serve` as a process."""

from __future__ import annotations

import pathlib
import re
import shlex
import signal

import pytest

from procutil import SERVE, Proc

DOC = pathlib.Path(__file__).resolve().parents[1] / "docs" / "export.md"
FENCE = re.compile(r"^```(\w+)\n(.*?)^```", re.S | re.M)


def blocks(path: pathlib.Path) -> list[tuple[str, str]]:
  """(language, code) of every fenced block, in order."""
  return [(m.group(1), m.group(2)) for m in FENCE.finditer(path.read_text())]


def serve_block(command: str, cwd: pathlib.Path) -> Proc:
  """`xlaserve serve ...` from a doc block, started in `cwd` on a free port (not yet waited for)."""
  args = shlex.split(command)
  assert args[:2] == ["xlaserve", "serve"], command
  return Proc([*SERVE, *args[2:], "--grpc-port", "0", "--metrics-port", "-1", "--http-port", "-1",
               "--compile-cache", "none"], cwd=cwd)


def stop(proc: Proc) -> None:
  """SIGTERM (a graceful stop), then SIGKILL if it is still running a minute later."""
  if proc.p.poll() is None:
    proc.p.send_signal(signal.SIGTERM)
    try:
      proc.wait(60)
    except AssertionError:
      proc.kill()


def test_the_doc_has_python_and_a_serve_command():
  langs = [lang for lang, _ in blocks(DOC)]
  assert langs.count("python") >= 3 and langs.count("bash") == 1


def test_export_doc_runs(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  namespace: dict = {"__name__": "export_doc"}
  servers: list[Proc] = []
  try:
    for i, (lang, code) in enumerate(blocks(DOC)):
      if lang == "python":
        exec(compile(code, f"{DOC.name}[block {i}]", "exec"), namespace)  # noqa: S102
      elif lang == "bash":
        server = serve_block(code.strip(), tmp_path)
        servers.append(server)
        address = server.wait_serving(240)
        assert "READY" in server.text and "UNAVAILABLE" not in server.text, server.text
        monkeypatch.setenv("XLASERVE_URL", address)
      else:
        pytest.fail(f"block {i}: unexpected language {lang!r}")
  finally:
    for server in servers:
      stop(server)
  assert servers and servers[0].p.returncode == 0, servers[0].text
