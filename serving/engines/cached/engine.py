"""`CachedTablesEngine`: serves a bundle whose embedding tables exceed a device budget.

Each table is placed by `plan_tables`: fully on the device, or cached (its hottest rows in a
fixed-size device cache, the whole table in host memory or memory-mapped from disk). A batch
runs as one executable per (batch bucket, miss bucket): `assemble` builds the [B, F, D]
embeddings from tables, caches and the batch's misses and writes admitted misses into the
(donated) caches, and the signature's from-embeddings artifact runs the rest of the model on
them; one dispatch per batch, as for a bundle with every table on the device. The host half (dedupe, hit/miss split, admission, gathering the misses) runs under one
lock in dispatch order, so the index always matches the device caches as the batch will see
them; the device half is asynchronous, so the next batch's gather overlaps this one's compute.
"""

from __future__ import annotations

import logging
import pathlib
import threading
import time
from typing import Any, Mapping, Sequence

import numpy as np

import bundle as bundle_lib
from bundle import BundleError, Manifest, numpy_dtype
from serving.engines.base import Progress
from serving.engines.cached.assemble import (gather_misses, make_assemble, miss_bucket,
                                             miss_buckets)
from serving.engines.cached.config import EmbeddingCacheConfig, TablePlan, plan_tables
from serving.engines.cached.host_tables import host_table
from serving.engines.cached.row_cache import RowCache
from serving.engines.replica import ReplicaEngine, check_rows, deserialize, resolve_signature

logger = logging.getLogger(__name__)
HOT_ROWS_FILE = "hot_rows.npz"  # optional in a bundle: table param path -> rows, hottest first


