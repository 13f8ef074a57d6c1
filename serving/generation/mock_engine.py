"""A generate engine whose outputs can be worked out by hand, so service tests are exact.

It keeps a real paged "cache" of token ids in numpy: prefill and decode write each row's tokens
through its page table, then read the whole sequence back through it and return
`next_token(sequence)` (default: last token + 1, mod 256). A page handed to two live sequences,
or a wrong page table, changes what is read back, so tests catch it. It records every call,
can sleep to mimic device time, and fails on demand.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from typing import Callable, Mapping, Sequence

import numpy as np

from serving.generation.engine_api import Engine, GenerateSpec
from serving.generation.scheduler import PrefillBucket


def mock_spec(*, page_size: int = 4, num_pages: int = 33, max_seq_len: int = 64,
              decode_batch: int = 4,
              prefill: Sequence[tuple[int, int]] = ((8, 4), (16, 2), (64, 1)),
              extend: Sequence[tuple[int, int]] = (),
              verify: Sequence[int] = ()) -> GenerateSpec:
  """A byte-tokenizer spec (BOS 256, EOS 257, PAD 258) with small shapes; `extend` (length,
  batch) chunk buckets give it extend signatures (chunked prefill, prefix caching), `verify`
  lengths verify signatures over the decode batch (speculative decoding)."""
  return GenerateSpec(
      page_size=page_size, num_pages=num_pages, null_page=0,
      pages_per_seq=-(-max_seq_len // page_size), max_seq_len=max_seq_len,
      prefill_buckets=tuple(PrefillBucket(t, b) for t, b in prefill), decode_batch=decode_batch,
      vocab_size=259, bos_id=256, eos_id=257, pad_id=258, kv_dtype="int32",
      tokenizer={"kind": "bytes", "num_bytes": 256, "bos_id": 256, "eos_id": 257, "pad_id": 258},
      prefill_signatures={t: f"prefill_{t}" for t, _ in prefill}, decode_signature="decode",
      kv_cache={}, extend_buckets=tuple(PrefillBucket(t, b) for t, b in extend),
      extend_signatures={t: f"extend_{t}" for t, _ in extend},
      verify_buckets=tuple(PrefillBucket(c, decode_batch) for c in verify),
      verify_signatures={c: f"verify_{c}" for c in verify})


@dataclasses.dataclass(frozen=True, slots=True)
class Call:
  kind: str  # "prefill", "decode", "extend" or "verify"
  rows: int  # live rows
  length: int  # bucket length (prefill, extend) or 1
  tokens: int = 0  # valid tokens computed (prefill, extend) or live rows (decode)


def _succ(seq: Sequence[int]) -> int:
  return (seq[-1] + 1) % 256


class MockEngine(Engine):
  """Exact, cache-faithful stand-in for BundleEngine."""

  def __init__(self, spec: GenerateSpec | None = None, *,
               next_token: Callable[[Sequence[int]], int] = _succ, delay_s: float = 0.0,
               fail: Callable[[str, Sequence[int]], bool] | None = None):
    self.spec = spec or mock_spec()
    self.next_token = next_token
    self.delay_s = delay_s
    self.fail = fail  # fail(kind, sequence) -> raise for this call
    self.calls: list[Call] = []
    self._lock = threading.Lock()
    self.reset()

  def reset(self) -> None:
    self._pages = np.full((self.spec.num_pages, self.spec.page_size), -1, np.int64)

  def _write(self, table: np.ndarray, position: int, token: int) -> None:
    ps = self.spec.page_size
    self._pages[table[position // ps], position % ps] = token

  def _read(self, table: np.ndarray, length: int) -> list[int]:
    ps = self.spec.page_size
    return [int(self._pages[table[i // ps], i % ps]) for i in range(length)]

  def _answer(self, kind: str, seqs: list[list[int] | None]) -> list[int]:
    if self.delay_s:
      time.sleep(self.delay_s)
    for seq in seqs:
      if seq is not None and self.fail is not None and self.fail(kind, seq):
        raise RuntimeError(f"injected {kind} failure")
    return [self.spec.pad_id if s is None else self.next_token(s) for s in seqs]

  def prefill(self, *, bucket: PrefillBucket, tokens: np.ndarray, lengths: np.ndarray,
              page_table: np.ndarray, sampling: Mapping[str, np.ndarray]) -> np.ndarray:
    if tokens.shape != (bucket.batch, bucket.length):
      raise ValueError(f"tokens {tokens.shape} do not match bucket {bucket}")
    seqs: list[list[int] | None] = []
    for row in range(bucket.batch):
      n = int(lengths[row])
      for pos in range(n):
        self._write(page_table[row], pos, int(tokens[row, pos]))
      seqs.append(self._read(page_table[row], n) if n else None)
    with self._lock:
      self.calls.append(Call("prefill", int(np.count_nonzero(lengths)), bucket.length,
                             int(lengths.sum())))
    return np.asarray(self._answer("prefill", seqs), np.int32)

  def decode(self, *, tokens: np.ndarray, positions: np.ndarray, lengths: np.ndarray,
             page_table: np.ndarray, sampling: Mapping[str, np.ndarray]) -> np.ndarray:
    if tokens.shape != (self.spec.decode_batch,):
      raise ValueError(f"tokens {tokens.shape} do not match decode batch {self.spec.decode_batch}")
    seqs: list[list[int] | None] = []
    for row in range(self.spec.decode_batch):
      if lengths[row]:
        self._write(page_table[row], int(positions[row]), int(tokens[row]))
        seqs.append(self._read(page_table[row], int(lengths[row])))
      else:
        seqs.append(None)
    with self._lock:
      self.calls.append(Call("decode", int(np.count_nonzero(lengths)), 1,
                             int(np.count_nonzero(lengths))))
    return np.asarray(self._answer("decode", seqs), np.int32)

  def extend(self, *, bucket: PrefillBucket, tokens: np.ndarray, starts: np.ndarray,
             lengths: np.ndarray, page_table: np.ndarray,
             sampling: Mapping[str, np.ndarray]) -> np.ndarray:
    """Writes each row's chunk at starts.., reads the whole sequence back through its pages."""
    if not self.spec.extend_buckets:
      raise NotImplementedError("this mock spec has no extend signatures")
    if tokens.shape != (bucket.batch, bucket.length):
      raise ValueError(f"tokens {tokens.shape} do not match bucket {bucket}")
    seqs: list[list[int] | None] = []
    for row in range(bucket.batch):
      n, start = int(lengths[row]), int(starts[row])
      for i in range(n):
        self._write(page_table[row], start + i, int(tokens[row, i]))
      seqs.append(self._read(page_table[row], start + n) if n else None)
    with self._lock:
      self.calls.append(Call("extend", int(np.count_nonzero(lengths)), bucket.length,
                             int(lengths.sum())))
    return np.asarray(self._answer("extend", seqs), np.int32)

  def verify(self, *, bucket: PrefillBucket, tokens: np.ndarray, starts: np.ndarray,
             lengths: np.ndarray, page_table: np.ndarray,
             sampling: Mapping[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Writes [last, drafts] at starts..; accepts drafts while they equal `next_token` of the
    sequence read back through the pages (greedy verification), then emits next_token."""
    if not self.spec.verify_buckets:
      raise NotImplementedError("this mock spec has no verify signatures")
    emitted = np.full((bucket.batch, bucket.length), self.spec.pad_id, np.int32)
    counts = np.zeros(bucket.batch, np.int32)
    seqs: list[list[int] | None] = []
    for row in range(bucket.batch):
      n, start = int(lengths[row]), int(starts[row])
      for i in range(n):
        self._write(page_table[row], start + i, int(tokens[row, i]))
      seqs.append(self._read(page_table[row], start + n) if n else None)
    self._answer("verify", seqs)  # delay and injected failures
    for row, seq in enumerate(seqs):
      if seq is None:
        continue
      fed = len(seq) - int(starts[row])  # 1 + drafts
      j = 0
      while True:
        t = self.next_token(seq[:len(seq) - fed + 1 + j])
        emitted[row, j] = t
        if j + 1 >= fed or t != seq[len(seq) - fed + 1 + j]:
          break
        j += 1
      counts[row] = j + 1
    with self._lock:
      self.calls.append(Call("verify", int(np.count_nonzero(lengths)), bucket.length,
                             int(lengths.sum())))
    return emitted, counts
