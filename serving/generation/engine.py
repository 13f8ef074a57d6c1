"""Serves a `kind="generate"` bundle: exported prefill/decode + sampling, one executable per shape.

Loading deserializes the StableHLO (the model's code is never imported), restores the params,
allocates the KV cache named in the manifest (float, or int8 with scales) and compiles every
shape it will run: `len(prefill buckets) + 1` executables, each the exported step followed by
`sample_tokens`, with the cache donated so it is updated in place (plus one per chunk bucket of
the `extend_<C>` and `verify_<C>` signatures, where the bundle has them; verify is followed by
the rejection sampler of spec_sampling.py instead). A compile error fails the
load; after it, a call never compiles (a wrong shape raises instead). Under a tensor-parallel
placement (serving/generation/placement.py) every executable is compiled with explicit in/out
shardings over the mesh: params and the cache split by heads, the rest replicated, the cache
donated and kept in its sharding from step to step.
"""

from __future__ import annotations

import contextlib
import logging
import os
import pathlib
import time
from typing import Any, Callable, Mapping

import jax
import numpy as np

import bundle as bundle_lib
from bundle import BundleError
from serving.telemetry.compile_watch import CompileCounter
from serving.generation.engine_api import (MAX_LOGPROBS, SAMPLING_FIELDS, Engine, GenerateSpec,
                                           StepLogprobs, sampling_arrays)
from serving.engines.memory import DeviceMemory, MemoryReport, array_bytes, compiled_bytes
from serving.generation.placement import LMPlacement, single_placement
from serving.generation.sampling import sample_tokens, token_logprobs
from serving.generation.spec_sampling import verify_tokens
from serving.generation.scheduler import PrefillBucket

logger = logging.getLogger(__name__)


def _greedy(batch: int) -> dict[str, np.ndarray]:
  return sampling_arrays((), batch)


def _verify_head(logits: Any, inputs: Mapping[str, Any], sampling: Mapping[str, Any]) -> Any:
  """Rejection sampling over the draft tokens, and the logprobs of every emitted token."""
  emitted, counts = verify_tokens(logits, inputs["tokens"], inputs["lengths"], **sampling)
  b, c, v = logits.shape
  return (emitted, counts), token_logprobs(logits.reshape(b * c, v), emitted.reshape(-1),
                                           MAX_LOGPROBS)


def _dtype(name: str) -> Any:
  return jax.numpy.bfloat16 if name == "bfloat16" else np.dtype(name)


