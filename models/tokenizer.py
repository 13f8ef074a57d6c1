"""Byte-level tokenizer: token i < 256 is byte i, then BOS, EOS and PAD; nothing to download.

The bundle records `spec()` so a server can rebuild the same mapping without this module.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Iterable, Mapping

NUM_BYTES = 256


@dataclasses.dataclass(frozen=True, slots=True)
class ByteTokenizer:
  """UTF-8 bytes are the tokens; three specials follow them."""

  bos_id: int = NUM_BYTES
  eos_id: int = NUM_BYTES + 1
  pad_id: int = NUM_BYTES + 2

  def __post_init__(self):
    ids = (self.bos_id, self.eos_id, self.pad_id)
    if len(set(ids)) != 3 or min(ids) < NUM_BYTES:
      raise ValueError(f"special ids {ids} must be distinct and >= {NUM_BYTES}")

  @property
  def vocab_size(self) -> int:
    return max(self.bos_id, self.eos_id, self.pad_id) + 1

  def encode(self, text: str | bytes, *, bos: bool = True, eos: bool = False) -> list[int]:
    """str (as UTF-8) or bytes -> ids, optionally framed by BOS/EOS."""
    data = text.encode("utf-8") if isinstance(text, str) else bytes(text)
    return ([self.bos_id] if bos else []) + list(data) + ([self.eos_id] if eos else [])

  def decode_bytes(self, ids: Iterable[int]) -> bytes:
    """ids -> bytes, dropping specials."""
    return bytes(i for i in ids if 0 <= i < NUM_BYTES)

  def decode(self, ids: Iterable[int]) -> str:
    """ids -> text; invalid UTF-8 (a cut multi-byte character) becomes U+FFFD."""
    return self.decode_bytes(ids).decode("utf-8", errors="replace")

  def spec(self) -> dict[str, Any]:
    """What a bundle manifest records about this tokenizer."""
    return {"kind": "bytes", "num_bytes": NUM_BYTES, "bos_id": self.bos_id,
            "eos_id": self.eos_id, "pad_id": self.pad_id, "vocab_size": self.vocab_size}

  @classmethod
  def from_spec(cls, spec: Mapping[str, Any]) -> ByteTokenizer:
    if spec.get("kind") != "bytes":
      raise ValueError(f"not a byte tokenizer spec: {dict(spec)}")
    return cls(int(spec["bos_id"]), int(spec["eos_id"]), int(spec["pad_id"]))
