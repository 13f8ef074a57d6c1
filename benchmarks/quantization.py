"""Quantized serving of the demo CTR model: accuracy, weight bytes and served throughput per choice.

  python benchmarks/quantization.py [--quick] [--duration 6] [--held-out 50000] [--out DIR]

Trains the demo DLRM on the synthetic click log (models/train.py, as `xlaserve serve` does), then
for every name in export.quantize.QUANTIZATIONS: exports it to a temporary repository, serves it
with `xlaserve serve` in a subprocess, scores a held-out log over gRPC (AUC and log-loss of the
served probabilities, against float32), and drives 32-row requests at saturation with
benchmarks/loadgen.py. Prints a table, writes quantization.json and quantization.png to --out.
Exits non-zero if a choice with int8 in it loses more than 0.001 AUC (a bug, not a result).
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
import tempfile
import time
from typing import TYPE_CHECKING, Any

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

from benchmarks.loadgen import build_request, format_table, run_load  # noqa: E402
from benchmarks.serving import start_server  # noqa: E402

if TYPE_CHECKING:
  from models.dlrm import DLRM, DLRMConfig
  from models.synthetic import ClickLog
  from models.train import TrainReport

AUC_BUDGET = 0.001  # max AUC loss allowed for any choice with int8 in it
BUCKETS = (32, 256)  # 32-row load requests; 256-row scoring requests


def say(msg: str) -> None:
  print(f"[quant {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def score_over_grpc(address: str, model: str, log, rows_per_request: int = 256) -> np.ndarray:
  """Served click probabilities [N] for every row of `log`."""
  import tritonclient.grpc as tc

  out = []
  with tc.InferenceServerClient(address) as client:
    for dense, sparse, _ in log.batches(rows_per_request):
      ins = [tc.InferInput("dense", list(dense.shape), "FP32"),
             tc.InferInput("sparse", list(sparse.shape), "INT64")]
      ins[0].set_data_from_numpy(np.ascontiguousarray(dense))
      ins[1].set_data_from_numpy(np.ascontiguousarray(sparse))
      out.append(client.infer(model, ins).as_numpy("prob")[:, 0])
  return np.concatenate(out)


def bundle_bytes(bundle: pathlib.Path) -> dict[str, int]:
  """Param bytes of a bundle from its manifest: embeddings (a "table_rows" axis) and dense."""
  import ml_dtypes  # noqa: F401  (registers bfloat16 / float8 names with numpy)

  manifest = json.loads((bundle / "manifest.json").read_text())
  out = {"embeddings": 0, "dense": 0}
  for p in manifest["params"]:
    n = int(np.prod(p["shape"])) * np.dtype(p["dtype"]).itemsize
    out["embeddings" if "table_rows" in (p["logical_axes"] or ()) else "dense"] += n
  return out


def main() -> None:
  args = _parse_args()
  duration = args.duration or (3.0 if args.quick else 8.0)
  held_rows = args.held_out or (10_000 if args.quick else 50_000)
  args.out.mkdir(parents=True, exist_ok=True)
  modes = _modes(args.modes)
  cfg, model, report, held, oracle = _train(args.seed, held_rows)

  rng = np.random.default_rng(1)
  idx = rng.integers(0, held_rows, 32)
  with tempfile.TemporaryDirectory(prefix="xlaserve-quant-") as tmp:
    results = [_measure(mode, pathlib.Path(tmp) / mode.replace("+", "_"), model, cfg, held, idx,
                        duration=duration, concurrency=args.concurrency)
               for mode in modes]
  _compare_to_baseline(results)

  print()
  print(f"demo DLRM, held-out synthetic log of {held_rows} rows (planted-model AUC {oracle:.4f});"
        f" served on CPU, 32-row requests at concurrency {args.concurrency}, {duration:.0f}s each")
  print(format_table(*_table(results)))
  bad = [r["quantization"] for r in results
         if "int8" in r["quantization"] and r["auc_delta"] < -AUC_BUDGET]
  summary = {"held_out_rows": held_rows, "oracle_auc": oracle, "seed": args.seed,
             "train_seconds": report.seconds, "duration_s": duration,
             "concurrency": args.concurrency, "buckets": list(BUCKETS),
             "auc_budget_int8": AUC_BUDGET, "over_budget": bad, "results": results}
  (args.out / "quantization.json").write_text(json.dumps(summary, indent=1))
  _plot(results, args.out / "quantization.png")
  say(f"wrote {args.out / 'quantization.json'} and {args.out / 'quantization.png'}")
  if bad:
    say(f"BUG: {bad} lose more than {AUC_BUDGET} AUC against float32")
    sys.exit(1)


def _parse_args() -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--quick", action="store_true",
                      help="short run: 10k held-out rows, 3 s of load per choice")
  parser.add_argument("--duration", type=float, default=None, help="seconds of load per choice")
  parser.add_argument("--held-out", type=int, default=None, help="held-out rows to score")
  parser.add_argument("--concurrency", type=int, default=16, help="32-row requests in flight")
  parser.add_argument("--seed", type=int, default=0, help="model and click-log seed")
  parser.add_argument("--modes", default=None, help="comma-separated subset of QUANTIZATIONS")
  parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path("bench_out/quantization"))
  return parser.parse_args()


def _modes(arg: str | None) -> tuple[str, ...]:
  """The choices to run (all by default), each checked, float32 ("none") first as the baseline."""
  from export.quantize import QUANTIZATIONS, QuantizationSpec

  modes = tuple(arg.split(",")) if arg else QUANTIZATIONS
  for m in modes:
    QuantizationSpec.parse(m)
  if modes[0] != "none":
    modes = ("none",) + tuple(m for m in modes if m != "none")  # float32 is the baseline
  return modes


def _train(seed: int, held_rows: int
           ) -> tuple[DLRMConfig, DLRM, TrainReport, ClickLog, float]:
  """Trains the demo DLRM; returns (config, model, training report, held-out log, oracle AUC)."""
  from models.dlrm import DLRMConfig
  from models.synthetic import ClickLogConfig, PlantedModel, roc_auc
  from models.train import HELD_OUT_STREAM, TrainConfig, train_demo_dlrm

  cfg = DLRMConfig.demo()
  say(f"training the demo DLRM ({sum(cfg.table_sizes):,} table rows, seed {seed}) ...")
  model, report = train_demo_dlrm(cfg, seed=seed, train=TrainConfig.demo(),
                                  held_out_rows=4096)
  say(f"trained in {report.seconds:.1f}s ({report.steps} steps)")
  held = PlantedModel.create(ClickLogConfig.for_dlrm(cfg), seed).sample(
      held_rows, HELD_OUT_STREAM)
  oracle = roc_auc(held.labels, held.logits)
  say(f"held-out log: {held_rows} rows, CTR {held.labels.mean():.3f}, planted-model AUC"
      f" {oracle:.4f}")
  return cfg, model, report, held, oracle


def _measure(mode: str, repo: pathlib.Path, model: DLRM, cfg: DLRMConfig, held: ClickLog,
             idx: np.ndarray, *, duration: float, concurrency: int) -> dict[str, Any]:
  """Exports `model` with quantization `mode` into `repo`, serves it, scores `held`, loads it."""
  import export
  from models.synthetic import log_loss, roc_auc

  held_rows = len(held.labels)
  say(f"[{mode}] exporting ...")
  t0 = time.perf_counter()
  bundle = export.export_model(
      model, repository=repo, name="dlrm", version=1,
      inputs=[export.Input("dense", "float32", ("batch", cfg.num_dense)),
              export.Input("sparse", "int64", ("batch", cfg.num_sparse))],
      config=export.ExportConfig(batch_buckets=BUCKETS, quantization=mode,
                                 max_queue_delay_us=1000))
  export_s = time.perf_counter() - t0
  nbytes = bundle_bytes(bundle)
  say(f"[{mode}] exported in {export_s:.1f}s: embeddings {nbytes['embeddings'] / 2**20:.1f} MiB,"
      f" dense {nbytes['dense'] / 2**10:.1f} KiB; starting the server ...")
  t0 = time.perf_counter()
  proc, addr, _ = start_server(repo, [])
  load_s = time.perf_counter() - t0
  try:
    say(f"[{mode}] scoring {held_rows} held-out rows over gRPC ...")
    p = score_over_grpc(addr, "dlrm", held)
    auc, ll = roc_auc(held.labels, p), log_loss(held.labels, p)
    say(f"[{mode}] AUC {auc:.5f}, log-loss {ll:.5f}; 32-row requests for {duration:.0f}s ...")
    payload = build_request("dlrm", {"dense": held.dense[idx], "sparse": held.sparse[idx]})
    run_load(addr, payload, rows_per_request=32, concurrency=4, duration=0.5)  # warm
    load = run_load(addr, payload, rows_per_request=32, concurrency=concurrency,
                    duration=duration)
    say(f"[{mode}] {load.rows_per_s:,.0f} rows/s, p50 {load.pct_ms(50):.1f} ms,"
        f" p99 {load.pct_ms(99):.1f} ms, errors {sum(load.errors.values())}")
  finally:
    proc.terminate()
    proc.wait(60)
  return {
      "quantization": mode, "auc": auc, "log_loss": ll,
      "embedding_bytes": nbytes["embeddings"], "dense_bytes": nbytes["dense"],
      "rows_per_s": load.rows_per_s, "p50_ms": load.pct_ms(50), "p99_ms": load.pct_ms(99),
      "errors": load.errors, "export_s": export_s, "server_start_s": load_s, "probs": p}


def _compare_to_baseline(results: list[dict[str, Any]]) -> None:
  """Adds deltas against results[0] (float32) to every result; drops the probabilities."""
  base = results[0]
  base_p = base["probs"]
  for r in results:
    r["auc_delta"] = r["auc"] - base["auc"]
    r["log_loss_delta"] = r["log_loss"] - base["log_loss"]
    dp = np.abs(r.pop("probs") - base_p)
    r["mean_abs_dprob"], r["max_abs_dprob"] = float(dp.mean()), float(dp.max())


def _table(results: list[dict[str, Any]]) -> tuple[list[str], list[list[str]]]:
  """(headers, rows) of the printed table; "shrink" is float32 bytes over the choice's."""
  base = results[0]
  headers = ["quantization", "AUC", "dAUC", "log-loss", "dLL", "max|dp|", "emb MiB",
             "dense KiB", "shrink", "rows/s", "p99 ms"]
  f_total = base["embedding_bytes"] + base["dense_bytes"]
  rows = [[r["quantization"], f"{r['auc']:.5f}", f"{r['auc_delta']:+.5f}",
           f"{r['log_loss']:.5f}", f"{r['log_loss_delta']:+.5f}", f"{r['max_abs_dprob']:.4f}",
           f"{r['embedding_bytes'] / 2**20:.1f}", f"{r['dense_bytes'] / 2**10:.1f}",
           f"{f_total / (r['embedding_bytes'] + r['dense_bytes']):.2f}",
           f"{r['rows_per_s']:,.0f}", f"{r['p99_ms']:.1f}"] for r in results]
  return headers, rows