class BundleEngine(Engine):
  """A loaded generate bundle on one device or a mesh (`placement`); not thread-safe (one
  service loop drives it)."""

  def __init__(
      self,
      directory: str | os.PathLike[str],
      *,
      platform: str | None = None,
      compile_counter: CompileCounter | None = None,
      progress: Callable[[str], None] | None = None,
      placement: LMPlacement | None = None,
  ):
    self.directory = pathlib.Path(directory)
    self.manifest = bundle_lib.read_manifest(directory)
    self.spec = GenerateSpec.from_manifest(self.manifest)
    self.platform = platform or jax.default_backend()
    self._exported = {name: self._deserialize(name) for name in (
        *self.spec.prefill_signatures.values(), self.spec.decode_signature,
        *self.spec.extend_signatures.values(), *self.spec.verify_signatures.values())}
    self.placement = placement or single_placement(self.manifest, jax.devices(self.platform)[0])
    if progress and placement is not None:
      progress(f"placement: {self.placement.label}")
    self._params = bundle_lib.restore_params(directory, self.manifest,
                                             list(self.placement.params))
    self._cache_structs = {
        k: jax.ShapeDtypeStruct(tuple(v["shape"]), _dtype(v["dtype"]),
                                sharding=self.placement.cache[k])
        for k, v in self.spec.kv_cache.items()}
    self._cache: dict[str, jax.Array] = {}
    self._logprobs: tuple[jax.Array, ...] | None = None  # of the last call, still on the device
    self.reset()
    self.load_seconds = 0.0
    start = time.perf_counter()
    warming = compile_counter.warming() if compile_counter else contextlib.nullcontext()
    with warming:
      self._prefill = {b.length: self._compile(self.spec.prefill_signatures[b.length], b.batch,
                                               progress) for b in self.spec.prefill_buckets}
      self._decode = self._compile(self.spec.decode_signature, self.spec.decode_batch, progress)
      self._extend = {b.length: self._compile(self.spec.extend_signatures[b.length], b.batch,
                                              progress) for b in self.spec.extend_buckets}
      self._verify = {b.length: self._compile(self.spec.verify_signatures[b.length], b.batch,
                                              progress, head=_verify_head)
                      for b in self.spec.verify_buckets}
      self._warm_run()
    self.load_seconds = time.perf_counter() - start
    logger.info("loaded %s v%d on %s (%s): %d executables in %.1fs", self.manifest.name,
                self.manifest.version, self.platform, self.placement.label,
                len(self._prefill) + len(self._extend) + len(self._verify) + 1,
                self.load_seconds)

  def _deserialize(self, signature: str) -> jax.export.Exported:
    sig = self.manifest.signatures[signature]
    fname = sig.artifacts.get(self.platform)
    if fname is None:
      raise BundleError(f"signature {signature!r} has no {self.platform!r} artifact (it has"
                        f" {sorted(sig.artifacts)}); export the model for {self.platform}")
    try:
      return jax.export.deserialize(bytearray((self.directory / fname).read_bytes()))
    except Exception as e:  # a damaged flatbuffer raises anything from OSError to IndexError
      raise BundleError(f"cannot read {fname} of signature {signature!r}:"
                        f" {type(e).__name__}: {e}; re-export the model") from e

  def _compile(self, signature: str, batch: int, progress: Callable[[str], None] | None, *,
               head: Callable[..., Any] | None = None) -> Any:
    """Wraps the exported `signature` with sampling (or `head`) and compiles it for this device."""
    sig = self.manifest.signatures[signature]
    exported = self._exported[signature]
    names = tuple(self._cache_structs)

    def step(params, inputs, cache, sampling):
      out = exported.call(params, {**inputs, **cache})
      if head is not None:
        return head(out["logits"], inputs, sampling), {k: out[k] for k in names}
      tokens = sample_tokens(out["logits"], **sampling)
      logprobs = token_logprobs(out["logits"], tokens, MAX_LOGPROBS)
      return (tokens, logprobs), {k: out[k] for k in names}

    inputs = {t.name: jax.ShapeDtypeStruct(t.shape, _dtype(t.dtype)) for t in sig.inputs
              if t.name not in self._cache_structs}
    sampling = {k: jax.ShapeDtypeStruct((batch,), np.dtype(v)) for k, v in SAMPLING_FIELDS.items()}
    params = [jax.ShapeDtypeStruct(p.shape, p.dtype, sharding=p.sharding) for p in self._params]
    if progress:
      progress(f"compiling {signature}")
    rep, cache = self.placement.replicated, dict(self.placement.cache)
    try:
      return jax.jit(step, donate_argnums=2, in_shardings=(list(self.placement.params), rep,
                                                            cache, rep),
                     out_shardings=((rep, rep), cache)).lower(
          params, inputs, self._cache_structs, sampling).compile()
    except Exception as e:  # XLA raises many types; the load must fail loudly either way
      raise BundleError(f"compiling {signature!r} of {self.manifest.name!r} failed:"
                        f" {type(e).__name__}: {e}") from e

  def _warm_run(self) -> None:
    """Runs every executable once with idle rows (they write only the null page)."""
    sp = self.spec
    for b in sp.prefill_buckets:
      idle = np.zeros(b.batch, np.int32)
      self.prefill(bucket=b, tokens=np.full((b.batch, b.length), sp.pad_id, np.int32),
                   lengths=idle, page_table=np.full((b.batch, sp.pages_per_seq), sp.null_page,
                                                    np.int32), sampling=_greedy(b.batch))
    idle = np.zeros(sp.decode_batch, np.int32)
    self.decode(tokens=idle + sp.pad_id, positions=idle, lengths=idle,
                page_table=np.full((sp.decode_batch, sp.pages_per_seq), sp.null_page, np.int32),
                sampling=_greedy(sp.decode_batch))
    calls = [(self.extend, b) for b in sp.extend_buckets] + [(self.verify, b)
                                                             for b in sp.verify_buckets]
    for call, b in calls:
      idle = np.zeros(b.batch, np.int32)
      call(bucket=b, tokens=np.full((b.batch, b.length), sp.pad_id, np.int32), starts=idle,
           lengths=idle, page_table=np.full((b.batch, sp.pages_per_seq), sp.null_page, np.int32),
           sampling=_greedy(b.batch))

  def _run(self, executable: Any, inputs: Mapping[str, np.ndarray],
           sampling: Mapping[str, np.ndarray]) -> np.ndarray:
    (tokens, self._logprobs), self._cache = executable(self._params, dict(inputs), self._cache,
                                                       dict(sampling))
    return np.asarray(tokens)

  def logprobs(self) -> StepLogprobs | None:
    """Copied to the host only when asked (a request wants logprobs)."""
    if self._logprobs is None:
      return None
    chosen, ids, values = (np.asarray(x) for x in self._logprobs)
    return StepLogprobs(chosen, ids, values)

  def prefill(self, *, bucket: PrefillBucket, tokens: np.ndarray, lengths: np.ndarray,
              page_table: np.ndarray, sampling: Mapping[str, np.ndarray]) -> np.ndarray:
    return self._run(self._prefill[bucket.length],
                     {"tokens": tokens, "lengths": lengths, "page_table": page_table}, sampling)

  def decode(self, *, tokens: np.ndarray, positions: np.ndarray, lengths: np.ndarray,
             page_table: np.ndarray, sampling: Mapping[str, np.ndarray]) -> np.ndarray:
    return self._run(self._decode, {"tokens": tokens, "positions": positions,
                                    "lengths": lengths, "page_table": page_table}, sampling)

  def extend(self, *, bucket: PrefillBucket, tokens: np.ndarray, starts: np.ndarray,
             lengths: np.ndarray, page_table: np.ndarray,
             sampling: Mapping[str, np.ndarray]) -> np.ndarray:
    return self._run(self._extend[bucket.length], {
        "tokens": tokens, "starts": starts, "lengths": lengths, "page_table": page_table},
                     sampling)

  def verify(self, *, bucket: PrefillBucket, tokens: np.ndarray, starts: np.ndarray,
             lengths: np.ndarray, page_table: np.ndarray,
             sampling: Mapping[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    ((emitted, counts), self._logprobs), self._cache = self._verify[bucket.length](
        self._params, {"tokens": tokens, "starts": starts, "lengths": lengths,
                       "page_table": page_table}, self._cache, dict(sampling))
    return np.asarray(emitted), np.asarray(counts)

  def reset(self) -> None:
    """Zeroed cache arrays, put on the device from the host (no compile)."""
    self._cache = {k: jax.device_put(np.zeros(s.shape, s.dtype), s.sharding)
                   for k, s in self._cache_structs.items()}

  @property
  def cache_bytes(self) -> int:
    """Bytes of the whole KV cache (all devices' shards together)."""
    return sum(int(np.prod(s.shape)) * np.dtype(s.dtype).itemsize
               for s in self._cache_structs.values())

  @property
  def executables(self) -> dict[str, Any]:
    """Signature name -> its compiled executable (HLO inspection, memory analysis)."""
    sp = self.spec
    return {**{sp.prefill_signatures[t]: x for t, x in self._prefill.items()},
            sp.decode_signature: self._decode,
            **{sp.extend_signatures[c]: x for c, x in self._extend.items()},
            **{sp.verify_signatures[c]: x for c, x in self._verify.items()}}

  def memory(self) -> MemoryReport:
    """Per device: its shards of the params and of the KV cache, the executables' code and
    the largest scratch of one call (read from the placed arrays, not from the plan)."""
    params, cache = array_bytes(self._params), array_bytes(self._cache.values())
    code, temp = compiled_bytes(self.executables.values())
    return MemoryReport(tuple(DeviceMemory(
        device=int(d.id), platform=str(d.platform), params=params.get(d, 0), executable=code,
        scratch=temp, kv_cache=cache.get(d, 0)) for d in self.placement.devices))

  def close(self) -> None:
    for x in (*self._cache.values(), *self._params):
      x.delete()
    self._cache, self._params, self._logprobs = {}, [], None

