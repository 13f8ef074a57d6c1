"""`xlaserve` command line: serve a model repository (or the built-in demo) over gRPC and HTTP."""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import logging
import os
import pathlib
import sys
import threading
import time
from typing import Any, Callable, Mapping

from serving.cli_flags import GPU_GRAPH_FLAGS, ONE_THREAD_SCHEDULE_FLAG, build_parser, server_config

__all__ = ["GPU_GRAPH_FLAGS", "ONE_THREAD_SCHEDULE_FLAG", "build_parser", "gpu_graph_flags", "main",
           "one_thread_schedule_flags", "server_config"]


def _progress(msg: str) -> None:
  print(f"[xlaserve {time.strftime('%H:%M:%S')}] {msg}", flush=True)


class _Heartbeat:
  """Progress lines with a heartbeat: while start-up has been silent for `quiet_s`, says what is
  still running (demo builds, model loads), so a first start never looks hung."""

  def __init__(self, say: Callable[[str], None], quiet_s: float = 10.0):
    self._say, self.quiet_s, self._last = say, quiet_s, time.monotonic()
    self._lock = threading.Lock()  # whole lines: loads and builds report from several threads

  def __call__(self, msg: str) -> None:
    with self._lock:
      self._last = time.monotonic()
      self._say(msg)

  def watch(self, busy: Callable[[], list[str]], done: threading.Event) -> None:
    """Until `done` is set, a thread says what `busy` lists whenever the lines pause."""
    def beat() -> None:
      while not done.wait(1.0):
        quiet = time.monotonic() - self._last
        if quiet >= self.quiet_s and (now := busy()):
          self(f"still working ({quiet:.0f}s since the last line): {'; '.join(now)}")
    threading.Thread(target=beat, name="xlaserve-heartbeat", daemon=True).start()


def _client_example(port: int, records: list[Any]) -> str:
  """A one-line tritonclient call of a served model (the demo DLRM when served, else the first
  READY model whose inputs are all numeric rows), with zeros of the right shapes."""
  from bundle import numpy_dtype

  def fits(rec: Any) -> bool:
    ins = getattr(rec.runner, "inputs", ())
    return rec.runner is not None and bool(ins) and all(
        t.dtype != "object" and t.shape and t.shape[0] == -1 and -1 not in t.shape[1:] for t in ins)
  usable = sorted((r for r in records if fits(r)), key=lambda r: r.name != "dlrm")
  if not usable:
    return f"curl http://127.0.0.1:<http-port>/v2/models/<model> (gRPC on 127.0.0.1:{port})"
  rec = usable[0]
  calls = "".join(
      f"i=g.InferInput('{t.name}',{[2, *t.shape[1:]]},'{t.datatype}');"
      f" i.set_data_from_numpy(np.zeros({(2, *t.shape[1:])},'{numpy_dtype(t.dtype).name}'));"
      " x.append(i); " for t in rec.runner.inputs)
  return ("python -c \"import numpy as np, tritonclient.grpc as g; c=g.InferenceServerClient("
          f"'127.0.0.1:{port}'); x=[]; {calls}r=c.infer('{rec.name}',x);"
          " print({o.name: r.as_numpy(o.name) for o in r.get_response().outputs})\"")


