"""Helpers for model tests: serve a repository over real gRPC, call it, run the Flax original."""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterator, Mapping

import jax
import numpy as np
import tritonclient.grpc as tc
from flax import nnx

from serving.server import BackgroundServer, Server, ServerConfig
from sharding.rules import LOGICAL_AXES

_TRITON = {np.dtype(np.int32): "INT32", np.dtype(np.int64): "INT64",
           np.dtype(np.float32): "FP32"}


@contextlib.contextmanager
def serving(repo) -> Iterator[BackgroundServer]:
  """The real server on 127.0.0.1 (free port) over `repo`, stopped afterwards."""
  bg = BackgroundServer(Server(ServerConfig(model_repository=str(repo), grpc_port=0,
                                            metrics_port=-1))).start()
  try:
    yield bg
  finally:
    bg.stop()


def infer(client: tc.InferenceServerClient, model: str, inputs: Mapping[str, np.ndarray],
          outputs: list[str]) -> dict[str, np.ndarray]:
  """One ModelInfer call with raw tensors; returns the named outputs."""
  ins = []
  for name, arr in inputs.items():
    i = tc.InferInput(name, list(arr.shape), _TRITON[arr.dtype])
    i.set_data_from_numpy(arr)
    ins.append(i)
  res = client.infer(model, ins)
  return {k: res.as_numpy(k) for k in outputs}


def reference(model: nnx.Module, method: str = "__call__") -> Callable[..., dict[str, np.ndarray]]:
  """The Flax model itself (outside any bundle or server), jitted so each shape compiles once."""
  graphdef, state = nnx.split(model)

  @jax.jit
  def run(state: Any, kwargs: dict[str, Any]) -> Any:
    return getattr(nnx.merge(graphdef, state), method)(**kwargs)

  return lambda **kw: {k: np.asarray(v) for k, v in run(state, kw).items()}


def tokens(rng: np.random.Generator, rows: int, length: int, vocab: int,
           min_len: int = 1) -> tuple[np.ndarray, np.ndarray]:
  """Right-padded token ids [rows, length] (padding is junk, not zeros) and lengths [rows]."""
  ids = rng.integers(0, vocab, size=(rows, length)).astype(np.int32)
  lengths = rng.integers(min(min_len, length), length + 1, size=rows).astype(np.int32)
  return ids, lengths


def check_logical_axes(model: nnx.Module) -> None:
  """Every parameter names a known logical axis (or None) per dimension."""
  for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
    axes = var.get_metadata().get("logical_axes")
    assert axes is not None and len(axes) == len(var.shape), (path, axes)
    assert all(a is None or a in LOGICAL_AXES for a in axes), (path, axes)
