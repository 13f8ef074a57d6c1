"""Pipeline hand-off on the device: a step's outputs stay in device memory, and the next model
step assembles its batch from them there, with no host copy in between.

`DeviceRows` is a request's rows of a batch output a runner kept on its device (the whole
batch array, the first row and the row count); it reads as a numpy array where host code needs
one (`np.asarray` fetches the batch once; jax caches it). A consumer runner builds each input
of a batch with `assemble`: host rows staged and copied in once, device rows gathered from their
batch arrays by one compiled call per source batch. Those calls compile per (source shape,
batch shape); a pipeline's `Handoff` compiles them off the request path (`warm`) and `assemble`
uses the device path only for shapes already compiled, so a request never compiles. Hand-offs
are counted per (step, input) and where they happened ("device" or "host").
"""

from __future__ import annotations

import dataclasses
import math
import threading
from typing import Any, Iterable, Sequence

import numpy as np

Key = tuple[tuple[int, ...], str, tuple[int, ...], str, Any]  # src shape/dtype, dst shape/dtype, device


@dataclasses.dataclass(frozen=True, slots=True, eq=False)
class DeviceRows:
  """Rows [start, start + rows) of `array` read as [-1, *trailing]: one request's part of a batch
  output on the device. `handoff` and `edge` ((step, input)) are set by the pipeline."""

  array: Any
  start: int
  rows: int
  trailing: tuple[int, ...]
  handoff: Handoff | None = None
  edge: tuple[str, str] = ("", "")

  @classmethod
  def of(cls, array: Any, start: int, rows: int) -> DeviceRows:
    """Rows [start, start + rows) of batch output `array` [bucket, ...], as it is laid out."""
    return cls(array, start, rows, tuple(array.shape[1:]))

  @property
  def shape(self) -> tuple[int, ...]:
    return (self.rows, *self.trailing)

  @property
  def ndim(self) -> int:
    return 1 + len(self.trailing)

  @property
  def dtype(self) -> np.dtype:
    return np.dtype(self.array.dtype)

  def __len__(self) -> int:
    return self.rows

  def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
    host = np.asarray(self.array).reshape(-1, *self.trailing)[self.start:self.start + self.rows]
    return host if dtype is None else host.astype(dtype)

  def __getitem__(self, key: Any) -> np.ndarray:
    return np.asarray(self)[key]

  def reshape(self, shape: Sequence[int]) -> DeviceRows | np.ndarray:
    """These rows reshaped as np.reshape would; still on the device when the new rows are whole
    rows of the batch array read with the new trailing shape, else a host array."""
    size = self.rows * math.prod(self.trailing)
    shape = tuple(shape)
    if -1 in shape:
      rest = math.prod(d for d in shape if d != -1)
      shape = tuple(size // rest if d == -1 and rest else d for d in shape)
    if math.prod(shape) != size or not shape:
      return np.reshape(np.asarray(self), shape)  # raises numpy's own message
    unit = math.prod(shape[1:])
    first = self.start * math.prod(self.trailing)
    if unit == 0 or first % unit or math.prod(self.array.shape) % unit:
      return np.reshape(np.asarray(self), shape)
    return dataclasses.replace(self, start=first // unit, rows=shape[0], trailing=shape[1:])

  def tagged(self, handoff: Handoff, edge: tuple[str, str]) -> DeviceRows:
    """These rows, handed to step input `edge` of the pipeline whose copies `handoff` holds."""
    return dataclasses.replace(self, handoff=handoff, edge=edge)


def _rows_of(src: Any, trailing: tuple[int, ...], index: Any, dtype: Any) -> tuple[Any, Any]:
  import jax.numpy as jnp

  flat = src.reshape((-1, *trailing)).astype(dtype)
  rows = jnp.take(flat, jnp.clip(index, 0, flat.shape[0] - 1), axis=0)
  return rows, (index >= 0).reshape((-1,) + (1,) * len(trailing))


def _gather(src: Any, index: Any, *, trailing: tuple[int, ...], dtype: Any) -> Any:
  """[len(index), *trailing]: row index[j] of `src` read as [-1, *trailing], zeros where -1."""
  import jax.numpy as jnp

  rows, keep = _rows_of(src, trailing, index, dtype)
  return jnp.where(keep, rows, jnp.zeros((), rows.dtype))


def _place(buf: Any, src: Any, index: Any) -> Any:
  """`buf` with row j replaced by row index[j] of `src` (read with buf's trailing shape) where
  index[j] >= 0."""
  import jax.numpy as jnp

  rows, keep = _rows_of(src, tuple(buf.shape[1:]), index, buf.dtype)
  return jnp.where(keep, rows, buf)


class Handoff:
  """One pipeline's compiled hand-off copies, the shapes they are ready for, and its counts."""

  def __init__(self) -> None:
    import jax

    self._gather = jax.jit(_gather, static_argnames=("trailing", "dtype"))
    self._place = jax.jit(_place)
    self._ready: set[Key] = set()
    self._lock = threading.Lock()
    self.counts: dict[tuple[str, str, str], int] = {}  # (step, input, "device"|"host") -> n

  @staticmethod
  def key(src_shape: Sequence[int], src_dtype: Any, dst_shape: Sequence[int], dst_dtype: Any,
          device: Any) -> Key:
    """What one compiled copy serves: a source batch array's shape and dtype into a batch
    input's, on `device`."""
    return (tuple(src_shape), np.dtype(src_dtype).str, tuple(dst_shape),
            np.dtype(dst_dtype).str, device)

  def ready(self, key: Key) -> bool:
    """Whether both copies for `key` are compiled (`assemble` uses nothing else)."""
    return key in self._ready

  def warm(self, key: Key) -> None:
    """Compiles (and runs once) both copies for `key`; `assemble` uses them from then on."""
    import jax

    if key in self._ready:
      return
    src_shape, src_dtype, dst_shape, dst_dtype, device = key
    src = jax.device_put(np.zeros(src_shape, src_dtype), device)
    index = np.zeros(dst_shape[0], np.int32)  # `assemble` passes host arrays as they are
    buf = self.gather(src, index, dst_shape[1:], np.dtype(dst_dtype))
    jax.block_until_ready(self._place(np.zeros(dst_shape, dst_dtype), src, index))
    jax.block_until_ready(self._place(buf, src, index))
    with self._lock:
      self._ready.add(key)

  def gather(self, src: Any, index: Any, trailing: tuple[int, ...], dtype: np.dtype) -> Any:
    """A new batch input: the rows `index` names of `src`, zeros elsewhere (`_gather`)."""
    return self._gather(src, index, trailing=tuple(trailing), dtype=dtype)

  def place(self, buf: Any, src: Any, index: Any) -> Any:
    """`buf` (device or host) with the rows `index` names of `src` put in (`_place`)."""
    return self._place(buf, src, index)

  def count(self, edge: tuple[str, str], where: str, n: int = 1) -> None:
    """Counts `n` tensors handed to step input `edge` on the "device" or through the "host"."""
    with self._lock:
      k = (*edge, where)
      self.counts[k] = self.counts.get(k, 0) + n

  def snapshot(self) -> dict[tuple[str, str, str], int]:
    """The counts now (a copy: a scrape must not race a new edge's first count)."""
    with self._lock:
      return dict(self.counts)


# One request's part of a batch input: (dest row in the batch, first row of the request's value,
# rows, the value: a host array or DeviceRows).
Piece = tuple[int, int, int, Any]


def assemble(pieces: Sequence[Piece], shape: tuple[int, ...], dtype: Any,
             device: Any) -> Any | None:
  """The batch input [shape] on `device` built from `pieces` (zeros elsewhere), or None when no
  piece is on the device or a device piece's copy is not compiled for these shapes yet: the
  caller assembles on the host (those hand-offs count as "host")."""
  dtype = np.dtype(dtype)
  groups: dict[int, list[Piece]] = {}
  host: list[Piece] = []
  for p in pieces:
    (groups.setdefault(id(p[3].array), []) if isinstance(p[3], DeviceRows) else host).append(p)
  if not groups:
    return None
  keys = {g: _key_of(ps[0][3], shape, dtype, device) for g, ps in groups.items()}
  if any(ps[0][3].handoff is None or not ps[0][3].handoff.ready(keys[g])
         or any(p[3].trailing != tuple(shape[1:]) for p in ps)  # rows read another way
         for g, ps in groups.items()):
    _count(p for ps in groups.values() for p in ps)
    return None
  buf = None
  if host:  # staged here, copied over with the first gather's call
    buf = np.zeros(shape, dtype)
    for dest, start, rows, value in host:
      buf[dest:dest + rows] = value[start:start + rows]
  for ps in groups.values():
    rows_of = ps[0][3]
    index = np.full(shape[0], -1, np.int32)
    for dest, start, rows, value in ps:
      index[dest:dest + rows] = np.arange(value.start + start, value.start + start + rows)
    src, handoff = _on(rows_of.array, device), rows_of.handoff
    buf = (handoff.gather(src, index, shape[1:], dtype) if buf is None
           else handoff.place(buf, src, index))
    _count(ps, "device")
  return buf


def _key_of(value: DeviceRows, shape: tuple[int, ...], dtype: np.dtype, device: Any) -> Key:
  return Handoff.key(value.array.shape, value.array.dtype, shape, dtype, device)


def _on(array: Any, device: Any) -> Any:
  """`array` on `device` (a device-to-device copy when it lives elsewhere)."""
  import jax

  return array if array.devices() == {device} else jax.device_put(array, device)


def _count(pieces: Iterable[Piece], where: str = "host") -> None:
  for _, _, _, value in pieces:
    if value.handoff is not None:
      value.handoff.count(value.edge, where)
