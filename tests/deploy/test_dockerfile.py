"""The Dockerfile and docs/deploy.md against the server they describe: ports, entry point,
health check and user as `xlaserve serve` and the manifests expect; every file the doc names
exists and every server command line it shows parses. (test_image.py builds and runs the image.)
"""

from __future__ import annotations

import re
import shlex

import yaml

from deployutil import ROOT, dockerfile, dockerfile_uid
from serving import cli


def test_dockerfile_runs_the_server_as_the_manifests_expect():
  text = dockerfile()
  defaults = cli.build_parser().parse_args(["serve"])
  expose = re.search(r"^EXPOSE (.+)$", text, re.M).group(1).split()
  assert sorted(map(int, expose)) == sorted([defaults.http_port, defaults.grpc_port,
                                              defaults.metrics_port])
  entry = yaml.safe_load(re.search(r"^ENTRYPOINT (.+)$", text, re.M).group(1))
  assert entry[:2] == ["xlaserve", "serve"] and entry[entry.index("--host") + 1] == "0.0.0.0"
  cli.build_parser().parse_args(entry[1:])  # the entry point's own flags are real
  health = re.search(r"^HEALTHCHECK .*$", text, re.M).group(0)
  assert f"http://127.0.0.1:{defaults.http_port}/v2/health/ready" in health
  assert dockerfile_uid() != 0
  assert re.search(r"^ARG BASE_IMAGE=debian:bookworm-slim$", text, re.M)
  assert "XLASERVE_REQUIRE_NATIVE=1" in text  # a failed native build fails the image
  assert re.search(r"cpu\) extras= ;; +cuda\) extras=cuda ;;", text)  # VARIANT -> the extra


def test_dockerignore_keeps_host_builds_and_stray_files_out():
  ignored = (ROOT / ".dockerignore").read_text().split()
  assert "*" in ignored and "**/*.so" in ignored
  copied = set(re.findall(r"^COPY (\w+) /src/\1$", dockerfile(), re.M))
  assert {f"!{name}/" for name in copied} <= set(ignored)


def test_deploy_doc_names_real_files_and_flags():
  """docs/deploy.md: every repository path it names exists; every `xlaserve serve` line and
  InferenceService `args` it shows parses with the real CLI."""
  doc = (ROOT / "docs/deploy.md").read_text()
  for path in set(re.findall(r"\b(?:deploy|tools|tests|docs)/[\w./-]*\w", doc)):
    assert (ROOT / path).exists(), path
  lines = re.findall(r"^xlaserve serve (.*)$", doc, re.M)
  lines += [" ".join(yaml.safe_load(a)) for a in re.findall(r"^\s*args: (\[.*\])$", doc, re.M)]
  assert len(lines) >= 2
  for line in lines:
    argv = [a for a in shlex.split(line.replace("<your arguments>", "")) if a]
    cli.build_parser().parse_args(["serve", *argv])
