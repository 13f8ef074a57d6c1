"""Helpers shared by the serving tests: mock bundles, a server on 127.0.0.1, MockEngine math.

The server and tritonclient helpers every test folder uses live in tests/clientutil.py; `serving`
is re-exported here for the serving tests that import it from this module."""

from __future__ import annotations

import pathlib
import re
import time
from typing import Callable

import grpc
import numpy as np

from clientutil import serving, write_engine_bundle  # noqa: F401  (re-exported)
from serving.engines.mock import MockEngine
from serving.repository import ModelServingConfig
from serving.frontend.protocol import grpc_service_pb2 as pb


# Server settings for long fuzzing loops in the test process: no queue-wait bound, because a
# cyclic-GC pause of the test process (about 1 s once it holds over a million objects, with the
# server's threads in the same process) would shed a valid request as RESOURCE_EXHAUSTED.
# `xlaserve serve` freezes its start-up objects out of those scans; the test process cannot.
FUZZ_SERVER = {"default_model_config": ModelServingConfig(max_queue_wait_ms=0.0)}


def write_mock_bundle(repo: pathlib.Path, name: str = "mock", version: int = 1,
                      config: dict | None = None) -> pathlib.Path:
  """A bundle whose manifest describes the MockEngine's signature (no params, no StableHLO)."""
  return write_engine_bundle(repo, name, MockEngine(), version=version, config=config)


def mock_factory(engines: dict | None = None, **engine_kwargs) -> Callable:
  """An engine factory serving every bundle with a MockEngine; records them by (name, version)."""
  def factory(path, manifest, cfg):
    eng = MockEngine(buckets=manifest.batch_buckets, **engine_kwargs)
    if engines is not None:
      engines[(manifest.name, manifest.version)] = eng
    return eng
  return factory


def expected(x: np.ndarray, k: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """The MockEngine's outputs worked by hand: y = 2 * sum(x) + 1, z = x * k."""
  return 2.0 * x.sum(axis=1, keepdims=True) + 1.0, x * k


def mock_reference(x: np.ndarray, k: np.ndarray) -> dict[str, np.ndarray]:
  """`expected` by output name, the reference `clientutil.assert_served_like` takes."""
  y, z = expected(x, k)
  return {"y": y, "z": z}


def mock_rows(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
  """n random rows for the MockEngine (x: quarters in [-2, 2), exact in float32; k in [-3, 3])."""
  x = rng.integers(-8, 8, size=(n, 4)).astype(np.float32) / 4
  k = rng.integers(-3, 4, size=(n, 1)).astype(np.int32)
  return x, k


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


def wait_until(cond: Callable[[], bool], timeout: float = 30.0, step: float = 0.005) -> bool:
  """Polls `cond` until it holds or `timeout` s pass; returns its last value (callers assert)."""
  end = time.monotonic() + timeout
  while time.monotonic() < end:
    if cond():
      return True
    time.sleep(step)
  return bool(cond())


def repository_index(stub) -> dict[tuple[str, str], tuple[str, str]]:
  """RepositoryIndex as {(name, version): (state, reason)}."""
  resp = stub.RepositoryIndex(pb.RepositoryIndexRequest())
  return {(m.name, m.version): (m.state, m.reason) for m in resp.models}


def model_ready(stub, name: str, version: str = "") -> bool:
  return stub.ModelReady(pb.ModelReadyRequest(name=name, version=version)).ready


def rpc_result(fn: Callable, *args, **kwargs) -> tuple[object, tuple[grpc.StatusCode, str] | None]:
  """Calls a stub method: (response, None) when it answers, (None, (code, details)) when not."""
  try:
    return fn(*args, **kwargs), None
  except grpc.RpcError as e:
    return None, (e.code(), e.details())


# Every table's rows divide 2 and 4 devices, so a row-sharded table splits evenly.
DLRM_TABLE_SIZES_DIVISIBLE = (1024, 512, 96, 64) + (16,) * 22


def export_dlrm(repo: pathlib.Path, *, seed: int, buckets: tuple[int, ...],
                table_sizes: tuple[int, ...] | None = None, name: str = "dlrm",
                config: dict | None = None):
  """Exports the tiny DLRM (initialised from `seed`) as `name` v1 with the serving signature
  (dense FP32 [B, 13], sparse INT64 [B, 26]), and `config` as its config.json when given;
  returns the Flax model, the reference."""
  import dataclasses
  import json

  from flax import nnx

  import export
  from models.dlrm import DLRM, DLRMConfig

  cfg = DLRMConfig.tiny()
  if table_sizes is not None:
    cfg = dataclasses.replace(cfg, table_sizes=table_sizes)
  model = DLRM(cfg, rngs=nnx.Rngs(seed))
  export.export_model(model, repository=repo, name=name,
                      inputs=[export.Input("dense", "float32", ("batch", 13)),
                              export.Input("sparse", "int64", ("batch", 26))],
                      config=export.ExportConfig(batch_buckets=buckets))
  if config is not None:
    (repo / name / "config.json").write_text(json.dumps(config))
  return model


def run_padded(engine, inputs: dict[str, np.ndarray], output: str) -> np.ndarray:
  """An engine's `output` for every row of `inputs`, in chunks of its largest bucket, each
  padded (repeating its first row) to the smallest bucket that holds it."""
  top, n_rows, out = engine.buckets[-1], len(next(iter(inputs.values()))), []
  for start in range(0, n_rows, top):
    part = {k: v[start:start + top] for k, v in inputs.items()}
    n = len(next(iter(part.values())))
    b = next(b for b in engine.buckets if b >= n)
    padded = {k: np.concatenate([v, np.repeat(v[:1], b - n, 0)]) for k, v in part.items()}
    out.append(engine.fetch(engine.dispatch(bucket=b, inputs=padded))[output][:n])
  return np.concatenate(out)


def http_inputs(arrays: dict[str, np.ndarray]) -> list:
  """tritonclient.http inputs for named arrays, sent as binary data."""
  import tritonclient.http as th
  from tritonclient.utils import np_to_triton_dtype

  ins = []
  for name, arr in arrays.items():
    i = th.InferInput(name, list(arr.shape), np_to_triton_dtype(arr.dtype))
    i.set_data_from_numpy(arr, binary_data=True)
    ins.append(i)
  return ins
