"""The embedding cache (serving/engines/cached) under Zipf id traffic, served over gRPC against
every table on the device, in one server run.

  python benchmarks/embedding_cache.py [--alphas 0.8,1.05,1.2] [--ratios 0.01,0.05,0.2,1.0]
                                       [--duration 12] [--warmup 4] [--quick] [--out DIR]

A DLRM bundle whose two 1M-row tables dominate (built once, kept under --out) is served as one
model per cache ratio, all in one repository (the same bundle symlinked, each folder with its
own config.json caching that fraction of the big tables' rows); ratio 1.0 places every table
on the device, so the server runs it as it runs any bundle: the reference. One `xlaserve serve`
process on 127.0.0.1 serves them all, so every ratio is measured against the reference under
the same conditions, in rounds that visit every model in turn.

For each Zipf exponent alpha: a fixed stream of requests (ids Zipf-distributed over each
table's rows, ranks shuffled by a fixed permutation so the hot rows are not the low ids, a few
percent missing ids (-1)), pre-serialized and replayed in order by a closed-loop asyncio gRPC
client (benchmarks/native_loadgen.cc sends one fixed payload, so it cannot replay a stream).
Each model starts the stream from its beginning with a cold cache: --warmup seconds unmeasured,
then its measured rounds. Per (alpha, ratio): served rows/s and its ratio to the reference, p99
latency, unique ids per request and per largest-bucket batch (from the stream), the hit rate
of the ids sent in the measured window (the server's `xlaserve_embedding_*` counters, less the
padding rows, should a server count them; without them, an in-process CachedTablesEngine replaying the
stream), and two oracles holding as many rows as
the cache: the Zipf's truly hottest rows (reachable in steady state), and the stream's own most
frequent rows (an upper bound that also counts first sightings as hits).

On CPU the "device" and the host share memory, so rows/s measures the cache's own overhead
(host-side planning, miss gathering, the assembly step); the issue's bar: at a 20 % cache and
alpha 1.05, at least 0.8 of the all-on-device rows/s. Prints a table, writes
embedding_cache.png and embedding_cache.json to --out.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import pathlib
import re
import sys
import time
import urllib.request

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

from benchmarks.embedding_cache_stream import (BIG_TABLES, BUCKETS, NUM_DENSE,  # noqa: E402
                                               TABLE_SIZES, Stream, make_stream,
                                               oracle_hit_rates)
from benchmarks.loadgen import METHOD, LoadResult, build_request  # noqa: E402


def say(msg: str) -> None:
  print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", flush=True)


# -- the bundle and the repository ---------------------------------------------------------


def ensure_bundle(root: pathlib.Path) -> pathlib.Path:
  """The benchmark's DLRM bundle (version folder), exported into `root`/bundle once."""
  path = root / "bundle" / "embedding_cache" / "1"
  if (path / "manifest.json").exists():
    return path
  from flax import nnx

  import export
  from models.dlrm import DLRM, DLRMConfig

  say(f"exporting the benchmark's DLRM ({sum(TABLE_SIZES):,} table rows) into {path} ...")
  cfg = DLRMConfig(table_sizes=TABLE_SIZES, embed_dim=16, bottom_mlp=(64, 16),
                   top_mlp=(128, 64, 1), embedding_impl="xla")
  return export.export_model(
      DLRM(cfg, rngs=nnx.Rngs(0)), repository=root / "bundle", name="embedding_cache", version=1,
      inputs=[export.Input("dense", "float32", ("batch", NUM_DENSE)),
              export.Input("sparse", "int64", ("batch", len(TABLE_SIZES)))],
      config=export.ExportConfig(batch_buckets=BUCKETS))


def model_name(ratio: float) -> str:
  """The repository's model serving `ratio`: emb_r0200 caches 20 % of the big tables."""
  return f"emb_r{round(ratio * 1000):04d}"


def make_repository(root: pathlib.Path, bundle: pathlib.Path,
                    ratios: list[float]) -> pathlib.Path:
  """`root`/repo with one model per ratio: the bundle symlinked as version 1, and a config.json
  caching `ratio` of each big table's rows (1.0: on the device)."""
  repo = root / "repo"
  for ratio in ratios:
    model = repo / model_name(ratio)
    model.mkdir(parents=True, exist_ok=True)
    link = model / "1"
    if link.is_symlink() or link.exists():
      link.unlink()
    link.symlink_to(bundle.resolve(), target_is_directory=True)
    (model / "config.json").write_text(json.dumps(
        {"embedding_cache": {"cache_ratios": {t: ratio for t in BIG_TABLES}}}, indent=1))
  return repo


