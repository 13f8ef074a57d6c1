"""Compare sharding strategies for a model: memory, collectives, latency, throughput, compile time.

  python benchmarks/sharding.py --devices 8 [--model dlrm] [--quick] [--from-bundle] [--out DIR]

Runs every strategy in `sharding.STRATEGIES` on `--devices` devices (on a host without an
accelerator it makes that many virtual CPU devices itself), prints one table row per strategy,
and writes `sharding_<model>.json` (the rows, with the latency/throughput points per bucket) and
`sharding_<model>.png` (throughput against latency, one curve per strategy) to `--out`.
On CPU the virtual devices share the host's cores: the memory and collective columns are real,
the timings only show overheads (see /work/shared/PLATFORM.md).

Rows jit the Flax model in process; an `embedding_tables` run adds a row `embedding_tables
(bundle)` served the way the server does it: the model exported once, then `BundleEngine`
placed by `serving.repository.placement` (fused lookup + the bundle's from-embeddings artifact).
`--from-bundle` serves every strategy that way.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import os
import pathlib
import statistics
import sys
import tempfile
import time
from typing import Any, Callable

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))


def _log(msg: str) -> None:
  print(msg, file=sys.stderr, flush=True)


# ---- model -----------------------------------------------------------------------------------
def _dlrm_config(quick: bool):
  from models.dlrm import DLRMConfig

  if quick:  # ~70 MB of tables
    sizes = (100_000, 50_000, 24_000, 24_000, 12_000, 12_000, 4_800, 4_800) + (2_000,) * 18
  else:  # ~280 MB of tables
    sizes = (400_000, 200_000, 100_000, 100_000, 50_000, 50_000, 20_000, 20_000) + (8_000,) * 18
  # impl="xla": XLA partitions the jnp lookup over sharded tables; the Pallas kernel that "auto"
  # picks on CUDA is a custom call it cannot partition (it would gather whole tables).
  return DLRMConfig(table_sizes=sizes, embed_dim=64, bottom_mlp=(512, 256, 64),
                    top_mlp=(1024, 1024, 512, 256, 1), embedding_impl="xla")


@dataclasses.dataclass
class _Model:
  graphdef: Any
  treedef: Any
  leaves: list
  axes: list
  shapes: list
  num_dense: int
  num_sparse: int

  def module(self, leaves):
    import jax
    from flax import nnx
    return nnx.merge(self.graphdef, jax.tree.unflatten(self.treedef, leaves))


def _build_dlrm(quick: bool) -> _Model:
  import jax
  from flax import nnx
  from models.dlrm import DLRM

  cfg = _dlrm_config(quick)
  graphdef, state = nnx.split(nnx.jit(lambda: DLRM(cfg, rngs=nnx.Rngs(0)))())
  variables = jax.tree.leaves(state, is_leaf=lambda x: isinstance(x, nnx.Variable))
  leaves, treedef = jax.tree.flatten(state)
  axes = [v.get_metadata().get("logical_axes") for v in variables]
  return _Model(graphdef, treedef, leaves, axes, [tuple(x.shape) for x in leaves],
                cfg.num_dense, cfg.num_sparse)


def _step_fn(model: _Model, placement, mesh) -> Callable:
  """`fn(params, dense, sparse) -> prob` for `serving_params`' layout. Table-wise: the fused
  lookup gives [B, F, D] and the model runs `from_embeddings` (its tables unused)."""
  if placement is None:
    return lambda params, dense, sparse: model.module(params)(dense, sparse)["prob"]
  tables = set(placement.leaf_index)

  def fn(params, dense, sparse):
    emb = placement.lookup(params[-1], sparse, mesh)
    rest = iter(params[:-1])
    leaves = [params[-1] if i in tables else next(rest) for i in range(len(model.leaves))]
    return model.module(leaves).from_embeddings(emb, dense)["prob"]

  return fn


def _export_bundle(model: _Model, buckets: tuple[int, ...], out: str) -> pathlib.Path:
  """The benchmark model as a serving bundle (with its from-embeddings artifact), once per run."""
  import export

  repo = pathlib.Path(tempfile.mkdtemp(prefix="bundle-", dir=_mkdir(out)))
  t0 = time.perf_counter()
  path = export.export_model(
      model.module(model.leaves), repository=repo, name="dlrm", version=1,
      inputs=[export.Input("dense", "float32", ("batch", model.num_dense)),
              export.Input("sparse", "int32", ("batch", model.num_sparse))],
      config=export.ExportConfig(batch_buckets=buckets))
  _log(f"exported {path} in {time.perf_counter() - t0:.1f}s")
  return path


def _mkdir(path: str) -> str:
  pathlib.Path(path).mkdir(parents=True, exist_ok=True)
  return path


# ---- measurement -----------------------------------------------------------------------------
def _inputs(model: _Model, batch: int, seed: int):
  import numpy as np

  rng = np.random.default_rng(seed)
  dense = rng.normal(size=(batch, model.num_dense)).astype(np.float32)
  sparse = rng.integers(0, 10_000_000, size=(batch, model.num_sparse)).astype(np.int32)
  sparse[rng.random(sparse.shape) < 0.05] = -1
  return dense, sparse


def _bench_strategy(strategy: str, n: int, model: _Model, buckets: tuple[int, ...],
                    reps: int) -> dict[str, Any]:
  import jax
  from sharding import ShardingPlan, per_device_bytes, serving_params

  plan = ShardingPlan.create(strategy, n)
  replicas = []
  t0 = time.perf_counter()
  for mesh, p in plan.placements():
    params, shardings, placement = serving_params(p, model.leaves, model.axes, model.shapes)
    replicas.append((mesh, p, params, shardings, placement))
  place_s = time.perf_counter() - t0
  by_device = {}
  for *_, params, _, _ in replicas:
    for d, b in per_device_bytes(params).items():
      by_device[d] = by_device.get(d, 0) + b
  _log(f"  placed on {len(by_device)} device(s) in {place_s:.1f}s;"
       f" params/device {max(by_device.values()) / 2**20:.1f} MiB max")

  def compile_bucket(b: int) -> list:
    execs = []
    for mesh, p, params, shardings, placement in replicas:
      in_sh = p.input_sharding(2, batch=b)
      jitted = jax.jit(_step_fn(model, placement, mesh), in_shardings=(shardings, in_sh, in_sh),
                       out_shardings=p.output_sharding(2, batch=b))
      compiled = jitted.lower(params, jax.ShapeDtypeStruct((b, model.num_dense), "float32"),
                              jax.ShapeDtypeStruct((b, model.num_sparse), "int32")).compile()
      execs.append((compiled, compiled, params, in_sh))
    return execs

  row = _measure(strategy, n, plan, len(replicas), by_device, place_s, model, buckets, reps,
                 compile_bucket)
  del replicas
  gc.collect()
  return row


def _bench_bundle(strategy: str, n: int, model: _Model, path: pathlib.Path,
                  buckets: tuple[int, ...], reps: int) -> dict[str, Any]:
  """The strategy as the server runs it: BundleEngine on `serving.repository.placement`'s placements."""
  from bundle import read_manifest
  from serving.engines import BundleEngine
  from serving.repository.placement import placements_for
  from serving.repository import ModelServingConfig
  from sharding import ShardingPlan, per_device_bytes

  manifest = read_manifest(path)
  t0 = time.perf_counter()
  engine = BundleEngine(path, manifest=manifest, placements=placements_for(
      ModelServingConfig(sharding=strategy, devices=n), manifest))
  compile_times: dict[int, float] = {}

  def progress(msg: str) -> None:  # "replica r: bucket     b compiled in 0.21s"
    if "compiled in" in msg and "bucket" in msg:
      b = int(msg.split("bucket")[1].split()[0])
      compile_times[b] = compile_times.get(b, 0.0) + float(msg.rsplit(" ", 1)[1].rstrip("s"))

  engine.warmup(progress=progress)
  load_s = time.perf_counter() - t0
  by_device: dict[Any, int] = {}
  for params, _ in engine.replicas:
    for d, b in per_device_bytes(params).items():
      by_device[d] = by_device.get(d, 0) + b
  place_s = load_s - sum(compile_times.values())
  _log(f"  bundle loaded on {len(by_device)} device(s) in {load_s:.1f}s;"
       f" params/device {max(by_device.values()) / 2**20:.1f} MiB max")

  def compile_bucket(b: int) -> list:
    execs = []
    for placement, (params, compiled) in zip(engine.placements, engine.replicas):
      in_sh = engine.batch_sharding(placement, engine.inputs[0], b)
      exe = compiled[b]
      execs.append((lambda params, d, s, exe=exe: exe(params, {"dense": d, "sparse": s}), exe,
                    params, in_sh))
    return execs

  plan = ShardingPlan.create(strategy, n)
  row = _measure(f"{strategy} (bundle)", n, plan, len(engine.placements), by_device, place_s,
                 model, buckets, reps, compile_bucket, compile_times)
  engine.close()
  gc.collect()
  return row


