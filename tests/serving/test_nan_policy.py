"""A model that returns NaN for some rows, on the real server (mock engine: y = 2 * sum(x) + 1, so
a NaN in a request's x gives a NaN in its y), with requests batched together (a 300 ms queue
delay, no dispatch when idle). nan_policy "error": the requests whose own rows hold a NaN fail
with INTERNAL naming the output, and every other request of the same batch gets the numpy
reference. Default "pass": the NaN comes back as computed. On the native front end with the
native batch queue, and on the Python front end with the Python batcher.
"""

from __future__ import annotations

import numpy as np
import pytest
import tritonclient.grpc as tc

from clientutil import call_concurrently, serving
from servingutil import mock_factory, mock_reference, write_mock_bundle

CONFIG = {"max_queue_delay_us": 300_000, "dispatch_when_idle": False}


def _call(client: tc.InferenceServerClient, x: np.ndarray, k: np.ndarray) -> np.ndarray:
  ins = [tc.InferInput("x", list(x.shape), "FP32"), tc.InferInput("k", list(k.shape), "INT32")]
  ins[0].set_data_from_numpy(x)
  ins[1].set_data_from_numpy(k)
  return client.infer("mock", ins, client_timeout=30).as_numpy("y")


def _cases(seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
  """Six requests of 1-3 rows; the 2nd and 5th hold a NaN in one row."""
  rng = np.random.default_rng(seed)
  cases = []
  for i in range(6):
    rows = int(rng.integers(1, 4))
    x = rng.integers(-5, 6, size=(rows, 4)).astype(np.float32)
    if i in (1, 4):
      x[rows - 1, 2] = np.nan
    cases.append((x, rng.integers(0, 4, size=(rows, 1)).astype(np.int32)))
  return cases


@pytest.mark.parametrize("frontend,batch_queue", [("auto", "native"), ("python", "python")])
@pytest.mark.parametrize("policy", ["error", "pass"])
def test_nan_rows(tmp_path, policy, frontend, batch_queue):
  config = {**CONFIG, **({"nan_policy": policy} if policy != "pass" else {})}
  write_mock_bundle(tmp_path, "mock", config=config)
  cases = _cases(seed=len(policy))
  with serving(tmp_path, mock_factory(), frontend=frontend, batch_queue=batch_queue) as bg:
    answers = call_concurrently(bg.address, _call, cases, workers=len(cases), errors=True)
    with tc.InferenceServerClient(bg.address) as c:
      stats = c.get_inference_statistics("mock", as_json=True)["model_stats"][0]
  if policy == "pass":  # the six requests shared batches (so "error" re-ran shared batches)
    assert int(stats["execution_count"]) < len(cases), stats
  for i, ((x, k), got) in enumerate(zip(cases, answers)):
    want = mock_reference(x, k)["y"]
    if policy == "error" and i in (1, 4):
      assert isinstance(got, Exception), (i, got)
      assert got.status() == "StatusCode.INTERNAL", (i, got)
      assert "model mock" in got.message() and "produced NaN in output y" in got.message()
    else:
      assert not isinstance(got, Exception), (i, got)
      np.testing.assert_array_equal(got, want)  # NaN where numpy has NaN ("pass")