def cache_rows(bundle: pathlib.Path, ratio: float) -> dict[int, int]:
  """Feature -> device cache rows, as the server places the tables at `ratio` (plan_tables)."""
  import bundle as bundle_lib
  from serving.engines.cached import EmbeddingCacheConfig, plan_tables

  manifest = bundle_lib.read_manifest(bundle)
  lookup = manifest.signatures["serve"].table_lookup
  plans = plan_tables(lookup, manifest.params,
                      EmbeddingCacheConfig(cache_ratios=tuple((t, ratio) for t in BIG_TABLES)))
  return {p.feature: p.cache_rows for p in plans if p.cache_rows is not None}


# -- load ----------------------------------------------------------------------------------


async def _replay(address: str, prefix: bytes, bodies: list[bytes], start: int,
                  concurrency: int, duration: float, timeout: float) -> tuple:
  """Closed loop: `concurrency` requests in flight, the stream's requests in order from
  `start`, cycled; returns (ok, errors, latencies, next position, seconds, first error)."""
  import grpc

  async with grpc.aio.insecure_channel(address, options=[
      ("grpc.max_receive_message_length", 64 << 20), ("grpc.max_send_message_length", 64 << 20)
  ]) as ch:
    call = ch.unary_unary(METHOD)  # bytes in, bytes out
    ok, errors, lat, cursor, first = 0, {}, [], start, []
    t_start = time.perf_counter()
    end = t_start + duration

    async def loop() -> None:
      nonlocal ok, cursor
      while time.perf_counter() < end:
        body = bodies[cursor % len(bodies)]
        cursor += 1
        t0 = time.perf_counter()
        try:
          await call(prefix + body, timeout=timeout)  # concatenation = protobuf merge
          lat.append(time.perf_counter() - t0)
          ok += 1
        except grpc.aio.AioRpcError as e:
          errors[e.code().name] = errors.get(e.code().name, 0) + 1
          first[:] = first or [f"{e.code().name}: {e.details()}"]

    await asyncio.gather(*(loop() for _ in range(concurrency)))
    return ok, errors, lat, cursor, time.perf_counter() - t_start, "".join(first)


def replay(address: str, model: str, stream: Stream, start: int, *, rows: int, concurrency: int,
           duration: float, timeout: float = 30.0) -> tuple[LoadResult, int]:
  """(LoadResult, next stream position) of replaying `stream` to `model` for `duration` s.
  Raises RuntimeError, with the server's first error, when no request succeeds."""
  prefix = build_request(model, {})
  ok, errors, lat, cursor, seconds, first = asyncio.run(_replay(
      address, prefix, stream.bodies, start, concurrency, duration, timeout))
  if not ok:
    raise RuntimeError(f"{model}: no request succeeded in {seconds:.1f} s ({errors}); first"
                       f" error {first}")
  return LoadResult(seconds, ok, errors, np.array(lat), rows), cursor


# -- hit rates -----------------------------------------------------------------------------


def parse_cache_counters(text: str) -> dict[str, tuple[float, float]]:
  """model -> (lookups, hits) summed over its cached tables, from Prometheus text with the
  server's `xlaserve_embedding_lookups` and `xlaserve_embedding_cache_hits` counters."""
  out: dict[str, list[float]] = {}
  pat = re.compile(r'^xlaserve_embedding_(lookups|cache_hits)(?:_total)?\{([^}]*)\}\s+(\S+)',
                   re.M)
  for kind, labels, value in pat.findall(text):
    model = re.search(r'model="([^"]*)"', labels).group(1)
    out.setdefault(model, [0.0, 0.0])[kind == "cache_hits"] += float(value)
  return {m: (v[0], v[1]) for m, v in out.items()}


def scrape_cache_counters(url: str | None) -> dict[str, tuple[float, float]] | None:
  """`parse_cache_counters` of the server's /metrics; None without a metrics URL or when the
  server exports no embedding cache counters."""
  if url is None:
    return None
  with urllib.request.urlopen(url, timeout=10) as resp:
    return parse_cache_counters(resp.read().decode()) or None


