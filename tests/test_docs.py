"""docs/export.md runs as written: its python blocks in order, its `xlaserve serve` as a process."""

from __future__ import annotations

import os
import pathlib
import re
import shlex
import signal
import subprocess
import sys
import threading

import pytest

DOC = pathlib.Path(__file__).resolve().parents[1] / "docs" / "export.md"
FENCE = re.compile(r"^```(\w+)\n(.*?)^```", re.S | re.M)


def blocks(path: pathlib.Path) -> list[tuple[str, str]]:
  """(language, code) of every fenced block, in order."""
  return [(m.group(1), m.group(2)) for m in FENCE.finditer(path.read_text())]


class ServeProcess:
  """`xlaserve serve ...` from a doc block, on a free port, until stop()."""

  def __init__(self, command: str, cwd: pathlib.Path):
    args = shlex.split(command)
    assert args[:2] == ["xlaserve", "serve"], command
    self.lines: list[str] = []
    self.proc = subprocess.Popen(
        [sys.executable, "-m", "serving.cli", *args[1:], "--grpc-port", "0", "--metrics-port",
         "-1", "--compile-cache", "none"],
        cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env=dict(os.environ, PYTHONUNBUFFERED="1"))
    self.ready = threading.Event()
    threading.Thread(target=self._pump, daemon=True).start()

  def _pump(self) -> None:
    for line in self.proc.stdout:
      self.lines.append(line)
      if "try it:" in line:
        self.ready.set()
    self.ready.set()

  def address(self, timeout: float = 240) -> str:
    assert self.ready.wait(timeout), "server did not become ready:\n" + "".join(self.lines)
    text = "".join(self.lines)
    assert "READY" in text and "UNAVAILABLE" not in text, text
    return re.search(r"gRPC on (127\.0\.0\.1:\d+)", text).group(1)

  def stop(self) -> None:
    if self.proc.poll() is None:
      self.proc.send_signal(signal.SIGTERM)
      try:
        self.proc.wait(60)
      except subprocess.TimeoutExpired:
        self.proc.kill()
        self.proc.wait(10)


def test_the_doc_has_python_and_a_serve_command():
  langs = [lang for lang, _ in blocks(DOC)]
  assert langs.count("python") >= 3 and langs.count("bash") == 1


def test_export_doc_runs(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  namespace: dict = {"__name__": "export_doc"}
  servers: list[ServeProcess] = []
  try:
    for i, (lang, code) in enumerate(blocks(DOC)):
      if lang == "python":
        exec(compile(code, f"{DOC.name}[block {i}]", "exec"), namespace)  # noqa: S102
      elif lang == "bash":
        server = ServeProcess(code.strip(), tmp_path)
        servers.append(server)
        monkeypatch.setenv("XLASERVE_URL", server.address())
      else:
        pytest.fail(f"block {i}: unexpected language {lang!r}")
  finally:
    for server in servers:
      server.stop()
  assert servers and servers[0].proc.returncode == 0, "".join(servers[0].lines)