def _configure_logging(args: argparse.Namespace) -> None:
  if args.log_format == "json":
    from serving.telemetry.logs import JsonFormatter
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter())
    logging.basicConfig(level=args.log_level.upper(), handlers=[handler])
  else:
    logging.basicConfig(level=args.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")


class _UsageError(Exception):
  """A flag or environment problem the user must fix: printed, exit code 2."""


def _fail(msg: str) -> None:
  print(f"xlaserve: {msg}", file=sys.stderr)


def _enable_compile_cache(folder: str, say: Callable[[str], None]) -> None:
  """JAX's persistent compilation cache in `folder` ('none' disables it), so restarts skip
  recompiling. A folder that cannot be made or written is no reason not to serve: the server
  starts without the cache (every start compiles every bucket) and says why. (A cache that fills
  up later costs only warnings: JAX does not fail a compile whose cache write fails.)"""
  import jax

  if not folder or folder.lower() == "none":
    return
  cache = pathlib.Path(os.path.expanduser(folder))
  try:
    cache.mkdir(parents=True, exist_ok=True)
    probe = cache / f".xlaserve-probe-{os.getpid()}"
    probe.write_bytes(b"probe")  # writable, and room for a file
    probe.unlink()
  except OSError as e:
    say(f"WARNING: compile cache {cache} is unusable ({e.strerror or e}); serving without it, so"
        " this and every start compile every bucket again. Fix the folder, point"
        " --compile-cache elsewhere, or pass --compile-cache none to silence this.")
    return
  jax.config.update("jax_compilation_cache_dir", str(cache))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def _cpu_sync_dispatch() -> None:
  """Single-device CPU batches run on the thread that dispatches them, not XLA's worker thread
  (computations spanning devices stay asynchronous). Read when JAX makes its CPU client, so
  this runs before anything touches a device."""
  import jax

  jax.config.update("jax_cpu_enable_async_dispatch", False)


def _embedding_cache_at_start(args: argparse.Namespace) -> str | None:
  """Why an embedding cache will serve (the flag, demo or config.json asking for one), or None:
  the default of --cpu-sync-dispatch, decided before anything touches a device."""
  if args.embedding_device_budget is not None:
    return "--embedding-device-budget"
  if args.model_repository is None:
    demo = getattr(args, "demo", None) or ""
    return "--demo dlrm_large" if "dlrm_large" in demo.split(",") else None
  for config in sorted(pathlib.Path(args.model_repository).glob("*/config.json")):
    try:
      if "embedding_cache" in json.loads(config.read_text()):
        return str(config)
    except (OSError, ValueError):
      continue  # the repository's loader reports a broken config.json
  return None


def _choose_dispatch(args: argparse.Namespace, say: Callable[[str], None]) -> bool:
  """Turns CPU sync dispatch on (explicitly, or by default when no embedding cache is asked
  for) before JAX makes its CPU client; returns whether it is on."""
  sync = args.cpu_sync_dispatch
  if sync is None:
    why = _embedding_cache_at_start(args)
    sync = why is None
    if why is not None:
      say(f"CPU batches stay on XLA's worker threads: an embedding cache is configured ({why}),"
          " whose host half overlaps the device step only so; --cpu-sync-dispatch overrides")
  if sync:
    _cpu_sync_dispatch()
    say("CPU batches run on the runner thread that dispatches them (--cpu-sync-dispatch)")
  return sync


def _xla_cpu_threads(threads: int | None, sync: bool, say: Callable[[str], None]) -> None:
  """Sizes XLA's CPU thread pools through PJRT_NPROC, which JAX reads when it makes its CPU
  client (so before anything touches a device); see --xla-cpu-threads. A one-thread pool, however
  it was set, also gets the one-thread schedule."""
  if threads is None and sync and "PJRT_NPROC" not in os.environ:
    threads = 1
  if threads == 0:
    os.environ.pop("PJRT_NPROC", None)
  elif threads is not None:
    os.environ["PJRT_NPROC"] = str(threads)
    say(f"XLA's CPU thread pools: {threads} thread{'s' if threads > 1 else ''} each"
        + (", programs scheduled for one thread" if threads == 1 else "")
        + " (--xla-cpu-threads)")
  if os.environ.get("PJRT_NPROC") == "1":
    os.environ["XLA_FLAGS"] = one_thread_schedule_flags(os.environ)


def one_thread_schedule_flags(env: Mapping[str, str]) -> str:
  """XLA_FLAGS with XLA:CPU's concurrency-optimized scheduler off (unless the user set it):
  with a one-thread pool, a schedule that exposes parallel work only adds hand-offs."""
  return _with_xla_flags(env, (ONE_THREAD_SCHEDULE_FLAG,))


def _repository(args: argparse.Namespace, say: Callable[[str], None]) -> tuple[str, Any]:
  """(the repository to serve, the demo models still to build there or None): the flag's folder,
  or the demo repository, whose missing models a first start builds while it serves (multi-host:
  all of them before it serves)."""
  repo = args.model_repository
  if repo is None:
    from demo.repository import demo_build, ensure_demo_repository
    models = _demo_models(args)
    if args.coordinator is not None:
      return str(ensure_demo_repository(say, tiny=args.demo_tiny, models=models,
                                        table_gib=args.demo_table_gib)), None
    build = demo_build(say, tiny=args.demo_tiny, models=models, table_gib=args.demo_table_gib)
    if not build.names:
      return str(build.repo), None
    say(f"first start: building the demo models {', '.join(build.names)} into {build.repo};"
        " each serves as soon as it is built (ModelReady), the server reports ready once all"
        " are loaded")
    return str(build.repo), build
  if args.demo is not None:
    raise _UsageError("--demo chooses demo models to serve with no --model-repository; drop"
                      " one of the two")
  if not pathlib.Path(repo).is_dir():
    raise _UsageError(f"model repository {repo!r} does not exist. Export a model into it with"
                      " export.export_model(..., repository=DIR), or omit --model-repository to"
                      " serve the demo.")
  return repo, None


def _demo_models(args: argparse.Namespace) -> list[str] | None:
  """The demo models --demo names (None: the standard set); _UsageError for an unknown name
  (listing the valid ones) or a table size that is not positive."""
  from demo.repository import demo_builders

  if args.demo is None:
    return None
  if not args.demo_table_gib > 0:
    raise _UsageError(f"--demo-table-gib must be > 0, got {args.demo_table_gib}")
  models = [m.strip() for m in args.demo.split(",") if m.strip()]
  try:
    demo_builders(models, table_gib=args.demo_table_gib)
  except ValueError as e:
    raise _UsageError(f"--demo {args.demo!r}: {e}") from e
  return models


def _busy(server: Any, build: Any) -> list[str]:
  """What start-up is doing now, for the heartbeat."""
  from serving.repository import State

  now = [f"building demo model {build.current!r}"] if build is not None and build.current else []
  loading = [f"{r.name}/{r.version}" for r in server.repository.records()
             if r.state is State.LOADING]
  return now + ([f"loading (restore, compile, warm up) {', '.join(loading)}"] if loading else [])


def _callbacks(args: argparse.Namespace, repo: str, say: Callable[[str], None],
               multihost: Any) -> tuple[Callable[[Any], None], Callable[[Any], None]]:
  """(on_listening, on_loaded): the progress lines a user sees while the server starts."""
  def listening(s: Any) -> None:
    metrics = (f", Prometheus metrics at http://{args.host}:{s.metrics_port}/metrics"
               if s.metrics_port else "")
    say(f"listening for gRPC on {args.host}:{s.grpc_port}{metrics}")
    if s.http is not None:
      say(f"listening for HTTP/REST (KServe v2) on {s.http.scheme}://{args.host}:{s.http_port}")
    say(f"serving repository {repo}; loading models ...")

  def loaded(s: Any) -> None:
    # What is alive now (JAX, executables: ~10^5 objects) lives as long as the process. Freezing
    # it keeps the cyclic collector from rescanning it: a full collection otherwise stops every
    # thread for ~75 ms, which alone breaks 100 ms deadlines under load (benchmarks/overload.py).
    gc.collect()
    gc.freeze()
    say(f"{gc.get_freeze_count()} start-up objects frozen out of the cyclic collector's scans")
    for rec in s.repository.records():
      say(f"  model {rec.name} v{rec.version}: {rec.state.value} {rec.reason}".rstrip())
    say(f"try it: {_client_example(s.grpc_port, s.repository.records())}")
    if multihost:
      multihost.on_loaded(s)

  return listening, loaded


def gpu_graph_flags(env: Mapping[str, str]) -> str:
  """XLA_FLAGS with the CUDA-graph flags added (those the user set win). XLA reads the
  variable when its backend starts; on CPU the flags are accepted and do nothing."""
  return _with_xla_flags(env, GPU_GRAPH_FLAGS)


def _with_xla_flags(env: Mapping[str, str], defaults: tuple[str, ...]) -> str:
  """XLA_FLAGS with each of `defaults` (name=value) added unless it already names the flag."""
  flags = env.get("XLA_FLAGS", "")
  extra = [f for f in defaults if f.split("=")[0] not in flags]
  return " ".join([flags, *extra]).strip()


def serve(args: argparse.Namespace) -> int:
  from serving.preallocation import configure as configure_preallocation
  prealloc = configure_preallocation(os.environ, preallocate=args.preallocate_device_memory)
  _configure_logging(args)
  if args.gpu_graphs:
    os.environ["XLA_FLAGS"] = gpu_graph_flags(os.environ)
  plain = _progress
  if args.log_format == "json":
    from serving.telemetry.logs import progress_line
    plain = lambda msg: print(progress_line(msg), flush=True)  # noqa: E731
  say = _Heartbeat(plain)
  say(prealloc)
  from serving.frontend.auth import TOKEN_ENV, load_token
  try:
    token = load_token(args.auth_token_file)
  except ValueError as e:
    _fail(str(e))
    return 2
  os.environ.pop(TOKEN_ENV, None)  # not inherited by anything this process starts
  _enable_compile_cache(args.compile_cache, say)
  _xla_cpu_threads(args.xla_cpu_threads, _choose_dispatch(args, say), say)
  multihost = None
  if args.coordinator is not None:  # joins jax.distributed before anything touches a device
    from serving.multihost import start_from_args
    multihost, code = start_from_args(args, say, lambda msg: print(msg, file=sys.stderr))
    if multihost is None:  # a follower, released by the leader (or failed)
      return code
  from serving.kinds import standard_kinds
  from serving.repository import engine_factory_for
  from serving.server import Server
  try:
    repo, build = _repository(args, say)
    config = server_config(args, repo, token)
    kinds = standard_kinds(multihost.factory if multihost else engine_factory_for())
    # A first demo start builds the missing models while it serves each one built.
    server = Server(config, kinds=kinds, progress=say,
                    startup=None if build is None else build.serve_on)
  except (_UsageError, ValueError, RuntimeError) as e:  # RuntimeError: --frontend native unbuilt
    _fail(str(e))
    return 2
  listening, loaded = _callbacks(args, repo, say, multihost)
  say.watch(lambda: _busy(server, build), server.loaded)
  if args.event_loop == "uvloop":
    import uvloop
    run = lambda coro: uvloop.run(coro)  # noqa: E731
  else:
    run = asyncio.run
  try:
    run(server.run(on_listening=listening, on_loaded=loaded))
  except OSError as e:
    _fail(str(e))
    return 1
  return multihost.finish() if multihost else 0


def _export_torch(argv: list[str]) -> int:
  """`xlaserve export-torch ...` runs the exporter in its own process: serving never imports
  `export` or torch, and the exporter's flags and --help are its own (export/torch/cli.py)."""
  import subprocess

  return subprocess.call([sys.executable, "-m", "export.torch.cli", *argv])


def main(argv: list[str] | None = None) -> int:
  argv = sys.argv[1:] if argv is None else list(argv)
  if argv[:1] == ["export-torch"]:
    return _export_torch(argv[1:])
  args = build_parser().parse_args(argv)
  if args.command == "serve":
    return serve(args)
  if args.command == "plan-buckets":
    from serving import plan_buckets
    return plan_buckets.main(args)
  if args.command == "update":
    from serving import update_cli
    return update_cli.main(args)
  if args.command == "profile":
    from serving import profile_cli
    return profile_cli.main(args)
  if args.command == "shadow-report":
    from serving import shadow_cli
    return shadow_cli.main(args)
  raise AssertionError(args.command)


if __name__ == "__main__":
  sys.exit(main())