def engine_hit_rate(bundle: pathlib.Path, ratio: float, stream: Stream,
                    warm_fraction: float = 0.3) -> float:
  """Fallback when the server exports no cache counters: an in-process CachedTablesEngine
  replays the stream once, in order, in largest-bucket batches, from a cold cache as the
  server's does; the hit rate of the batches after the first `warm_fraction` of the stream."""
  from serving.engines.cached import CachedTablesEngine, EmbeddingCacheConfig

  engine = CachedTablesEngine(bundle, config=EmbeddingCacheConfig(
      cache_ratios=tuple((t, ratio) for t in BIG_TABLES)))
  engine.warmup()
  b = BUCKETS[-1]
  flat = stream.sparse.reshape(-1, stream.sparse.shape[-1])
  dense = np.zeros((b, NUM_DENSE), np.float32)

  def counters() -> tuple[int, int]:
    stats = [t for t in engine.table_stats() if t["placement"] == "cached"]
    return sum(t["lookups"] for t in stats), sum(t["hits"] for t in stats)

  before = None
  for i in range(0, len(flat) - b + 1, b):
    if before is None and i >= warm_fraction * len(flat):
      before = counters()
    engine.fetch(engine.dispatch(bucket=b, inputs={"dense": dense, "sparse": flat[i:i + b]}))
  after = counters()
  before = before or after
  engine.close()
  return (after[1] - before[1]) / max(after[0] - before[0], 1)


# -- the run -------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
  """The flags; --quick shortens the run (durations, stream) to about two minutes."""
  p = argparse.ArgumentParser(description=" ".join(__doc__.split("\n\n")[0].split()))
  p.add_argument("--alphas", default="0.8,1.05,1.2", help="Zipf exponents, comma-separated")
  p.add_argument("--ratios", default="0.01,0.05,0.2,1.0",
                 help="fractions of the big tables' rows cached on the device, comma-separated;"
                      " 1.0 (added if missing) is every table on the device: the reference")
  p.add_argument("--duration", type=float, default=None,
                 help="measured seconds per (alpha, ratio), split over --rounds (default 12;"
                      " --quick: 4)")
  p.add_argument("--warmup", type=float, default=None,
                 help="unmeasured seconds of the stream per (alpha, ratio) before its first"
                      " round, to warm the cache (default 4; --quick: 2)")
  p.add_argument("--rounds", type=int, default=None,
                 help="measured rounds per alpha; each visits every ratio in turn, so slow"
                      " drift of a shared machine hits them all alike (default 3; --quick: 2)")
  p.add_argument("--request-rows", type=int, default=128, help="rows per request")
  p.add_argument("--concurrency", type=int, default=8, help="requests in flight")
  p.add_argument("--stream-requests", type=int, default=None,
                 help="requests in each alpha's fixed stream, replayed from its start for every"
                      " ratio and cycled if a run outlasts it (default 16384; --quick: 4096)")
  p.add_argument("--missing", type=float, default=0.03, help="fraction of ids sent as -1")
  p.add_argument("--seed", type=int, default=0, help="seed of the streams")
  p.add_argument("--server-args", default="", help="extra flags for xlaserve serve")
  p.add_argument("--out", type=pathlib.Path, default=pathlib.Path("bench_out/embedding_cache"),
                 help="folder for embedding_cache.png/.json; the bundle and repository live"
                      " under it too")
  p.add_argument("--quick", action="store_true", help="a short run (about two minutes)")
  args = p.parse_args(argv)
  args.alphas = [float(a) for a in args.alphas.split(",") if a.strip()]
  ratios = {float(r) for r in args.ratios.split(",") if r.strip()} | {1.0}
  if min(ratios) <= 0:
    p.error("--ratios must be > 0")
  args.ratios = sorted((min(r, 1.0) for r in ratios), reverse=True)  # the reference first
  args.batch_rows = BUCKETS[-1]
  quick = args.quick
  args.duration = args.duration or (4.0 if quick else 12.0)
  args.warmup = args.warmup if args.warmup is not None else (2.0 if quick else 4.0)
  args.rounds = max(1, args.rounds or (2 if quick else 3))
  args.stream_requests = args.stream_requests or (4096 if quick else 16384)
  return args


