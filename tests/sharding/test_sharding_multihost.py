"""Two local processes (2 CPU devices each) serve one DLRM whose tables span all 4 devices."""

from __future__ import annotations

import pathlib
import sys

import jax
import numpy as np
import pytest

import sharding_testlib as tl
from procutil import Proc, child_env, free_port

WORKER = pathlib.Path(__file__).with_name("multihost_worker.py")
TIMEOUT_S = 150


def test_leader_and_follower_match_single_process(tmp_path):
  cfg = tl.FEW_TABLES
  buckets = (1, 8)
  plan = [(1, 8, 5), (0, 1, 1), (1, 8, 8), (0, 1, 1)]  # (bucket index, size, real rows)
  batches = {}
  for i, (b, size, real) in enumerate(plan):
    dense, sparse = tl.batch(cfg, size, seed=10 + i)
    dense[real:], sparse[real:] = 0.0, -1  # padding rows, as the batcher pads
    batches.update({f"bucket{i}": b, f"dense{i}": dense, f"sparse{i}": sparse})
  flat = tl.dlrm(cfg)
  inp, out = tmp_path / "batches.npz", tmp_path / "out.npz"
  np.savez(inp, buckets=np.asarray(buckets), count=len(plan), **batches,
           **{f"param{i}": np.asarray(x) for i, x in enumerate(flat.leaves)})

  port = free_port()
  env = child_env(own_devices=True)  # each process sets 2 devices itself
  procs = [Proc([sys.executable, str(WORKER), "--process-id", str(i), "--port", str(port),
                 "--batches", str(inp), "--out", str(out)], env=env) for i in range(2)]
  try:
    codes = [p.wait(TIMEOUT_S) for p in procs]
  except AssertionError:
    for p in procs:
      p.kill()
    pytest.fail(f"multi-host run hung for {TIMEOUT_S}s:\n" + "\n---\n".join(p.text for p in procs))
  logs = [p.output(10) for p in procs]
  for i, code in enumerate(codes):
    assert code == 0, f"process {i} failed:\n{logs[i][-4000:]}"
  assert "follower served 4 steps" in logs[1]

  got = np.load(out)
  assert int(got["num_devices"]) == 4
  ref_fn = jax.jit(tl.step_fn(flat, None, None))
  for i, (_, size, real) in enumerate(plan):
    want = np.asarray(ref_fn(flat.leaves, batches[f"dense{i}"], batches[f"sparse{i}"]))
    assert got[f"out{i}"].shape == (size, 1)
    np.testing.assert_allclose(got[f"out{i}"][:real], want[:real], rtol=1e-6, atol=1e-6)
  # Row-sharded tables: each of the leader's 2 devices holds a quarter of every table.
  table_bytes = sum(r * cfg.embed_dim * 4 for r in cfg.table_sizes)
  dense_bytes = sum(x.nbytes for x, a in zip(flat.leaves, flat.axes) if a[0] != "table_rows")
  assert list(got["device_bytes"]) == [table_bytes // 4 + dense_bytes] * 2
