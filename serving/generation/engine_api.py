"""The interface GenerationService drives, and the bundle facts it needs (no JAX here).

An engine holds the KV cache and runs fixed shapes: one prefill per length bucket and one decode
over all slots. Every call takes host arrays and returns the sampled token per row.
"""

from __future__ import annotations

import abc
import dataclasses
from typing import Any, Mapping, Sequence

import numpy as np

from bundle import BundleError, Manifest
from serving.generation.request import MAX_LOGPROBS, SamplingParams
from serving.generation.scheduler import PrefillBucket, SchedulerConfig

# Per-row sampling inputs of every engine call (see serving/generation/sampling.py).
SAMPLING_FIELDS: Mapping[str, str] = {
    "temperature": "float32", "top_k": "int32", "top_p": "float32", "seed": "int32",
    "step": "int32"}


@dataclasses.dataclass(frozen=True, slots=True)
class StepLogprobs:
  """Raw log-softmax of the logits behind one engine call's tokens, row by row as its tokens."""

  chosen: np.ndarray  # [B] float32, the sampled token's
  top_ids: np.ndarray  # [B, K] int32, best first (K >= MAX_LOGPROBS or the vocabulary)
  top_logprobs: np.ndarray  # [B, K] float32

  def event_fields(self, row: int, k: int) -> dict[str, Any]:
    """GenerationEvent's logprob fields for `row`: its logprob and its `k` best alternatives."""
    return {"logprob": float(self.chosen[row]), "top_logprobs": tuple(zip(
        self.top_ids[row, :k].tolist(), self.top_logprobs[row, :k].tolist()))}


def sampling_arrays(rows: Sequence[tuple[int, SamplingParams, int, int]],
                    batch: int) -> dict[str, np.ndarray]:
  """Host inputs of `sample_tokens` for `batch` rows from (row, params, seed, step); others greedy."""
  out = {k: np.zeros(batch, dt) for k, dt in SAMPLING_FIELDS.items()}
  out["top_p"][:] = 1.0
  for row, p, seed, step in rows:
    out["temperature"][row] = p.temperature
    out["top_k"][row] = p.top_k
    out["top_p"][row] = p.top_p
    out["seed"][row] = seed
    out["step"][row] = step
  return out


@dataclasses.dataclass(frozen=True, slots=True)
class GenerateSpec:
  """What a `kind="generate"` manifest says about the cache, the shapes and the tokens."""

  page_size: int
  num_pages: int
  null_page: int
  pages_per_seq: int
  max_seq_len: int
  prefill_buckets: tuple[PrefillBucket, ...]
  decode_batch: int
  vocab_size: int
  bos_id: int
  eos_id: int
  pad_id: int
  kv_dtype: str
  tokenizer: Mapping[str, Any]
  prefill_signatures: Mapping[int, str]  # bucket length -> signature name
  decode_signature: str
  kv_cache: Mapping[str, Mapping[str, Any]]  # name -> {"shape": [...], "dtype": "..."}
  # Chunk shapes of the `extend_<C>` signatures (a prefill at an offset); () in older bundles.
  extend_buckets: tuple[PrefillBucket, ...] = ()
  extend_signatures: Mapping[int, str] = dataclasses.field(default_factory=dict)
  # Shapes of the `verify_<C>` signatures (speculative decoding: C - 1 draft tokens per row
  # over the whole decode batch); () in older bundles.
  verify_buckets: tuple[PrefillBucket, ...] = ()
  verify_signatures: Mapping[int, str] = dataclasses.field(default_factory=dict)

  @classmethod
  def from_manifest(cls, manifest: Manifest) -> GenerateSpec:
    """Reads `manifest.extra` (written by export/generative.py); BundleError if it is not there."""
    if manifest.kind != "generate":
      raise BundleError(f"model {manifest.name!r} is kind={manifest.kind!r}, not 'generate'")
    x = manifest.extra
    try:
      spec = cls(
          page_size=int(x["page_size"]), num_pages=int(x["num_pages"]),
          null_page=int(x["null_page"]), pages_per_seq=int(x["pages_per_seq"]),
          max_seq_len=int(x["max_seq_len"]),
          prefill_buckets=tuple(PrefillBucket(int(p["length"]), int(p["batch"]))
                                for p in x["prefill"]),
          decode_batch=int(x["decode"]["batch"]), vocab_size=int(x["vocab_size"]),
          bos_id=int(x["bos_id"]), eos_id=int(x["eos_id"]), pad_id=int(x["pad_id"]),
          kv_dtype=str(x["kv_dtype"]), tokenizer=dict(x["tokenizer"]),
          prefill_signatures={int(p["length"]): str(p["signature"]) for p in x["prefill"]},
          decode_signature=str(x["decode"]["signature"]), kv_cache=dict(x["kv_cache"]),
          extend_buckets=tuple(PrefillBucket(int(p["length"]), int(p["batch"]))
                               for p in x.get("extend", ())),
          extend_signatures={int(p["length"]): str(p["signature"]) for p in x.get("extend", ())},
          verify_buckets=tuple(PrefillBucket(int(p["length"]), int(p["batch"]))
                               for p in x.get("verify", ())),
          verify_signatures={int(p["length"]): str(p["signature"]) for p in x.get("verify", ())})
    except (KeyError, TypeError, ValueError) as e:
      raise BundleError(f"manifest of {manifest.name!r} lacks generate fields ({e!r});"
                        " re-export it with export/generative.py") from e
    for sig in (*spec.prefill_signatures.values(), spec.decode_signature,
                *spec.extend_signatures.values(), *spec.verify_signatures.values()):
      if sig not in manifest.signatures:
        raise BundleError(f"manifest names signature {sig!r} but does not define it")
    return spec

  def scheduler_config(self, **policy: Any) -> SchedulerConfig:
    """SchedulerConfig for these shapes; `policy` sets max_waiting, static_batching, ..."""
    return SchedulerConfig(
        decode_batch=self.decode_batch, page_size=self.page_size, num_pages=self.num_pages,
        max_seq_len=self.max_seq_len, prefill_buckets=self.prefill_buckets,
        reserved_pages=(self.null_page,), **policy)


