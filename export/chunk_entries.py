"""The chunk signatures of a generate bundle, `extend_<C>` and `verify_<C>`: one pass over C
tokens of each row at an offset, over the sequence's pages.

`extend_<C>` (chunked prefill, prefix caching) returns the logits at each row's last chunk
position (models/decoder.py `Decoder.extend`); `verify_<C>` takes the same inputs for the whole
decode batch (every decoding row speculates at once) and returns the logits at every one of the
C positions (`Decoder.verify`), so the server can accept or reject C - 1 draft tokens and draw
the next one from a single target forward. Listed in `manifest.extra["extend"]` and
`["verify"]`; older bundles lack them.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp


def chunk_entries(rebuild: Callable[[list[Any]], Any], kv: dict[str, tuple[tuple[int, ...], str]],
                  method: str, shapes: Sequence[tuple[int, int]], pages_per_seq: int
                  ) -> tuple[list[tuple[str, Callable[..., Any], dict[str, Any]]],
                             list[dict[str, Any]]]:
  """(signature name, fn, abstract inputs) of `<method>_<C>` ("extend" or "verify") for every
  (C, batch) of `shapes`; and its manifest meta."""
  cache_structs = {k: jax.ShapeDtypeStruct(s, jnp.dtype(d)) for k, (s, d) in kv.items()}
  i32 = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.int32)  # noqa: E731

  def chunk_fn(params, inputs):
    cache = {k: inputs[k] for k in kv}
    logits, cache = getattr(rebuild(list(params)), method)(
        inputs["tokens"], inputs["starts"], inputs["lengths"], inputs["page_table"], cache)
    return {"logits": logits, **cache}

  entries, meta = [], []
  for c, batch in shapes:
    entries.append((f"{method}_{c}", chunk_fn, {
        "tokens": i32(batch, c), "starts": i32(batch), "lengths": i32(batch),
        "page_table": i32(batch, pages_per_seq), **cache_structs}))
    meta.append({"length": c, "batch": batch, "signature": f"{method}_{c}"})
  return entries, meta
