"""Embedding lookups of a captured torch program, run through our embedding-bag kernel.

`nn.Embedding` (`aten.embedding`) becomes bags of one id. `nn.EmbeddingBag` on padded ids
[batch, bag] reaches the graph as `_embedding_bag(weight, view(ids, [n]), arange(0, n, bag))`;
`rewrite_padded_bags` recognises that pattern and calls `pallas_kernels.embedding_bag` on the
[batch, bag] ids directly (padding_idx entries become our -1 padding). Every other
`_embedding_bag` (explicit offsets, per-sample weights) runs a plain-jnp lowering. Ids are taken
modulo the table's rows as in our CTR models (torch raises on an out-of-range id instead).
"""

from __future__ import annotations

import logging
import operator
from typing import Any

from jax import lax
import jax.numpy as jnp

from models.layers import kernel_impl
from pallas_kernels import embedding_bag

logger = logging.getLogger(__name__)

PADDED_BAG_OP = "xlaserve.embedding_bag_padded"
_MODES = {0: "sum", 1: "mean"}
_BAG_TARGETS = ("aten._embedding_bag.default", "aten._embedding_bag_forward_only.default")
_RESHAPES = ("aten.view.default", "aten._unsafe_view.default", "aten.reshape.default")


def embedding(weight, ids, padding_idx=-1, scale_grad_by_freq=False, sparse=False):
  """`aten.embedding` (padding_idx only affects gradients): one-id bags through the kernel."""
  flat = ids.reshape(-1, 1)  # [N, 1]
  out = embedding_bag(weight, flat, combiner="sum", impl=kernel_impl("auto", flat))  # [N, D]
  return out.reshape(*ids.shape, weight.shape[-1])


def embedding_bag_padded(weight, ids, *, mode: int, padding_idx: int):
  """The recognised `nn.EmbeddingBag` on padded ids [batch, bag] -> [batch, dim], via the kernel."""
  if padding_idx >= 0:
    ids = jnp.where(ids == padding_idx, -1, ids)
  return embedding_bag(weight, ids, combiner=_MODES[mode], impl=kernel_impl("auto", ids))


def _embedding_bag(weight, indices, offsets, scale_grad_by_freq=False, mode=0, sparse=False,
                   per_sample_weights=None, include_last_offset=False, padding_idx=-1):
  """General `_embedding_bag` (1-D ids with offsets): a [bags, ids] membership matmul."""
  if mode not in _MODES:
    raise NotImplementedError(f"aten._embedding_bag mode={mode} (only sum and mean lower)")
  starts = offsets[:-1] if include_last_offset else offsets  # [B]
  n = indices.shape[0]
  pos = lax.iota(jnp.int32, n)  # [N]
  bag_of = jnp.searchsorted(starts, pos, side="right") - 1  # [N]
  rows = jnp.take(weight, indices % weight.shape[0], axis=0).astype(jnp.float32)  # [N, D]
  keep = (indices != padding_idx) if padding_idx >= 0 else jnp.ones(indices.shape, bool)
  if include_last_offset:
    keep = keep & (pos < offsets[-1])
  w = keep.astype(jnp.float32) * (1.0 if per_sample_weights is None else per_sample_weights)
  member = (bag_of[None, :] == lax.iota(jnp.int32, starts.shape[0])[:, None]) * w[None, :]
  out = member @ rows  # [B, D]
  if mode == 1:
    out = out / jnp.maximum((member != 0).sum(axis=1, keepdims=True), 1)
  empty = jnp.zeros((0,), jnp.int32)
  return out.astype(weight.dtype), empty, empty, empty


def _arg(node: Any, i: int, name: str, default: Any) -> Any:
  return node.args[i] if len(node.args) > i else node.kwargs.get(name, default)


def _padded_ids(node: Any) -> Any:
  """The [batch, bag] ids node of a recognised padded `_embedding_bag`, else None."""
  indices, offsets = node.args[1], node.args[2]
  if _arg(node, 6, "per_sample_weights", None) is not None or _arg(
      node, 7, "include_last_offset", False) or _arg(node, 4, "mode", 0) not in _MODES:
    return None
  if not (hasattr(offsets, "target") and str(offsets.target) == "aten.arange.start_step"):
    return None
  start, step = offsets.args[0], _arg(offsets, 2, "step", 1)
  if start != 0 or not isinstance(step, int):
    return None
  if not (hasattr(indices, "target") and str(indices.target) in _RESHAPES):
    return None
  src = indices.args[0]
  val = getattr(src, "meta", {}).get("val", None)  # the fake tensor torch.export recorded
  if val is None or val.dim() != 2 or val.shape[1] != step:
    return None
  return src


def rewrite_padded_bags(graph: Any) -> int:
  """Replaces each recognised padded `_embedding_bag` in the FX `graph`; returns how many."""
  count = 0
  for node in list(graph.nodes):
    if node.op != "call_function" or str(node.target) not in _BAG_TARGETS:
      continue
    ids = _padded_ids(node)
    users = list(node.users)
    if ids is None or not all(u.target is operator.getitem and u.args[1] == 0 for u in users):
      continue
    with graph.inserting_before(node):
      new = graph.call_function(embedding_bag_padded, (node.args[0], ids), {
          "mode": _arg(node, 4, "mode", 0), "padding_idx": _arg(node, 8, "padding_idx", -1)})
    new.meta = dict(users[0].meta) if users else {}
    for u in users:
      u.replace_all_uses_with(new)
      graph.erase_node(u)
    graph.erase_node(node)
    count += 1
  graph.eliminate_dead_code()
  logger.info("%d embedding bag(s) rewritten to the embedding-bag kernel", count)
  return count


# Graph targets the rewrite inserts, by their op-table name.
CUSTOM_TARGETS = {embedding_bag_padded: PADDED_BAG_OP}
BAG_OPS = {
    "aten.embedding.default": embedding,
    "aten._embedding_bag.default": _embedding_bag,
    "aten._embedding_bag_forward_only.default": _embedding_bag,
    PADDED_BAG_OP: embedding_bag_padded,
}