def _plot(results: list[dict[str, Any]], path: pathlib.Path) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  base = results[0]
  names = [r["quantization"] for r in results]
  x = np.arange(len(names))
  fig, (a1, a2, a3) = plt.subplots(1, 3, figsize=(16, 4.8))
  a1.bar(x, [r["auc_delta"] * 1e3 for r in results], color="C0")
  a1.axhline(-AUC_BUDGET * 1e3, color="C3", ls="--", label="int8 budget (-0.001)")
  a1.set_ylabel("AUC - float32 AUC (x 1e-3)")
  a1.set_title(f"accuracy (float32 AUC {base['auc']:.4f})")
  a1.legend()
  a2.bar(x - 0.2, [r["embedding_bytes"] / 2**20 for r in results], 0.4, label="embeddings (MiB)")
  a2.bar(x + 0.2, [r["dense_bytes"] / 2**10 for r in results], 0.4, label="dense (KiB)")
  a2.set_title("weight bytes")
  a2.legend()
  a3.bar(x, [r["rows_per_s"] for r in results], color="C2")
  a3.set_ylabel("rows/s")
  a3.set_title("served throughput (32-row requests, CPU)")
  for a in (a1, a2, a3):
    a.set_xticks(x, names, rotation=30, ha="right")
  fig.tight_layout()
  fig.savefig(path, dpi=110)


if __name__ == "__main__":
  main()