def measure_alpha(addr: str, metrics_url: str | None, stream: Stream,
                  args: argparse.Namespace) -> dict[float, dict]:
  """Every ratio's served rows/s, latencies and hit rate (None without server counters)
  over `args.rounds` alternating rounds on `stream`."""
  cursor = {r: 0 for r in args.ratios}
  lats = {r: [] for r in args.ratios}
  acc = {r: {"ok": 0, "seconds": 0.0, "errors": {}, "lookups": 0.0, "hits": 0.0, "sent": 0}
         for r in args.ratios}
  valid = stream.valid_per_request
  for r in args.ratios:
    _, cursor[r] = replay(addr, model_name(r), stream, 0, rows=args.request_rows,
                          concurrency=args.concurrency, duration=args.warmup)
  for _ in range(args.rounds):
    for r in args.ratios:
      before, start = scrape_cache_counters(metrics_url), cursor[r]
      res, cursor[r] = replay(addr, model_name(r), stream, cursor[r], rows=args.request_rows,
                              concurrency=args.concurrency, duration=args.duration / args.rounds)
      after = scrape_cache_counters(metrics_url)
      a = acc[r]
      a["ok"] += res.ok
      a["seconds"] += res.seconds
      for k, v in res.errors.items():
        a["errors"][k] = a["errors"].get(k, 0) + v
      lats[r].append(res.latencies_s)
      m = model_name(r)
      if before and after and m in after:
        a["lookups"] += after[m][0] - before.get(m, (0, 0))[0]
        a["hits"] += after[m][1] - before.get(m, (0, 0))[1]
        a["sent"] += int(valid[np.arange(start, cursor[r]) % len(valid)].sum())
  out = {}
  for r, a in acc.items():
    lat = np.concatenate(lats[r]) * 1e3
    out[r] = {"rows_per_s": a["ok"] * args.request_rows / max(a["seconds"], 1e-9),
              "p50_ms": float(np.percentile(lat, 50)) if len(lat) else float("nan"),
              "p99_ms": float(np.percentile(lat, 99)) if len(lat) else float("nan"),
              "requests": a["ok"], "errors": a["errors"], "stream_passes":
              cursor[r] / len(stream.bodies),
              **hit_rates(a["lookups"], a["hits"], a["sent"])}
  return out


def hit_rates(lookups: float, hits: float, sent: int) -> dict[str, float | None]:
  """The hit rate of the ids the benchmark sent, and the server's own. A server that counted
  its batches' padding rows as lookups (before the runners passed real rows) counted
  `lookups - sent` extra lookups, all hits; they are taken out (0 today)."""
  if not lookups or not sent:
    return {"hit_rate": None, "server_hit_rate": None, "padding_lookups": None}
  pad = max(lookups - sent, 0.0)
  return {"hit_rate": max(hits - pad, 0.0) / sent, "server_hit_rate": hits / lookups,
          "padding_lookups": pad / lookups}


def main() -> None:
  from benchmarks.embedding_cache_report import plot, print_table, summarize, write_json
  from benchmarks.serving import start_server

  args = parse_args()
  args.out.mkdir(parents=True, exist_ok=True)
  bundle = ensure_bundle(args.out)
  repo = make_repository(args.out, bundle, args.ratios)
  rows = {r: cache_rows(bundle, r) for r in args.ratios}
  say(f"models {', '.join(model_name(r) for r in args.ratios)} in {repo}; starting the server"
      " (compiles every bucket of every model) ...")
  proc, addr, metrics_url = start_server(repo, args.server_args.split(), metrics=True)
  results, streams = {}, {}
  try:
    for alpha in args.alphas:
      say(f"alpha {alpha}: building a stream of {args.stream_requests} requests ...")
      stream = make_stream(alpha, args.stream_requests, args.request_rows, args.missing,
                           args.seed)
      say(f"alpha {alpha}: {stream.unique_per_request:.1f} unique ids per request of"
          f" {args.request_rows} rows ({stream.unique_per_batch:.1f} per {BUCKETS[-1]} rows)")
      results[alpha] = measure_alpha(addr, metrics_url, stream, args)
      streams[alpha] = dataclasses.replace(stream, bodies=[])  # the payloads are done with
      for r, res in results[alpha].items():
        res["oracle_hit_rate"], res["stream_oracle_hit_rate"] = oracle_hit_rates(stream, rows[r])
        res["hit_rate_source"] = "server metrics" if res["hit_rate"] is not None else None
        hit = "-" if res["hit_rate"] is None else f"{res['hit_rate']:.3f}"
        say(f"alpha {alpha} ratio {r}: {res['rows_per_s']:.0f} rows/s, p99"
            f" {res['p99_ms']:.1f} ms, hit rate {hit}, {res['stream_passes']:.2f} passes over"
            " the stream")
  finally:
    proc.terminate()
    proc.wait(60)
  for alpha, per in results.items():  # no server counters: replay the stream in-process
    for r, res in per.items():
      if res["hit_rate"] is None and rows[r]:
        say(f"alpha {alpha} ratio {r}: no server cache counters; hit rate from an in-process"
            " engine ...")
        res["hit_rate"] = engine_hit_rate(bundle, r, streams[alpha])
        res["hit_rate_source"] = "in-process engine"
      elif not rows[r]:
        res["hit_rate"], res["hit_rate_source"] = 1.0, "all on device"
  summary = summarize(results, streams)
  print_table(summary, args)
  write_json(summary, args, args.out / "embedding_cache.json")
  plot(summary, args, args.out / "embedding_cache.png")
  say(f"wrote {args.out / 'embedding_cache.png'} and {args.out / 'embedding_cache.json'}")


if __name__ == "__main__":
  main()