class Engine(abc.ABC):
  """Runs the compiled prefill/decode shapes over a KV cache it owns (keyword-only calls).

  Rows whose `lengths` is 0 are idle: their page-table rows hold the null page, their tokens
  the pad id, and their sampled token is ignored.
  """

  spec: GenerateSpec

  @abc.abstractmethod
  def prefill(self, *, bucket: PrefillBucket, tokens: np.ndarray, lengths: np.ndarray,
              page_table: np.ndarray, sampling: Mapping[str, np.ndarray]) -> np.ndarray:
    """tokens [bucket.batch, bucket.length], lengths/sampling [batch], page_table
    [batch, pages_per_seq] -> the token sampled after each row's last position [batch]."""

  @abc.abstractmethod
  def decode(self, *, tokens: np.ndarray, positions: np.ndarray, lengths: np.ndarray,
             page_table: np.ndarray, sampling: Mapping[str, np.ndarray]) -> np.ndarray:
    """One token per slot ([decode_batch] arrays, lengths = positions + 1 for live rows)
    -> the next token per slot [decode_batch]."""

  def logprobs(self) -> StepLogprobs | None:
    """The log-probabilities behind the last prefill/decode call's tokens (None: not reported)."""
    return None

  def extend(self, *, bucket: PrefillBucket, tokens: np.ndarray, starts: np.ndarray,
             lengths: np.ndarray, page_table: np.ndarray,
             sampling: Mapping[str, np.ndarray]) -> np.ndarray:
    """A prefill chunk at an offset (only when `spec.extend_buckets`): tokens [bucket.batch,
    bucket.length] at positions starts.. (lengths valid per row, 0 idle), attending to the pages
    the sequence already holds -> the token sampled after each row's last chunk token [batch]."""
    raise NotImplementedError(f"{type(self).__name__} has no extend signatures")

  def verify(self, *, bucket: PrefillBucket, tokens: np.ndarray, starts: np.ndarray,
             lengths: np.ndarray, page_table: np.ndarray,
             sampling: Mapping[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Speculative step (only when `spec.verify_buckets`): each decode row feeds [last token,
    draft tokens] ([bucket.batch, bucket.length], `lengths` = 1 + drafts, 0 idle) at positions
    starts.., and the target accepts a prefix of the drafts by the rejection rule
    (serving/generation/spec_sampling.py) -> (emitted [batch, length], counts [batch]): row r
    emits emitted[r, :counts[r]], the accepted drafts and then one token of the target's.
    Logprobs of emitted[r, j] are row r * length + j of `logprobs()`."""
    raise NotImplementedError(f"{type(self).__name__} has no verify signatures")

  def reset(self) -> None:
    """Starts from a fresh cache (after a failed call may have consumed it)."""

  def close(self) -> None:
    """Releases device memory."""
