"""One process of the two-process test: DLRM with row-sharded tables over a global mesh.

Run from the repository root, with it on PYTHONPATH (as procutil.child_env sets it):
  python tests/sharding/multihost_worker.py --process-id I --port P --batches IN.npz --out OUT.npz
Process 0 leads: it reads the padded batches, runs them through `LockstepLoop.leader_step`,
stops the loop and writes the outputs; the others run `follower_loop()`.
"""

from __future__ import annotations

import argparse
import sys

from sharding import multihost  # nothing touches a device before initialize


def main() -> int:
  ap = argparse.ArgumentParser()
  ap.add_argument("--process-id", type=int, required=True)
  ap.add_argument("--num-processes", type=int, default=2)
  ap.add_argument("--port", type=int, required=True)
  ap.add_argument("--local-devices", type=int, default=2)
  ap.add_argument("--strategy", default="embedding_rows")
  ap.add_argument("--batches", required=True)
  ap.add_argument("--out", required=True)
  args = ap.parse_args()

  multihost.initialize(f"127.0.0.1:{args.port}", args.num_processes, args.process_id,
                       local_cpu_devices=args.local_devices, timeout_s=60, heartbeat_timeout_s=20)
  import jax
  import numpy as np

  import sharding_testlib as tl
  from sharding import ShardingPlan, per_device_bytes, place_from_host

  data = np.load(args.batches)
  flat = tl.dlrm(tl.FEW_TABLES, abstract=True)  # structure only; values come from the test
  plan = ShardingPlan.create(args.strategy, jax.device_count())
  shardings = plan.param_shardings(flat.axes, flat.shapes)
  params = place_from_host([data[f"param{i}"] for i in range(len(flat.axes))], shardings)

  buckets = tuple(int(b) for b in data["buckets"])
  cfg = tl.FEW_TABLES
  specs = [(jax.ShapeDtypeStruct((b, cfg.num_dense), np.float32),
            jax.ShapeDtypeStruct((b, cfg.num_sparse), np.int32)) for b in buckets]
  in_sh = [(plan.input_sharding(2, batch=b),) * 2 for b in buckets]
  step = jax.jit(tl.step_fn(flat, None, plan), out_shardings=plan.output_sharding(2))
  loop = multihost.LockstepLoop(step, params, specs, in_sh)

  local_bytes = {d.id: n for d, n in per_device_bytes(params).items()}
  if loop.is_leader:
    outs = []
    for i in range(int(data["count"])):
      outs.append(loop.leader_step(int(data[f"bucket{i}"]), (data[f"dense{i}"], data[f"sparse{i}"])))
    loop.stop()
    np.savez(args.out, count=len(outs), **{f"out{i}": o for i, o in enumerate(outs)},
             device_ids=np.asarray(sorted(local_bytes)),
             device_bytes=np.asarray([local_bytes[k] for k in sorted(local_bytes)]),
             num_devices=jax.device_count())
  else:
    steps = loop.follower_loop()
    print(f"follower served {steps} steps; local bytes {local_bytes}", flush=True)
  jax.distributed.shutdown()
  return 0


if __name__ == "__main__":
  sys.exit(main())
