"""The tiny LM tensor-parallel on 2 and 4 virtual devices: greedy output identical to one
device and to the model's full forward, per-device weight and KV bytes, the HLO's collectives."""

from __future__ import annotations

import json
import logging
import random
import shutil

import jax
import pytest

from bundle import read_manifest
from genutil import Stream
from models.decoder import greedy_reference
from serving.generation.engine import BundleEngine
from serving.generation.placement import lm_placement
from serving.generation.request import GenerationRequest, SamplingParams
from serving.generation.service import GenerationService, ServiceConfig
from serving.generation.speculative import SpeculativeConfig
from sharding.hlo import collectives, collective_stats
from test_generation_engine import EOS, prompts


@pytest.fixture(scope="module")
def tp_engines(tiny_bundle, tiny_engine, compile_counter):
  """n -> the tiny bundle's engine over the first n devices under `tensor` (1: one device)."""
  manifest = read_manifest(tiny_bundle)
  engines = {n: BundleEngine(tiny_bundle, compile_counter=compile_counter, placement=lm_placement(
      manifest, strategy="tensor", devices=jax.devices()[:n])) for n in (2, 4)}
  yield {1: tiny_engine, **engines}
  for e in engines.values():
    e.close()


def _generate(engine, cases, **config) -> list[list[int]]:
  svc = GenerationService(engine, config=ServiceConfig(max_waiting=1000, **config)).start()
  try:
    streams = []
    for prompt, n in cases:
      s = Stream()
      svc.submit(GenerationRequest(prompt, SamplingParams(max_new_tokens=n)), s)
      streams.append(s)
    for s in streams:
      s.wait(120)
  finally:
    svc.stop()
  assert svc.stats()["kv_pages_used"] == 0
  return [s.tokens for s in streams]


def test_greedy_identical_on_1_2_and_4_devices_and_to_the_full_forward(
    tp_engines, tiny_model, compile_counter):
  rng = random.Random(3)
  cases = [(p, rng.randint(1, 40)) for p in prompts(12, seed=5)]
  cases += [(b"Acme running shoes: save 20% today. " + p, 12) for p, _ in cases[:4]]  # prefixes
  want = greedy_reference(tiny_model, [[256, *p] for p, _ in cases],
                          max_new_tokens=[n for _, n in cases], eos_id=EOS)
  before = compile_counter.outside_warmup
  for n, engine in tp_engines.items():
    assert _generate(engine, cases) == want, n  # chunked prefill + prefix caching
    assert _generate(engine, cases[:6], chunked_prefill=False) == want[:6], n  # whole prefills
    # Speculative decoding: the verify executables under the same placement.
    assert _generate(engine, cases[-6:], speculative=SpeculativeConfig("ngram", 4)) == want[-6:], n
  assert compile_counter.outside_warmup == before  # every shape compiled at load, on any mesh


def _leaf_bytes(engine, which) -> dict[int, int]:
  """Bytes each device holds of the arrays `which` picks, from their addressable shards."""
  out: dict[int, int] = {}
  for name, array in which(engine):
    for shard in array.addressable_shards:
      out[shard.device.id] = out.get(shard.device.id, 0) + shard.data.nbytes
  return out


def _params(engine, pick):
  return [(p.path, a) for p, a in zip(engine.manifest.params, engine._params) if pick(p.path)]


def test_each_device_holds_its_share_of_weights_and_kv_pages(tp_engines):
  one = tp_engines[1]
  full_kv = one.cache_bytes
  heads = lambda path: "/attn/w" in path  # noqa: E731  [embed, heads|kv_heads, head_dim] ...
  mlp = lambda path: "/mlp/" in path  # noqa: E731
  rest = lambda path: not (heads(path) or mlp(path))  # noqa: E731  embed (vocab 259), norms
  total = {name: sum(a.nbytes for _, a in _params(one, f)) for name, f in (
      ("heads", heads), ("mlp", mlp), ("rest", rest))}
  cache = lambda e: e._cache.items()  # noqa: E731
  # 2 devices: 4 query and 2 kv heads, 192 MLP columns split in half; the vocab (259) does not
  # divide, so the embedding and head are replicated; each device holds half of every page.
  two = tp_engines[2]
  for dev in (0, 1):
    assert _leaf_bytes(two, lambda e: _params(e, heads))[dev] == total["heads"] // 2
    assert _leaf_bytes(two, lambda e: _params(e, mlp))[dev] == total["mlp"] // 2
    assert _leaf_bytes(two, lambda e: _params(e, rest))[dev] == total["rest"]
    assert _leaf_bytes(two, cache)[dev] == full_kv // 2
  # 4 devices: 2 kv heads do not divide 4, so the cache and every attention projection (query
  # heads go with their kv head) are replicated (the fallback); the MLP splits in four.
  four = tp_engines[4]
  for dev in range(4):
    assert _leaf_bytes(four, lambda e: _params(e, heads))[dev] == total["heads"]
    assert _leaf_bytes(four, lambda e: _params(e, mlp))[dev] == total["mlp"] // 4
    assert _leaf_bytes(four, cache)[dev] == full_kv
  # The memory accounting (ModelStatistics, xlaserve_model_memory_bytes) says the same.
  for n, engine in tp_engines.items():
    report = engine.memory()
    assert [d.device for d in report.devices] == [d.id for d in jax.devices()[:n]]
    params = _leaf_bytes(engine, lambda e: _params(e, lambda _: True))
    kv = _leaf_bytes(engine, cache)
    for d in report.devices:
      assert (d.params, d.kv_cache) == (params[d.device], kv[d.device])
  assert tp_engines[2].memory().devices[0].params < 0.75 * one.memory().devices[0].params


