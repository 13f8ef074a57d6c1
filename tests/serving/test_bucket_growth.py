"""Bucket growth at load on the real server: with `auto_bucket_max_rows` the largest bucket
grows by doublings (here forced: a huge time ratio, so this machine's timings cannot stop it),
the new buckets serve like the model itself, run whole batches, and cost no compile after
warm-up; without it a CPU model keeps its exported buckets."""

import jax.numpy as jnp
import numpy as np
import pytest
import tritonclient.grpc as tc

from clientutil import assert_served_like, serving
from servingutil import export_dlrm, metric

BUCKETS = (1, 2, 4)


@pytest.fixture(scope="module")
def served(tmp_path_factory):
  repo = tmp_path_factory.mktemp("repo")
  model = export_dlrm(repo, seed=5, buckets=BUCKETS,
                      config={"auto_bucket_max_rows": 16, "auto_bucket_time_ratio": 1e6})
  export_dlrm(repo, seed=5, buckets=BUCKETS, name="plain")  # CPU default: growth off
  with serving(repo) as bg:
    yield bg, model


def rows(n: int, seed: int) -> dict[str, np.ndarray]:
  rng = np.random.default_rng(seed)
  return {"dense": rng.normal(size=(n, 13)).astype(np.float32),
          "sparse": rng.integers(-1, 5000, size=(n, 26)).astype(np.int64)}


def reference(model):
  """The Flax model run directly, outside any bundle or server."""
  return lambda dense, sparse: {"prob": np.asarray(
      model(jnp.asarray(dense), jnp.asarray(sparse))["prob"])}


def batch_sizes(client: tc.InferenceServerClient, model: str) -> set[int]:
  stats = client.get_inference_statistics(model, as_json=True)["model_stats"]
  return {int(b["batch_size"]) for ms in stats for b in ms.get("batch_stats", [])}


def test_grown_buckets_are_announced_and_serve_like_the_model(served):
  bg, model = served
  cases = [rows(n, seed=n) for n in (16, 11, 40)]  # 40 splits over the grown largest bucket
  # References first: this process's compile counter also sees the Flax model's own compiles.
  want = {case["dense"].tobytes(): reference(model)(**case) for case in cases}
  compiles = metric(bg.server.metrics.exposition().decode(), "xlaserve_compiles_after_warmup")
  with tc.InferenceServerClient(bg.address) as c:
    grown = c.get_model_config("dlrm").config.dynamic_batching.preferred_batch_size
    assert list(grown) == [1, 2, 4, 8, 16]
    plain = c.get_model_config("plain").config.dynamic_batching.preferred_batch_size
    assert list(plain) == list(BUCKETS)
    for name in ("dlrm", "plain"):
      assert assert_served_like(c, name, cases, lambda dense, sparse: want[dense.tobytes()],
                                rtol=2e-5, atol=1e-6) == 3
    assert {8, 16} <= batch_sizes(c, "dlrm")  # 11 rows pad to 16; 16 and 40 fill it
    assert max(batch_sizes(c, "plain")) == 4
  after = metric(bg.server.metrics.exposition().decode(), "xlaserve_compiles_after_warmup")
  assert after == compiles
