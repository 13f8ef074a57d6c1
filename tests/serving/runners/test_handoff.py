"""Device hand-off between pipeline steps (serving/runners/handoff.py), against numpy: a batch
input assembled on the device from host rows and rows of device batch outputs equals the same
batch built with numpy slicing; reshaped views read the same rows numpy's reshape gives; a copy
not compiled yet is refused (the caller assembles on the host) and counted as a host hand-off.
"""

from __future__ import annotations

import zlib

import jax
import numpy as np
import pytest

from serving.runners.handoff import DeviceRows, Handoff, assemble

EDGE = ("rank", "x")


def batch_output(rng: np.random.Generator, rows: int, trailing: tuple[int, ...], dtype,
                 device) -> tuple[np.ndarray, jax.Array]:
  host = (rng.normal(size=(rows, *trailing)) * 100).astype(dtype)
  return host, jax.device_put(host, device)


@pytest.mark.parametrize("trailing,new", [((3, 2), [3, 2]), ((3, 2), [6, 1]), ((3, 2), [-1, 2]),
                                          ((4,), [2, 2]), ((6,), [1, 6]), ((2, 3), [2, 3, 1]),
                                          ((3, 2), [1, 3, 2]), ((5,), [-1]), ((6,), [-1, 3]),
                                          ((8,), [4, -1])])
def test_reshaped_rows_read_what_numpy_reshape_gives(trailing, new):
  rng = np.random.default_rng(0)
  host, dev = batch_output(rng, 4, trailing, np.float32, jax.devices()[0])
  for start, rows in ((0, 1), (1, 1), (3, 1), (1, 2), (0, 4)):
    shape = new if -1 in new else [rows * new[0], *new[1:]]
    want = np.reshape(host[start:start + rows], shape)
    got = DeviceRows.of(dev, start, rows).reshape(shape)
    assert got.shape == want.shape
    np.testing.assert_array_equal(np.asarray(got), want)


def test_a_reshape_that_does_not_fit_raises_as_numpy_does():
  rows = DeviceRows.of(jax.numpy.zeros((4, 3)), 0, 2)
  with pytest.raises(ValueError):
    rows.reshape([4, 2])


def case(rng: np.random.Generator, bucket: int, trailing: tuple[int, ...], dtype, handoff: Handoff,
         device, sources: int, n_host: int):
  """Random pieces (device rows from `sources` batch outputs, `n_host` host arrays, some taken
  from a later first row as split requests are) and the numpy batch they make."""
  outs = [batch_output(rng, int(rng.choice([4, 8])), trailing, dtype, device) for _ in range(sources)]
  want = np.zeros((bucket, *trailing), dtype)
  pieces, dest = [], 0
  kinds = ["dev"] * (2 * sources) + ["host"] * n_host
  for kind in rng.permutation(kinds):
    if dest >= bucket:
      break
    if kind == "dev":
      host, dev = outs[int(rng.integers(sources))]
      first = int(rng.integers(len(host)))
      total = int(rng.integers(1, len(host) - first + 1))
      value, full = DeviceRows.of(dev, first, total).tagged(handoff, EDGE), host[first:first + total]
    else:
      full = (rng.normal(size=(int(rng.integers(1, 4)), *trailing)) * 100).astype(dtype)
      value = full
    start = int(rng.integers(len(full)))  # a split request's later slice starts here
    rows = min(len(full) - start, bucket - dest)
    pieces.append((dest, start, rows, value))
    want[dest:dest + rows] = full[start:start + rows]
    dest += rows + int(rng.integers(0, 2))  # padding rows between requests stay zero
  return pieces, want, outs


@pytest.mark.parametrize("dtype", [np.float32, np.int32, np.float16])
@pytest.mark.parametrize("trailing", [(), (3,), (2, 5)])
@pytest.mark.parametrize("sources,n_host", [(1, 0), (2, 0), (1, 2), (3, 3)])
def test_assembled_on_the_device_equals_numpy(dtype, trailing, sources, n_host):
  rng = np.random.default_rng(zlib.crc32(repr((np.dtype(dtype).str, trailing, sources,
                                                n_host)).encode()))
  device, handoff = jax.devices()[0], Handoff()
  for bucket in (4, 16):
    pieces, want, outs = case(rng, bucket, trailing, dtype, handoff, device, sources, n_host)
    for _, dev in outs:
      handoff.warm(Handoff.key(dev.shape, dtype, want.shape, dtype, device))
    got = assemble(pieces, want.shape, dtype, device)
    if not any(isinstance(p[3], DeviceRows) for p in pieces):
      assert got is None  # nothing on the device: the caller stages it on the host
      continue
    assert isinstance(got, jax.Array) and got.devices() == {device}
    np.testing.assert_array_equal(np.asarray(got), want)  # a copy: exact


def test_rows_on_another_device_are_copied_over_and_a_cast_is_exact():
  src_device, device = jax.devices()[1], jax.devices()[2]
  handoff = Handoff()
  host, dev = batch_output(np.random.default_rng(1), 8, (3,), np.int32, src_device)
  handoff.warm(Handoff.key(dev.shape, np.int32, (8, 3), np.float32, device))
  got = assemble([(2, 1, 3, DeviceRows.of(dev, 4, 4).tagged(handoff, EDGE))], (8, 3), np.float32,
                 device)
  want = np.zeros((8, 3), np.float32)
  want[2:5] = host[5:8]
  assert got.devices() == {device}
  np.testing.assert_array_equal(np.asarray(got), want)


def test_a_copy_not_compiled_yet_is_refused_and_counted_as_host():
  device, handoff = jax.devices()[0], Handoff()
  _, dev = batch_output(np.random.default_rng(2), 4, (2,), np.float32, device)
  pieces = [(0, 0, 2, DeviceRows.of(dev, 0, 2).tagged(handoff, EDGE)),
            (2, 0, 1, DeviceRows.of(dev, 3, 1).tagged(handoff, EDGE))]
  assert assemble(pieces, (4, 2), np.float32, device) is None
  assert handoff.snapshot() == {(*EDGE, "host"): 2}
  handoff.warm(Handoff.key(dev.shape, np.float32, (4, 2), np.float32, device))
  assert assemble(pieces, (4, 2), np.float32, device) is not None
  assert handoff.snapshot() == {(*EDGE, "host"): 2, (*EDGE, "device"): 2}
  assert assemble(pieces, (8, 2), np.float32, device) is None  # another batch shape: not yet


def test_device_rows_read_as_numpy_where_host_code_needs_them():
  host, dev = batch_output(np.random.default_rng(3), 4, (3,), np.float32, jax.devices()[0])
  rows = DeviceRows.of(dev, 1, 2)
  np.testing.assert_array_equal(np.asarray(rows), host[1:3])
  np.testing.assert_array_equal(rows[1:], host[2:3])
  np.testing.assert_array_equal(np.ascontiguousarray(rows, np.float64), host[1:3].astype(np.float64))
  assert rows.shape == (2, 3) and len(rows) == 2 and rows.dtype == np.float32