def test_decode_all_reduces_per_layer_and_never_gathers_the_cache(tp_engines):
  layers = tp_engines[1].manifest.extra["model"]["num_layers"]
  for sig, exe in tp_engines[1].executables.items():
    assert collective_stats(exe.as_text()).total_count == 0, sig
  shard_bytes = tp_engines[1].cache_bytes // len(tp_engines[1].spec.kv_cache) // 2
  for sig, exe in tp_engines[2].executables.items():
    found = collectives(exe.as_text())
    stats = collective_stats(exe.as_text())
    # Megatron: one all-reduce after attention's output projection, one after the MLP's down
    # projection, per layer; nothing else is split, so nothing is gathered.
    assert stats.count.get("all-reduce", 0) == 2 * layers, (sig, stats)
    assert stats.total_count == 2 * layers, (sig, stats)
    assert max(c.nbytes for c in found) < shard_bytes, sig  # activations, never KV pages
  for sig, exe in tp_engines[4].executables.items():  # attention whole: the MLP's reduce only
    stats = collective_stats(exe.as_text())
    assert stats.count.get("all-reduce", 0) == stats.total_count == layers, (sig, stats)


def test_fallbacks_and_bundles_without_axes_are_replicated_and_said(tiny_bundle, tp_engines,
                                                                   tmp_path, caplog):
  assert tp_engines[4].placement.label == (
      "decoder: tensor over 4 devices; KV cache replicated; replicated where they do not divide"
      " 4: kv_heads (2), heads (with their kv heads), vocab (259)")
  old = tmp_path / "decoder" / "1"  # a bundle from before the manifest recorded logical axes
  shutil.copytree(tiny_bundle, old)
  m = json.loads((old / "manifest.json").read_text())
  for p in m["params"]:
    p["logical_axes"] = None
  for entry in m["extra"]["kv_cache"].values():
    del entry["logical_axes"]
  (old / "manifest.json").write_text(json.dumps(m))
  with caplog.at_level(logging.WARNING, logger="serving.generation.placement"):
    placement = lm_placement(read_manifest(old), strategy="tensor", devices=jax.devices()[:2])
  assert all(s.is_fully_replicated for s in (*placement.params, *placement.cache.values()))
  said = caplog.text
  assert "records no logical axes for its params; they are replicated on all 2 devices" in said
  assert "no logical axes for KV cache array 'k_pages'; it is replicated" in said
  with caplog.at_level(logging.WARNING, logger="serving.generation.placement"):
    single = lm_placement(read_manifest(tiny_bundle), strategy="embedding_rows",
                          devices=jax.devices()[:2])
  assert single.num_devices == 1 and "does not apply to a generate model" in caplog.text


@pytest.mark.slow  # a variant: opt in with --run-slow
def test_int8_kv_cache_splits_pages_and_scales_and_matches_one_device(tiny_int8_bundle):
  manifest = read_manifest(tiny_int8_bundle)
  engines = {n: BundleEngine(tiny_int8_bundle, placement=lm_placement(
      manifest, strategy="tensor", devices=jax.devices()[:n])) for n in (1, 2)}
  try:
    cases = [(p, 16) for p in prompts(6, seed=7)]
    assert _generate(engines[2], cases) == _generate(engines[1], cases)
    whole = {k: v.nbytes for k, v in engines[1]._cache.items()}
    assert set(whole) == {"k_pages", "v_pages", "k_scale", "v_scale"}
    for name, array in engines[2]._cache.items():
      assert [s.data.nbytes for s in array.addressable_shards] == [whole[name] // 2] * 2, name
  finally:
    for e in engines.values():
      e.close()