class CachedTablesEngine(ReplicaEngine):
  """One signature of a bundle with categorical tables, placed under `config` on one device."""

  def __init__(self, path: str | pathlib.Path, *, config: EmbeddingCacheConfig,
               signature: str = "serve", manifest: Manifest | None = None, device: Any = None):
    import jax

    self.path = pathlib.Path(path)
    self.manifest = manifest or bundle_lib.read_manifest(self.path)
    sig = self.signature = resolve_signature(self.path, self.manifest, signature)
    if sig.table_lookup is None:
      raise BundleError(f"{self.path}: an embedding cache needs the signature's from-embeddings"
                        " artifact (models built on models.embedding.CategoricalEmbeddings carry"
                        " it); re-export the model, or drop embedding_cache from its config")
    self.lookup = sig.table_lookup
    self.inputs, self.outputs = sig.inputs, sig.outputs
    self.buckets = tuple(self.manifest.batch_buckets)
    self.config = config
    self._init_replicas(None)
    # The ids input is reduced to table rows on the host, in 64 bits: never narrowed.
    self._narrowed = {k: v for k, v in self._narrowed.items() if k != self.lookup.ids_input}
    self.device = device or jax.devices()[0]
    try:
      self.plans: tuple[TablePlan, ...] = plan_tables(self.lookup, self.manifest.params, config)
    except ValueError as e:
      raise BundleError(f"{self.path}: {e}") from e
    files = {b: bundle_lib.find_artifact(self.lookup.artifacts, self._platform, batch=b)
             for b in self.buckets}
    if not all(files.values()):
      raise BundleError(f"{self.path}: no {self._platform!r} from-embeddings artifact for buckets"
                        f" {[b for b, f in files.items() if not f]}; re-export with this platform")
    loaded: dict[str, Any] = {}
    self._exported = {b: deserialize(self.path, f, loaded) for b, f in files.items()}
    self._quantized = bool(self.lookup.scales)
    self._table_rows = np.array([p.rows for p in self.plans], np.int64)
    self._scratch_slots = np.array([[p.cache_rows] for p in self.plans if p.cache_rows is not None],
                                   np.int32).reshape(-1, 1)
    self._lock = threading.Lock()  # the host half of a batch, and updates, in dispatch order
    self.caches: dict[int, RowCache] = {}
    for p in self.plans:
      logger.info("%s: %s", self.manifest.name, p.describe())

  # -- load ----------------------------------------------------------------------------------

  def _leaves(self, f: int) -> tuple[int, ...]:
    lk = self.lookup
    return (lk.tables[f], lk.scales[f], lk.offsets[f]) if self._quantized else (lk.tables[f],)

  def warmup(self, *, progress: Progress | None = None) -> None:
    import jax

    say = progress or (lambda msg: None)
    t0 = time.perf_counter()
    on_host = {i for p in self.plans if p.cache_rows is not None for i in self._leaves(p.feature)}
    host_dev = jax.devices("cpu")[0]  # cached tables never touch the accelerator's memory
    params = bundle_lib.restore_params(self.path, self.manifest, [
        jax.sharding.SingleDeviceSharding(host_dev if i in on_host else self.device)
        for i in range(len(self.manifest.params))])
    skip = self.lookup.table_leaves
    self._dense = [p for i, p in enumerate(params) if i not in skip]
    self._tables, self._host, self._caches = [], [], []
    for p in self.plans:
      leaves = [params[i] for i in self._leaves(p.feature)]
      if p.cache_rows is None:
        self._tables.append(tuple(leaves))
        continue
      host = [host_table(self.path, self.manifest.params[i].path, a, self.config.host)
              for i, a in zip(self._leaves(p.feature), leaves)]
      self._host.append(host)
      self.caches[p.feature] = RowCache(p.rows, p.cache_rows, aging_lookups=self.config.aging_lookups,
                                        seed=self.config.seed + p.feature)
      self._caches.append(tuple(jax.device_put(np.zeros((p.cache_rows + 1, *a.shape[1:]), a.dtype),
                                               self.device) for a in host))
    del params, leaves
    say(f"tables placed ({self.placement_summary()}) in {time.perf_counter() - t0:.2f}s")
    self._warm_from_hot_rows(say)
    self._compile_all(say)
    self._replicas.append({"params": self._dense, "compiled": self._step})

  def _warm_from_hot_rows(self, say: Progress) -> None:
    hot_file = self.path / HOT_ROWS_FILE
    if not hot_file.exists() or not self.caches:
      return
    import jax

    hot = np.load(hot_file)
    k = 0
    for p in self.plans:
      if p.cache_rows is None:
        continue
      if p.path in hot.files and self.caches[p.feature].warm(hot[p.path]):
        slots, rows = self.caches[p.feature].cached_rows()  # only these rows go to the device
        self._caches[k] = tuple(a.at[slots].set(jax.device_put(h[rows], self.device))
                                for a, h in zip(self._caches[k], self._host[k]))
      k += 1
    say(f"caches warmed from {HOT_ROWS_FILE}")

  def _compile_all(self, say: Progress) -> None:
    import jax

    cached = [p.cache_rows is not None for p in self.plans]
    assemble = make_assemble(cached, [p.cache_rows for p in self.plans], self._quantized)
    emb_name = self.lookup.embeddings_input
    self._miss_buckets = {b: miss_buckets(b, sum(cached)) for b in self.buckets}
    self._step: dict[tuple[int, int], Any] = {}
    struct = lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype)  # noqa: E731
    for b in self.buckets:
      t1 = time.perf_counter()
      model = self._exported[b].call

      def step(dense, rest, *args, model=model):  # one executable: lookup, then the model
        emb, caches = assemble(*args)
        return model(dense, {**rest, emb_name: emb}), caches

      for m in self._miss_buckets[b]:
        structs = jax.tree.map(struct, (self._dense, self._rest_structs(b),
                                        *self._assemble_args(b, m)))
        self._step[b, m] = jax.jit(step, donate_argnums=(3,)).trace(*structs).lower().compile()
      say(f"bucket {b:>5} compiled ({len(self._miss_buckets[b])} miss buffers) in"
          f" {time.perf_counter() - t1:.2f}s")
      zeros = {t.name: np.zeros((b, *t.shape[1:]), numpy_dtype(t.dtype)) for t in self.inputs}
      zeros[self.lookup.ids_input][:] = -1  # missing ids: warm-up leaves caches and counters be
      for _ in range(3):  # the first run surfaces runtime failures; best of two more timed
        t1 = time.perf_counter()
        self.fetch(self.dispatch(bucket=b, inputs=zeros))
        seconds = time.perf_counter() - t1
        self._point_seconds[b] = min(seconds, self._point_seconds.get(b, seconds))

  def _rest_structs(self, b: int) -> dict[str, Any]:
    """The model's inputs other than the ids, at bucket `b` (placeholders for tracing)."""
    return {t.name: np.zeros((b, *t.shape[1:]), numpy_dtype(t.dtype))
            for t in self.inputs if t.name != self.lookup.ids_input}

  def _assemble_args(self, b: int, m: int) -> tuple[Any, ...]:
    """Placeholder arguments of the assemble step at (b, m), for tracing."""
    miss = gather_misses(self._host, [], m)
    fc = len(self._host)
    return (self._tables, self._caches, np.zeros((b, len(self.plans)), np.int32), miss,
            np.zeros((fc, m), np.int32), np.zeros((fc, m), np.int32))

  # -- serving -------------------------------------------------------------------------------

  wants_rows = True  # padding rows are not lookups: they must not count, nor heat row 0

  def dispatch(self, *, bucket: int, inputs: Mapping[str, np.ndarray],
               rows: int | None = None) -> Any:
    ids = np.asarray(inputs[self.lookup.ids_input])
    if rows is not None and rows < len(ids):
      ids = ids.copy()
      ids[rows:] = -1
    rest = {k: v for k, v in inputs.items() if k != self.lookup.ids_input}
    self.check_ranges(rest)  # the ids are reduced to table rows here, in 64 bits
    with self._lock:
      rows, parts, slots, froms = self._plan_batch(ids)
      m = miss_bucket(sum(len(r) for _, r in parts), self._miss_buckets[bucket])
      miss = gather_misses(self._host, parts, m)
      ins_slot = np.repeat(self._scratch_slots, m, axis=1)  # padding writes: the scratch rows
      ins_from = np.zeros_like(ins_slot)
      for k, (s, fr) in enumerate(zip(slots, froms)):
        ins_slot[k, :len(s)], ins_from[k, :len(fr)] = s, fr
      out, self._caches = self._step[bucket, m](self._dense, rest, self._tables, self._caches,
                                                rows, miss, ins_slot, ins_from)
      return out, self._generation

  def _plan_batch(self, ids: np.ndarray) -> tuple[np.ndarray, list, list, list]:
    """Host half: per feature the row (device table) or source (cache slot or miss position)
    of every lookup, the misses to gather per cached table, and the admitted inserts."""
    ids = ids.astype(np.int64, copy=False)
    every = ids >= 0
    rows = np.where(every, ids % self._table_rows, -1).astype(np.int32)  # all features at once
    parts, slots, froms, base = [], [], [], 0
    for f, cache in self.caches.items():
      valid = every[:, f]
      plan = cache.plan(rows[valid, f].astype(np.int64))
      cap = cache.capacity
      src = np.full(len(ids), -1, np.int64)
      src[valid] = np.where(plan.src >= cap, plan.src + base, plan.src)
      rows[:, f] = src
      parts.append((len(parts), plan.miss_rows))
      slots.append(plan.insert_slot)
      froms.append(plan.insert_from + base)
      base += len(plan.miss_rows)
    return rows, parts, slots, froms

  def fetch(self, handle: Any) -> dict[str, np.ndarray]:
    out, _ = handle
    return {k: np.asarray(v) for k, v in out.items()}

  def generation_of(self, handle: Any) -> int:
    return handle[1]

  @property
  def batch_device(self) -> Any:
    return None  # ids are planned on the host: pipelines hand this model host arrays

  def device_outputs(self, handle: Any) -> Mapping[str, Any] | None:
    return dict(handle[0])

  # -- live updates --------------------------------------------------------------------------

  def apply_update(self, changes: Mapping[str, tuple[np.ndarray, np.ndarray]]) -> int:
    """Sets rows of param leaves between two batches. Table leaves take ids (hashed modulo
    the table's rows, as lookups are; new ids too); other leaves take rows in range. A cached
    table's host rows change and the cache drops the rows it held (later lookups read the new
    values); tables on the device and dense leaves are rewritten on the device. Validated
    whole first: a bad part refuses the update with nothing applied."""
    specs = {p.path: (i, p) for i, p in enumerate(self.manifest.params)}
    table_of = {leaf: (p, part) for p in self.plans
                for part, leaf in enumerate(self._leaves(p.feature))}
    checked = {}
    for path, (rows, values) in changes.items():
      i, spec = specs.get(path, (0, None))
      if i in table_of and spec is not None:
        rows = np.asarray(rows).reshape(-1)
        if rows.dtype.kind not in "iu" or (rows.size and rows.min() < 0):
          raise ValueError(f"{path!r}: ids must be non-negative integers")
        rows = rows.astype(np.int64) % spec.shape[0]
      checked[path] = (i, *check_rows(path, spec, rows, values, sorted(specs)))
    with self._lock:
      dense_index = [i for i in range(len(specs)) if i not in self.lookup.table_leaves]
      dense = list(self._dense)
      for path, (i, rows, values) in checked.items():
        if i not in table_of:
          j = dense_index.index(i)
          dense[j] = self._scatter(dense[j], rows, np.asarray(values, dense[j].dtype))
          continue
        plan, part = table_of[i]
        if plan.cache_rows is None:
          t = list(self._tables[self._device_index(plan.feature)])
          t[part] = self._scatter(t[part], rows, np.asarray(values, t[part].dtype))
          self._tables[self._device_index(plan.feature)] = tuple(t)
        else:
          k = list(self.caches).index(plan.feature)
          self._host[k][part][rows] = values
          self.caches[plan.feature].invalidate(rows)
          self.caches[plan.feature].stats.updated_rows += len(rows)
      self._dense = dense
      self._generation += 1
      return self._generation

  def _device_index(self, feature: int) -> int:
    return sum(1 for p in self.plans[:feature] if p.cache_rows is None)

  # -- accounting ----------------------------------------------------------------------------

  def placement_summary(self) -> str:
    n_cached = sum(p.cache_rows is not None for p in self.plans)
    dev = sum(p.device_bytes for p in self.plans)
    full = sum(p.rows * p.row_bytes for p in self.plans)
    return (f"{len(self.plans) - n_cached} tables on device, {n_cached} cached;"
            f" {dev / 2**20:.1f} of {full / 2**20:.1f} MiB of tables on the device")

  def table_stats(self) -> list[dict[str, Any]]:
    """Per table: placement, rows, cache rows and occupancy, and the cache's counters."""
    out = []
    for p in self.plans:
      d = {"table": p.path, "feature": p.feature, "placement": p.placement, "rows": p.rows,
           "device_bytes": p.device_bytes, "cache_rows": p.cache_rows or 0}
      if p.feature in self.caches:
        c = self.caches[p.feature]
        d.update(occupancy=c.occupancy, **{k: getattr(c.stats, k) for k in c.stats.__slots__})
        d["miss_bytes"] = c.stats.misses * p.row_bytes
      out.append(d)
    return out

  def _device_arrays(self, replica: Mapping[str, Any]) -> list[Any]:
    """Dense params, the tables kept whole on the device, and the device caches."""
    return [*self._dense, *(a for g in (*self._tables, *self._caches) for a in g)]

  def _replica_devices(self, index: int) -> Sequence[Any]:
    return (self.device,)

  def _host_bytes(self) -> int:
    """The cached tables' host copies (a memory-mapped table counts at its full size)."""
    return sum(int(a.nbytes) for tables in self._host for a in tables)

  def close(self) -> None:
    with self._lock:
      for group in (*self._tables, *self._caches):
        for a in group:
          a.delete()
      for p in self._dense:
        p.delete()
      self._tables, self._caches, self._dense, self._host = [], [], [], []
      self._replicas.clear()