def _measure(label: str, n: int, plan: Any, num_replicas: int, by_device: dict, place_s: float,
             model: _Model, buckets: tuple[int, ...], reps: int, compile_bucket: Callable,
             compile_times: dict[int, float] | None = None) -> dict[str, Any]:
  """Latency and throughput per bucket; `compile_bucket(b)` -> [(fn, compiled, params, in_sh)]
  per replica (`compile_times` when the buckets were compiled earlier, at load)."""
  import jax
  from sharding import collective_stats, peak_memory_bytes

  compile_s = 0.0
  points, hlo_stats, peak = [], None, None
  for b in buckets:
    t0 = time.perf_counter()
    execs = compile_bucket(b)
    dt = compile_times[b] if compile_times else time.perf_counter() - t0
    compile_s += dt
    if b == buckets[-1]:
      hlo_stats = collective_stats(execs[0][1].as_text())
      peak = peak_memory_bytes(execs[0][1])
    execs = [(fn, params, in_sh) for fn, _, params, in_sh in execs]
    # Inputs already placed, as the engine does before dispatch.
    batches = []
    for i in range(max(4, 2 * len(execs))):
      compiled, params, in_sh = execs[i % len(execs)]
      dense, sparse = _inputs(model, b, seed=i)
      batches.append((compiled, params, jax.device_put(dense, in_sh), jax.device_put(sparse, in_sh)))
    for compiled, params, dense, sparse in batches[:len(execs)]:  # warm every replica
      jax.block_until_ready(compiled(params, dense, sparse))
    lat = []
    compiled, params, dense, sparse = batches[0]
    for _ in range(reps):
      t = time.perf_counter()
      jax.block_until_ready(compiled(params, dense, sparse))
      lat.append(time.perf_counter() - t)
    # One batch in flight per replica (the scheduler feeds replicas in turn): on CPU, several
    # collective programs in flight on the same virtual devices stall each other.
    rounds = max(1, reps // 2) * len(batches) // len(execs)
    t = time.perf_counter()
    for r in range(rounds):
      group = batches[(r * len(execs)) % len(batches):][:len(execs)]
      jax.block_until_ready([c(p, d, s) for c, p, d, s in group])
    thr = rounds * len(execs) * b / (time.perf_counter() - t)
    points.append({"batch": b, "latency_ms": 1e3 * statistics.median(lat), "rows_per_s": thr})
    _log(f"  bucket {b:5d}: compile {dt:6.2f}s  latency {points[-1]['latency_ms']:8.2f} ms"
         f"  throughput {thr:10.0f} rows/s")
    del batches, execs
  return {
      "strategy": label, "devices": n, "mesh": dict(plan.mesh.shape),
      "replicas": num_replicas,
      "param_bytes_per_device_max": max(by_device.values()),
      "param_bytes_per_device_min": min(by_device.values()),
      "peak_bytes_per_device": peak,
      "collective_count": hlo_stats.total_count,
      "collective_bytes_per_batch": hlo_stats.total_bytes,
      "collectives": {k: [hlo_stats.count[k], hlo_stats.nbytes[k]] for k in hlo_stats.count
                      if hlo_stats.count[k]},
      "latency_ms_batch1": points[0]["latency_ms"],
      "rows_per_s_largest": points[-1]["rows_per_s"],
      "largest_bucket": buckets[-1],
      "compile_s": compile_s,
      "place_s": place_s,
      "points": points,
  }


# ---- output ----------------------------------------------------------------------------------
def _table(rows: list[dict[str, Any]]) -> str:
  mib = lambda x: "-" if x is None else f"{x / 2**20:.1f}"
  head = (f"{'strategy':<26}{'mesh':>7}{'repl':>5}{'params/dev MiB':>16}{'peak/dev MiB':>14}"
          f"{'coll KiB/batch':>16}{'lat@1 ms':>10}{'rows/s@' + str(rows[0]['largest_bucket']):>13}"
          f"{'compile s':>11}")
  lines = [head, "-" * len(head)]
  for r in rows:
    params = mib(r["param_bytes_per_device_max"])
    if r["param_bytes_per_device_min"] != r["param_bytes_per_device_max"]:
      params = f"{mib(r['param_bytes_per_device_min'])}-{params}"
    lines.append(
        f"{r['strategy']:<26}{r['mesh']['data']:>3}x{r['mesh']['model']:<3}{r['replicas']:>5}"
        f"{params:>16}{mib(r['peak_bytes_per_device']):>14}"
        f"{r['collective_bytes_per_batch'] / 1024:>16.1f}{r['latency_ms_batch1']:>10.2f}"
        f"{r['rows_per_s_largest']:>13.0f}{r['compile_s']:>11.1f}")
  return "\n".join(lines)


def _plot(rows: list[dict[str, Any]], path: pathlib.Path, title: str) -> None:
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, ax = plt.subplots(figsize=(7, 4.5))
  for r in rows:
    xs = [p["latency_ms"] for p in r["points"]]
    ys = [p["rows_per_s"] for p in r["points"]]
    ax.plot(xs, ys, marker="o", label=r["strategy"])
    for p in r["points"]:
      ax.annotate(str(p["batch"]), (p["latency_ms"], p["rows_per_s"]), fontsize=7,
                  textcoords="offset points", xytext=(3, 3))
  ax.set_xscale("log")
  ax.set_yscale("log")
  ax.set_xlabel("latency per batch (ms, median)")
  ax.set_ylabel("throughput (rows/s)")
  ax.set_title(title, fontsize=9)
  ax.grid(True, which="both", alpha=0.3)
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def main(argv: list[str] | None = None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--devices", type=int, default=8)
  ap.add_argument("--model", choices=["dlrm"], default="dlrm")
  ap.add_argument("--quick", action="store_true", help="smaller tables, fewer buckets and reps")
  ap.add_argument("--out", default=os.path.join(tempfile.gettempdir(), "xlaserve-bench"))
  ap.add_argument("--strategies", default="", help="comma-separated subset (default: all)")
  ap.add_argument("--from-bundle", action="store_true",
                  help="serve every strategy from an exported bundle through BundleEngine (the"
                  " server's path); by default only embedding_tables gets such a row too")
  args = ap.parse_args(argv)

  import jax

  # Only the CPU backend reads this, so it is harmless where an accelerator exists; it must be
  # set before any backend starts.
  jax.config.update("jax_num_cpu_devices", max(args.devices, 1))
  platform = jax.default_backend()
  if len(jax.devices()) < args.devices:
    raise SystemExit(f"--devices {args.devices}: only {len(jax.devices())} {platform} devices")
  from sharding import STRATEGIES

  strategies = [s for s in args.strategies.split(",") if s] or list(STRATEGIES)
  buckets = (1, 32, 256) if args.quick else (1, 16, 64, 256, 1024)
  reps = 5 if args.quick else 20
  _log(f"{platform}: {args.devices} devices ({jax.devices()[0].device_kind}); building {args.model}")
  t0 = time.perf_counter()
  model = _build_dlrm(args.quick)
  total = sum(x.nbytes for x in model.leaves)
  _log(f"{args.model}: {len(model.leaves)} params, {total / 2**20:.1f} MiB"
       f" (built in {time.perf_counter() - t0:.1f}s); buckets {buckets}")
  bundled = strategies if args.from_bundle else [s for s in strategies if s == "embedding_tables"]
  bundle = _export_bundle(model, buckets, args.out) if bundled else None
  rows = []
  for i, strategy in enumerate(strategies):
    _log(f"[{i + 1}/{len(strategies)}] {strategy}")
    if not args.from_bundle:
      rows.append(_bench_strategy(strategy, args.devices, model, buckets, reps))
    if strategy in bundled:
      _log(f"[{i + 1}/{len(strategies)}] {strategy} (bundle)")
      rows.append(_bench_bundle(strategy, args.devices, model, bundle, buckets, reps))

  out = pathlib.Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  meta = {"model": args.model, "platform": platform, "device_kind": jax.devices()[0].device_kind,
          "devices": args.devices, "quick": args.quick, "buckets": list(buckets),
          "model_param_bytes": total, "jax": jax.__version__}
  (out / f"sharding_{args.model}.json").write_text(json.dumps({"meta": meta, "rows": rows},
                                                               indent=1))
  _plot(rows, out / f"sharding_{args.model}.png",
        f"{args.model} ({total / 2**20:.0f} MiB) on {args.devices} x {platform}")
  print(f"\n{args.model}: {total / 2**20:.1f} MiB of params on {args.devices} {platform} devices"
        f" ({jax.devices()[0].device_kind}); collectives at batch {buckets[-1]}")
  print(_table(rows))
  if platform == "cpu":
    print("CPU: virtual devices share the host cores; timings show overheads, not speed-ups.")
  print(f"wrote {out / f'sharding_{args.model}.json'} and {out / f'sharding_{args.model}.png'}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
