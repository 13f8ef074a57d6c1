"""The row runner's side of a device hand-off (ModelRunner, the Python batcher): a request that
keeps its outputs on the device gets views of the batch outputs there, equal to the model's
answer; fed to a second model's runner, those views are assembled into its batches on the
device (counted as device hand-offs) and give the answer of the two models composed in numpy.
"""

from __future__ import annotations

import queue
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import export
from serving.batching import BatchingConfig
from serving.engines import BundleEngine
from serving.runners import ModelRunner
from serving.runners.handoff import DeviceRows, Handoff
from serving.types import InferRequest

BUCKETS = (1, 4, 8)


class Affine(nnx.Module):
  """y = x @ w + b, float32, so the reference is a numpy matmul."""

  def __init__(self, d_in: int, d_out: int, seed: int):
    rng = np.random.default_rng(seed)
    self.w = nnx.Param(jnp.asarray(rng.normal(size=(d_in, d_out)).astype(np.float32)))
    self.b = nnx.Param(jnp.asarray(rng.normal(size=(d_out,)).astype(np.float32)))

  def __call__(self, x):
    return {"y": x @ self.w[...] + self.b[...]}


class _Sink:
  def __init__(self):
    self.answers: queue.Queue = queue.Queue()

  def complete(self, completions):
    for req, out, err in completions:
      self.answers.put((req.sink_token, out, err))


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
  """(first runner, second runner, reference weights): 6 -> 4 -> 3 features."""
  repo = tmp_path_factory.mktemp("chain")
  models = {"a": Affine(6, 4, 0), "b": Affine(4, 3, 1)}
  runners = {}
  for name, model in models.items():
    d_in = model.w.shape[0]
    path = export.export_model(model, repository=repo, name=name, version=1,
                               inputs=[export.Input("x", "float32", ("batch", d_in))],
                               config=export.ExportConfig(batch_buckets=BUCKETS))
    engine = BundleEngine(path)
    engine.warmup()
    runners[name] = ModelRunner(name, engine, BatchingConfig(buckets=BUCKETS,
                                                             max_queue_delay_s=0.02))
    runners[name].start()
  weights = {k: (np.asarray(m.w[...]), np.asarray(m.b[...])) for k, m in models.items()}
  yield runners["a"], runners["b"], weights
  for r in runners.values():
    r.stop()


def _run(runner: ModelRunner, inputs: list, *, device_outputs: bool) -> list:
  sink = _Sink()
  for i, x in enumerate(inputs):
    req = InferRequest({"x": x}, len(x), sink, time.perf_counter(), sink_token=i)
    req.device_outputs = device_outputs
    runner.submit(req)
  got = [sink.answers.get(timeout=30) for _ in inputs]
  for _, _, err in got:
    assert err is None, err
  return [out["y"] for _, out, _ in sorted(got, key=lambda g: g[0])]


def test_views_on_the_device_chain_into_the_next_model_assembled_there(chain):
  first, second, w = chain
  rng = np.random.default_rng(0)
  xs = [rng.normal(size=(int(n), 6)).astype(np.float32) for n in rng.integers(1, 4, 9)]
  hidden = _run(first, xs, device_outputs=True)
  for x, h in zip(xs, hidden):
    assert isinstance(h, DeviceRows) and h.array.devices() == {jax.devices()[0]}
    np.testing.assert_allclose(np.asarray(h), x @ w["a"][0] + w["a"][1], rtol=1e-5, atol=1e-5)
  handoff = Handoff()  # the pipeline's part: tag the views and compile their copies
  for h in hidden:
    for bucket in BUCKETS:
      handoff.warm(Handoff.key(h.array.shape, np.float32, (bucket, 4), np.float32,
                               second.capabilities.device_inputs))
  outs = _run(second, [h.tagged(handoff, ("b", "x")) for h in hidden], device_outputs=False)
  for x, y in zip(xs, outs):
    assert isinstance(y, np.ndarray)
    want = (x @ w["a"][0] + w["a"][1]) @ w["b"][0] + w["b"][1]
    np.testing.assert_allclose(y, want, rtol=1e-4, atol=1e-4)
  counts = handoff.snapshot()
  assert counts.get(("b", "x", "device"), 0) >= len(hidden) and ("b", "x", "host") not in counts


def test_a_request_that_keeps_nothing_on_the_device_gets_host_arrays(chain):
  first, _, w = chain
  x = np.ones((2, 6), np.float32)
  (y,) = _run(first, [x], device_outputs=False)
  assert isinstance(y, np.ndarray)
  np.testing.assert_allclose(y, x @ w["a"][0] + w["a"][1], rtol=1e-5, atol=1e-5)
