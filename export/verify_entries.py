"""The `verify_<C>` signatures of a generate bundle: speculative decoding's one-pass check.

`verify_<C>` takes what `extend_<C>` takes, for the whole decode batch (every decoding row
speculates at once), and returns the logits at every one of the C positions (models/decoder.py
`Decoder.verify`), so the server can accept or reject C - 1 draft tokens and draw the next one
from a single target forward. Listed in `manifest.extra["verify"]`; older bundles lack them.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp


def verify_entries(rebuild: Callable[[list[Any]], Any],
                   kv: dict[str, tuple[tuple[int, ...], str]], lengths: tuple[int, ...],
                   batch: int, pages_per_seq: int
                   ) -> tuple[list[tuple[str, Callable[..., Any], dict[str, Any]]],
                              list[dict[str, Any]]]:
  """(signature name, fn, abstract inputs) of every `verify_<C>`, C in `lengths`; its meta."""
  cache_structs = {k: jax.ShapeDtypeStruct(s, jnp.dtype(d)) for k, (s, d) in kv.items()}
  i32 = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.int32)  # noqa: E731

  def verify_fn(params, inputs):
    cache = {k: inputs[k] for k in kv}
    logits, cache = rebuild(list(params)).verify(
        inputs["tokens"], inputs["starts"], inputs["lengths"], inputs["page_table"], cache)
    return {"logits": logits, **cache}

  entries, meta = [], []
  for c in lengths:
    entries.append((f"verify_{c}", verify_fn, {
        "tokens": i32(batch, c), "starts": i32(batch), "lengths": i32(batch),
        "page_table": i32(batch, pages_per_seq), **cache_structs}))
    meta.append({"length": c, "batch": batch, "signature": f"verify_{c}"})
  return entries, meta
