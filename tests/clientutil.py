"""A repository served in-process on 127.0.0.1 and called the way users call it: unmodified
`tritonclient.grpc`, each answer compared with a reference computed without the server.

For every test folder (`from clientutil import ...`: tests/ is on sys.path, put there by pytest's
default import mode as the folder of tests/conftest.py).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import json
import pathlib
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import numpy as np
import tritonclient.grpc as tc
from tritonclient.utils import InferenceServerException, np_to_triton_dtype

from bundle import Manifest, Signature, write_bundle
from serving.server import BackgroundServer, Server, ServerConfig


def write_engine_bundle(repo: pathlib.Path, name: str, engine: Any, *, version: int = 1,
                        seq_buckets: tuple[int, ...] | None = None,
                        config: dict | None = None) -> pathlib.Path:
  """A bundle (no params, no StableHLO) whose manifest describes `engine`'s signature, for tests
  that serve a hand-written engine through `serving(repo, factory)`; `config` -> config.json."""
  extra = {} if seq_buckets is None else {"seq_buckets": tuple(seq_buckets)}
  manifest = Manifest(name=name, version=version, kind="predict", jax_version="0.10.2",
                      signatures={"serve": Signature("serve", engine.inputs, engine.outputs, {})},
                      params=(), batch_buckets=tuple(engine.buckets), **extra)
  path = write_bundle(repo / name / str(version), manifest, [], {})
  if config is not None:
    (repo / name / "config.json").write_text(json.dumps(config))
  return path


@contextlib.contextmanager
def serving(repo: pathlib.Path, factory: Callable | None = None,
            **config: Any) -> Iterator[BackgroundServer]:
  """The real server over `repo` on 127.0.0.1 (free gRPC port, no metrics port unless given),
  stopped on exit; `factory` builds predict engines (default: the bundle engines)."""
  config.setdefault("metrics_port", -1)
  bg = BackgroundServer(Server(ServerConfig(model_repository=str(repo), grpc_port=0, **config),
                               engine_factory=factory)).start()
  try:
    yield bg
  finally:
    bg.stop()


def triton_inputs(arrays: Mapping[str, np.ndarray]) -> list[tc.InferInput]:
  """tritonclient inputs for named arrays; datatypes from tritonclient's own numpy mapping."""
  ins = []
  for name, arr in arrays.items():
    arr = np.asarray(arr)
    i = tc.InferInput(name, list(arr.shape), np_to_triton_dtype(arr.dtype))
    i.set_data_from_numpy(arr)
    ins.append(i)
  return ins


def infer(client: tc.InferenceServerClient, model: str, inputs: Mapping[str, np.ndarray],
          outputs: Sequence[str] | None = None, **kwargs: Any) -> dict[str, np.ndarray]:
  """One `client.infer` call; returns the named outputs (default: every output answered)."""
  res = client.infer(model, triton_inputs(inputs), **kwargs)
  names = outputs if outputs is not None else [o.name for o in res.get_response().outputs]
  return {k: res.as_numpy(k) for k in names}


def call_concurrently(address: str, call: Callable[..., Any], cases: Sequence[Sequence[Any]], *,
                      workers: int = 8, errors: bool = False) -> list[Any]:
  """`call(client, *case)` for every case from `workers` threads, each with its own client;
  results in case order. With `errors`, a failed call's InferenceServerException is its result."""
  def one(case: Sequence[Any]) -> Any:
    with tc.InferenceServerClient(address) as client:
      try:
        return call(client, *case)
      except InferenceServerException as e:
        if not errors:
          raise
        return e

  with concurrent.futures.ThreadPoolExecutor(workers) as pool:
    return list(pool.map(one, cases))


def assert_served_like(client: tc.InferenceServerClient, model: str,
                       cases: Iterable[Mapping[str, np.ndarray]],
                       reference: Callable[..., Mapping[str, np.ndarray]], *,
                       rtol: float = 0.0, atol: float = 0.0, **kwargs: Any) -> int:
  """The parity loop: for each case (input name -> array) the served outputs equal
  `reference(**case)` (output name -> array) in shape and, within rtol/atol, in value.
  Returns how many cases were checked (so a caller can assert none was skipped)."""
  n = 0
  for case in cases:
    want = {k: np.asarray(v) for k, v in reference(**case).items()}
    got = infer(client, model, case, list(want), **kwargs)
    for name, w in want.items():
      assert got[name].shape == w.shape, (model, name, got[name].shape, w.shape)
      np.testing.assert_allclose(got[name], w, rtol=rtol, atol=atol,
                                 err_msg=f"{model}: output {name!r}, case {n}")
    n += 1
  return n


def stream_pieces(address: str, model: str, prompts: Sequence[bytes],
                  parameters: Mapping[str, Any]) -> list[list[bytes]]:
  """Every prompt as a generation on one tritonclient gRPC stream, interleaved -> per prompt the
  `text_output` pieces its responses carried, in order (until its final response)."""
  import queue

  results: queue.Queue = queue.Queue()
  pieces: dict[str, list[bytes]] = {str(i): [] for i in range(len(prompts))}
  with tc.InferenceServerClient(address) as c:
    c.start_stream(callback=lambda result, error: results.put((result, error)))
    try:
      for i, prompt in enumerate(prompts):
        c.async_stream_infer(model, triton_inputs({"text_input": np.array([prompt], dtype=object)}),
                             request_id=str(i), parameters=dict(parameters))
      finals: set[str] = set()
      while len(finals) < len(prompts):
        result, error = results.get(timeout=60)
        assert error is None, error
        resp = result.get_response()
        out = result.as_numpy("text_output")
        if out is not None:
          pieces[resp.id].append(out[0])
        if resp.parameters["triton_final_response"].bool_param:
          finals.add(resp.id)
    finally:
      c.stop_stream()
  return [pieces[str(i)] for i in range(len(prompts))]
