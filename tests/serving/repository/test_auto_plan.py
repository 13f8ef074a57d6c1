"""`bucket_plan: auto` decisions without JAX: thresholds, no flapping, the config it reads, the
batch_buckets override checked against a bundle's artifacts, and the request-size tally."""

from __future__ import annotations

import pytest

from bundle import BundleError, Manifest, Signature, TensorSpec
from serving.repository.auto_plan import (BucketPlanConfig, SizeTallies, batch_cost, check_buckets,
                                          decide)
from serving.repository.bucket_override import fixed_batches, serving_manifest
from serving.repository.config import ModelServingConfig
from serving.runners import Observer

AUTO = BucketPlanConfig(mode="auto", min_requests=100, min_gain=0.1, cost="rows")
MIX = {3: 600, 5: 400}  # every request 3 or 5 rows: buckets 1 2 4 8 pad them to 4 and 8


def test_a_better_plan_is_adopted_with_its_figures_worked_by_hand():
  d = decide(MIX, (1, 2, 4, 8), {}, AUTO)
  # Today: 3 -> 4, 5 -> 8: (600*4 + 400*8) / 1000 = 5.6 padded rows per request on 3.8 real.
  assert d.current.padded == pytest.approx(5.6) and d.current.real == pytest.approx(3.8)
  assert d.proposed == (3, 5, 8) and d.best.padded == pytest.approx(3.8)
  assert d.gain == pytest.approx(1 - 3.8 / 5.6) and d.requests == 1000
  assert d.best.waste == 0.0 and d.current.waste == pytest.approx(5.6 / 3.8 - 1)


def test_too_few_requests_and_a_small_gain_keep_the_buckets():
  few = decide({3: 60, 5: 39}, (1, 2, 4, 8), {}, AUTO)
  assert few.proposed is None and few.current is None and "min_requests 100" in few.reason
  # Buckets 1 2 4 16 pad the rare 9s to 16: 4.12 padded rows a request; the best plan, 4 9 16,
  # 4.05: a 1.7% saving, not worth a reload.
  rare = {4: 990, 9: 10}
  small = decide(rare, (1, 2, 4, 16), {}, AUTO)
  assert small.best.buckets == (4, 9, 16) and small.gain == pytest.approx(1 - 4.05 / 4.12)
  assert small.proposed is None and "under min_gain" in small.reason
  assert decide(rare, (1, 2, 4, 16), {}, BucketPlanConfig(
      mode="auto", min_requests=1, min_gain=0.0, cost="rows")).proposed is not None


def test_the_adopted_plan_is_not_adopted_again():
  first = decide(MIX, (1, 2, 4, 8), {}, AUTO)
  again = decide(MIX, first.proposed, {}, AUTO)
  assert again.proposed is None and again.gain == 0.0 and "already the best" in again.reason


def test_the_plan_keeps_the_largest_bucket_and_caps_larger_requests():
  d = decide({3: 800, 20: 200}, (1, 2, 4, 8), {}, AUTO)  # 20 rows run as 8-row slices
  assert d.proposed[-1] == 8 and d.proposed == (3, 8)
  assert decide(MIX, (1, 2, 4, 8), {}, BucketPlanConfig(
      mode="auto", min_requests=1, cost="rows", max_buckets=2)).proposed == (3, 8)


def test_measured_seconds_price_the_plan_and_noise_cannot_make_bigger_batches_cheaper():
  seconds = {1: 1e-3, 2: 1.5e-3, 4: 2.5e-3, 8: 4.5e-3}
  cost = batch_cost(seconds, "measured")
  assert cost(3) == pytest.approx(2e-3) and cost(16) == pytest.approx(9e-3)
  noisy = batch_cost({1: 1e-3, 2: 3e-3, 4: 2e-3, 8: 4e-3}, "measured")
  assert noisy(4) == pytest.approx(3e-3) and noisy(3) == pytest.approx(3e-3)
  assert batch_cost(seconds, "rows")(5) == 5.0 and batch_cost({}, "measured")(5) == 5.0
  d = decide(MIX, (1, 2, 4, 8), seconds, BucketPlanConfig(mode="auto", min_requests=1))
  # today 0.6*2.5 + 0.4*4.5 = 3.3 ms; plan 3 5 8: 0.6*2.0 + 0.4*3.0 = 2.4 ms
  assert d.proposed == (3, 5, 8) and d.gain == pytest.approx(1 - 2.4 / 3.3)
  flat = {1: 1e-3, 2: 1e-3, 4: 1e-3, 8: 1e-3}  # batch time flat: no plan pays for its compiles
  assert decide(MIX, (1, 2, 4, 8), flat, BucketPlanConfig(mode="auto", min_requests=1)
                ).proposed is None


@pytest.mark.parametrize("value,error", [
    ("sometimes", "mode 'sometimes'"), (3, "must be \"fixed\""),
    ({"interval_s": 0}, "interval_s must be > 0"), ({"min_gain": 1.0}, "min_gain"),
    ({"min_requests": 1.5}, "min_requests must be an integer"),
    ({"max_buckets": 0}, "max_buckets must be >= 1"), ({"cost": "gpu"}, "cost 'gpu'"),
    ({"every": 3}, "unknown keys ['every']")])
