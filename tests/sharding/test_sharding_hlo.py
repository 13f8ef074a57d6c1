"""Collective parsing on hand-written HLO (sync, async, tuple results) and per-device bytes."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from sharding import collective_stats, collectives, make_mesh, peak_memory_bytes, per_device_bytes

HLO = """
HloModule jit_step, entry_computation_layout={(f32[8,16]{1,0})->f32[8,16]{1,0}}

%add (x: f32[], y: f32[]) -> f32[] {
  ROOT %r = f32[] add(f32[] %x, f32[] %y)
}

ENTRY %main (p: f32[8,16]) -> f32[8,16] {
  %p = f32[8,16]{1,0} parameter(0)
  %all-reduce = f32[8,16]{1,0} all-reduce(%p), channel_id=1, replica_groups={{0,1}}, to_apply=%add
  %all-reduce.1 = (f32[4]{0}, bf16[2,3]{1,0}) all-reduce(%a, %b), channel_id=2, to_apply=%add
  %ag = bf16[64,16]{1,0} all-gather(%p), channel_id=3, dimensions={0}
  %ags = (f32[8,16]{1,0}, f32[32,16]{1,0}) all-gather-start(%p), channel_id=4, dimensions={0}
  %agd = f32[32,16]{1,0} all-gather-done(%ags)
  %ars = f32[10]{0} all-reduce-start(%q), channel_id=5, to_apply=%add
  %ard = f32[10]{0} all-reduce-done(%ars)
  %cps = (s32[6]{0}, s32[6]{0}, u32[], u32[]) collective-permute-start(%i), source_target_pairs={{0,1}}
  %rs = f32[2,16]{1,0} reduce-scatter(%p), channel_id=6, dimensions={0}, to_apply=%add
  %a2a = f32[8,16]{1,0} all-to-all(%p), channel_id=7, dimensions={0}
  %fusion = f32[8,16]{1,0} fusion(%all-reduce, %ag), kind=kLoop, calls=%fused
  ROOT %out = f32[8,16]{1,0} add(%all-reduce, %fusion)
}
"""


def test_parses_every_kind_with_result_bytes():
  got = [(c.op, c.nbytes) for c in collectives(HLO)]
  assert got == [
      ("all-reduce", 8 * 16 * 4),
      ("all-reduce", 4 * 4 + 2 * 3 * 2),
      ("all-gather", 64 * 16 * 2),
      ("all-gather", 32 * 16 * 4),  # async: the output half of (operand, output)
      ("all-reduce", 10 * 4),
      ("collective-permute", 6 * 4),
      ("reduce-scatter", 2 * 16 * 4),
      ("all-to-all", 8 * 16 * 4),
  ]
  stats = collective_stats(HLO)
  assert stats.count == {"all-reduce": 3, "all-gather": 2, "reduce-scatter": 1, "all-to-all": 1,
                         "collective-permute": 1}
  assert stats.nbytes["all-reduce"] == 512 + 28 + 40
  assert stats.total_count == 8
  assert collective_stats("HloModule empty").total_bytes == 0


def test_real_compiled_tensor_parallel_pair():
  mesh = make_mesh("tensor", 4)
  x = jax.device_put(jnp.ones((4, 16)), NamedSharding(mesh, P()))
  w1 = jax.device_put(jnp.ones((16, 32)), NamedSharding(mesh, P(None, "model")))
  w2 = jax.device_put(jnp.ones((32, 8)), NamedSharding(mesh, P("model", None)))
  compiled = jax.jit(lambda x, a, b: jax.nn.relu(x @ a) @ b,
                     out_shardings=NamedSharding(mesh, P())).lower(x, w1, w2).compile()
  stats = collective_stats(compiled.as_text())
  assert stats.count["all-reduce"] == 1 and stats.nbytes["all-reduce"] == 4 * 8 * 4
  assert stats.total_count == 1
  peak = peak_memory_bytes(compiled)
  assert peak is None or peak >= (16 * 8 + 8 * 8 + 4 * 16 + 4 * 8) * 4
  by_device = per_device_bytes([x, w1, w2])
  assert sorted(d.id for d in by_device) == [d.id for d in jax.devices()[:4]]
  assert set(by_device.values()) == {(4 * 16 + 16 * 8 + 8 * 8) * 4}
  np.testing.assert_allclose(np.asarray(compiled(x, w1, w2)), np.full((4, 8), 16.0 * 32))
