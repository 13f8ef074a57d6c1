"""Helpers shared by the serving tests: mock bundles, a server on 127.0.0.1, MockEngine math."""

from __future__ import annotations

import contextlib
import json
import pathlib
import re
from typing import Callable, Iterator

import grpc
import numpy as np

from bundle import Manifest, Signature, write_bundle
from serving.engines.mock import MockEngine
from serving.frontend.protocol import grpc_service_pb2 as pb
from serving.server import BackgroundServer, Server, ServerConfig


def write_mock_bundle(repo: pathlib.Path, name: str = "mock", version: int = 1,
                      config: dict | None = None) -> pathlib.Path:
  """A bundle whose manifest describes the MockEngine's signature (no params, no StableHLO)."""
  eng = MockEngine()
  manifest = Manifest(name=name, version=version, kind="predict", jax_version="0.10.2",
                      signatures={"serve": Signature("serve", eng.inputs, eng.outputs, {})},
                      params=(), batch_buckets=eng.buckets)
  path = write_bundle(repo / name / str(version), manifest, [], {})
  if config is not None:
    (repo / name / "config.json").write_text(json.dumps(config))
  return path


def mock_factory(engines: dict | None = None, **engine_kwargs) -> Callable:
  """An engine factory serving every bundle with a MockEngine; records them by (name, version)."""
  def factory(path, manifest, cfg):
    eng = MockEngine(buckets=manifest.batch_buckets, **engine_kwargs)
    if engines is not None:
      engines[(manifest.name, manifest.version)] = eng
    return eng
  return factory


@contextlib.contextmanager
def serving(repo: pathlib.Path, factory: Callable | None = None,
            **config) -> Iterator[BackgroundServer]:
  """A real server on 127.0.0.1 (free port, no metrics port unless given), stopped on exit."""
  config.setdefault("metrics_port", -1)
  bg = BackgroundServer(Server(ServerConfig(model_repository=str(repo), grpc_port=0, **config),
                               engine_factory=factory)).start()
  try:
    yield bg
  finally:
    bg.stop()


def expected(x: np.ndarray, k: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """The MockEngine's outputs worked by hand: y = 2 * sum(x) + 1, z = x * k."""
  return 2.0 * x.sum(axis=1, keepdims=True) + 1.0, x * k


def mock_request(x: np.ndarray, k: np.ndarray, *, model: str = "mock", version: str = "",
                 **params) -> pb.ModelInferRequest:
  """A raw ModelInferRequest for the MockEngine's signature; params become InferParameters."""
  req = pb.ModelInferRequest(model_name=model, model_version=version)
  req.inputs.add(name="x", datatype="FP32", shape=list(x.shape))
  req.inputs.add(name="k", datatype="INT32", shape=list(k.shape))
  req.raw_input_contents.extend([np.ascontiguousarray(x, np.float32).tobytes(),
                                 np.ascontiguousarray(k, np.int32).tobytes()])
  for key, v in params.items():
    req.parameters[key].int64_param = v
  return req


def outputs(resp: pb.ModelInferResponse) -> dict[str, np.ndarray]:
  """Decodes raw_output_contents (FP32 outputs) into arrays of the reported shapes."""
  return {o.name: np.frombuffer(raw, np.float32).reshape(tuple(o.shape))
          for o, raw in zip(resp.outputs, resp.raw_output_contents)}


def metric(text: str, name: str, **labels) -> float:
  """The value of one Prometheus sample (0.0 when absent), matched on the given labels."""
  total = 0.0
  for line in text.splitlines():
    m = re.match(rf"^{re.escape(name)}(?:{{(.*)}})? (\S+)$", line)
    if not m:
      continue
    got = dict(re.findall(r'(\w+)="([^"]*)"', m.group(1) or ""))
    if all(got.get(k) == str(v) for k, v in labels.items()):
      total += float(m.group(2))
  return total


def rpc_code(fn: Callable, *args, **kwargs) -> grpc.StatusCode:
  """Calls a stub method and returns its status code (OK when it returns)."""
  try:
    fn(*args, **kwargs)
    return grpc.StatusCode.OK
  except grpc.RpcError as e:
    return e.code()