def test_bad_bucket_plan_settings_are_refused(value, error):
  with pytest.raises(ValueError, match=".*" + error.replace("[", r"\[").replace("]", r"\]")):
    ModelServingConfig.from_json({"bucket_plan": value})


def test_config_json_bucket_plan_and_batch_buckets():
  cfg = ModelServingConfig.from_json({"bucket_plan": "auto", "batch_buckets": [1, 3, 5, 8]})
  assert cfg.bucket_plan == BucketPlanConfig(mode="auto") and cfg.batch_buckets == (1, 3, 5, 8)
  obj = ModelServingConfig.from_json({"bucket_plan": {"interval_s": 60, "max_buckets": 3}})
  assert obj.bucket_plan.auto and obj.bucket_plan.interval_s == 60
  assert obj.bucket_plan.max_buckets == 3 and obj.bucket_plan.min_requests == 1000
  assert not ModelServingConfig().bucket_plan.auto and ModelServingConfig().batch_buckets is None
  for bad in ([4, 2], [0, 2], [2, 2], [], "1,2", [1.5], [True]):
    with pytest.raises(ValueError, match="batch_buckets"):
      ModelServingConfig.from_json({"batch_buckets": bad})
  assert check_buckets([1, 2, 64]) == (1, 2, 64)
  with pytest.raises(ValueError, match="unknown keys \\['adopted_buckets'\\]"):
    ModelServingConfig.from_json({"adopted_buckets": [1, 2]})  # only an adopted plan sets it


def _manifest(artifacts: dict[str, str], *, seq: bool = False) -> Manifest:
  dims = ("batch", "seq") if seq else ("batch", None)
  x = TensorSpec("x", "float32", (-1, -1) if seq else (-1, 4), dims=dims)
  y = TensorSpec("y", "float32", (-1, 1), dims=("batch", None))
  return Manifest(name="m", version=1, kind="predict", jax_version="0.10.2",
                  signatures={"serve": Signature("serve", (x,), (y,), artifacts)}, params=(),
                  batch_buckets=(1, 2, 4, 8), seq_buckets=(16,) if seq else ())


def test_override_checked_against_the_bundle_artifacts():
  symbolic, fixed = _manifest({"cpu": "a"}), _manifest({f"cpu@b{b}": "a" for b in (1, 2, 4, 8)})
  assert fixed_batches(symbolic, "cpu") is None
  assert fixed_batches(fixed, "cpu") == {1, 2, 4, 8}
  assert fixed_batches(fixed, "tpu") is None  # no artifact there at all: the engine says so
  cfg = ModelServingConfig(batch_buckets=(3, 5, 8))
  assert serving_manifest(symbolic, cfg, "cpu").batch_buckets == (3, 5, 8)
  assert serving_manifest(symbolic, ModelServingConfig(), "cpu") is symbolic
  with pytest.raises(BundleError, match=r"include \[3, 5\].*run batches \[1, 2, 4, 8\] only"):
    serving_manifest(fixed, cfg, "cpu")
  assert serving_manifest(fixed, ModelServingConfig(batch_buckets=(2, 8)), "cpu"
                          ).batch_buckets == (2, 8)
  auto = ModelServingConfig(bucket_plan=BucketPlanConfig(mode="auto"))
  with pytest.raises(BundleError, match="bucket_plan auto needs artifacts that run any batch"):
    serving_manifest(fixed, auto, "cpu")
  assert serving_manifest(symbolic, auto, "cpu") is symbolic
  adopted = ModelServingConfig(batch_buckets=(2, 8), adopted_buckets=(3, 8),
                               bucket_plan=BucketPlanConfig(mode="auto"))
  assert serving_manifest(symbolic, adopted, "cpu").batch_buckets == (3, 8)
  with pytest.raises(BundleError, match="plans the batch buckets of row models"):
    serving_manifest(_manifest({"cpu@s16": "a"}, seq=True), auto, "cpu")


def test_tallies_count_through_the_observer_and_pass_every_hook_on():
  seen = []

  class Inner(Observer):
    def request_sizes(self, rows):
      seen.append(("sizes", list(rows)))

    def shed(self, n=1):
      seen.append(("shed", n))

    tracing = True  # a flag, not a hook: it must pass through too (runners read it)

  tallies = SizeTallies()
  obs = tallies.observing(lambda name, version: Inner())("m", 1)
  assert obs.tracing is True and isinstance(obs, Observer)
  obs.request_sizes([3, 5, 3])
  obs.shed(2)
  tallies.observing(lambda name, version: Inner())("m", 1).request_sizes([8])
  assert seen == [("sizes", [3, 5, 3]), ("shed", 2), ("sizes", [8])]
  tally = tallies.of("m", 1)
  assert tally.take() == {3: 2, 5: 1, 8: 1} and tally.take() == {}
  tally.give_back({3: 2})
  assert tally.take() == {3: 2} and tallies.of("m", 2).take() == {}
