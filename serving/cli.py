"""`xlaserve` command line: serve a model repository (or the built-in demo) over gRPC and HTTP."""

from __future__ import annotations

import argparse
import asyncio
import gc
import logging
import os
import pathlib
import sys
import threading
import time
from typing import TYPE_CHECKING, Any, Callable, Mapping

if TYPE_CHECKING:  # the CLI imports serving lazily: --help answers without loading it
  from serving.server import ServerConfig

DEFAULT_COMPILE_CACHE = "~/.cache/xlaserve/jax-compile-cache"


# CUDA graphs (XLA command buffers) for the usual kernel kinds, from the first kernel on.
GPU_GRAPH_FLAGS = ("--xla_gpu_enable_command_buffer=FUSION,CUBLAS,CUBLASLT,CUSTOM_CALL,CUDNN",
                   "--xla_gpu_graph_min_graph_size=1")


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


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
      prog="xlaserve", allow_abbrev=False,
      description="JAX/XLA inference server speaking Triton's (KServe v2) gRPC and HTTP/REST"
      " protocols.")
  sub = parser.add_subparsers(dest="command", required=True)
  serve = sub.add_parser(
      "serve", help="serve a model repository over gRPC and HTTP",
      description="Serve every model in a repository of exported bundles. With no"
      " --model-repository, serves the built-in demo models; a first start builds them one by"
      " one and serves each as soon as it is built (ModelReady turns true per model; server"
      " readiness only once all are loaded).",
      formatter_class=argparse.ArgumentDefaultsHelpFormatter,
      allow_abbrev=False)  # '--auth-token X' must not pass as '--auth-token-file X'

  _add_repository_flags(serve)
  _add_queue_flags(serve)
  _add_placement_flags(serve)
  _add_security_flags(serve)
  _add_runtime_flags(serve)
  return parser


def _add_repository_flags(serve: argparse.ArgumentParser) -> None:
  """Where the models come from and how they load."""
  serve.add_argument("--model-repository", default=None,
                     help="folder of <model>/<version>/ bundles written by export.export_model;"
                     " omit it to serve the built-in demo models")
  serve.add_argument("--host", default="127.0.0.1", help="address to listen on")
  serve.add_argument("--grpc-port", type=int, default=8001,
                     help="gRPC port (Triton/KServe v2 protocol and grpc.health.v1); 0 picks a"
                     " free port")
  serve.add_argument("--http-port", type=int, default=8000,
                     help="HTTP/REST port (KServe v2 / Open Inference Protocol with Triton's"
                     " binary-tensor, generate and repository extensions; same TLS and token as"
                     " gRPC); 0 picks a free port, -1 disables HTTP")
  serve.add_argument("--metrics-port", type=int, default=8002,
                     help="HTTP port for Prometheus metrics at /metrics; 0 picks a free port, -1 disables")
  serve.add_argument("--compile-cache", default=DEFAULT_COMPILE_CACHE,
                     help="JAX persistent compilation cache folder, so restarts skip"
                     " recompiling; 'none' disables it")


def _add_queue_flags(serve: argparse.ArgumentParser) -> None:
  """Per-model batching and queue defaults, and request size limits."""
  serve.add_argument("--max-queue-delay-us", type=int, default=None,
                     help="default longest wait for a fuller batch, in microseconds (per-model"
                     " config.json and the bundle's export setting take precedence)")
  serve.add_argument("--max-queue-rows", type=int, default=65536,
                     help="default per-model queue bound in rows; beyond it requests get"
                     " RESOURCE_EXHAUSTED at once")
  serve.add_argument("--max-queue-requests", type=int, default=None,
                     help="default per-model queue bound in requests (unbounded if omitted);"
                     " a request with a deadline the queue cannot meet is also refused at once")
  serve.add_argument("--default-timeout-us", type=int, default=None,
                     help="default per-model deadline in microseconds for requests that bring"
                     " no Triton 'timeout' parameter (a gRPC deadline still applies); none if"
                     " omitted")
  serve.add_argument("--repository-poll-s", type=float, default=0.0,
                     help="poll the model repository every this many seconds and hot-reload"
                     " changed models (new versions warm up beside the serving ones, then swap"
                     " in); 0 disables polling (RepositoryModelLoad still works)")
  serve.add_argument("--max-rows-per-request", type=int, default=65536,
                     help="largest request (rows) accepted; larger ones get INVALID_ARGUMENT"
                     " (requests above the largest bucket are split, not refused)")
  serve.add_argument("--max-tensor-bytes", type=int, default=64 << 20,
                     help="largest single input tensor in bytes")
  serve.add_argument("--max-message-bytes", type=int, default=64 << 20,
                     help="largest gRPC message in bytes")
  serve.add_argument("--model-load-thread-count", type=int, default=4, metavar="N",
                     help="models loaded (restored, compiled, warmed up) at once at start-up, as"
                     " Triton's flag of the same name; 1 loads them one after another")
  serve.add_argument("--instances", type=int, default=None, metavar="N",
                     help="default batches each model runs at once (Triton's instance_group"
                     " count; per-model config.json 'instance_count' takes precedence); default:"
                     " 2 on CPU, where a second batch uses the cores XLA leaves idle, 1 on GPU")


def _add_placement_flags(serve: argparse.ArgumentParser) -> None:
  """Devices, sharding and multi-host serving."""
  serve.add_argument("--devices", type=int, default=None,
                     help="number of local devices to place each model on (default: 1)")
  serve.add_argument("--sharding", default=None,
                     help="default sharding strategy for models without one in their config"
                     " (replicated, tensor, tensor+data, embedding_rows, embedding_tables;"
                     " embedding_tables needs a bundle whose manifest has a table_lookup, which"
                     " export_model writes for CTR models with categorical tables)")
  serve.add_argument("--coordinator", default=None, metavar="HOST:PORT",
                     help="multi-host serving (jax.distributed): process 0's coordinator address."
                     " Every process gets the same repository (one model); one global mesh"
                     " spans all their devices (--sharding, default embedding_rows); process 0"
                     " serves gRPC and the others run each of its batches in lockstep")
  serve.add_argument("--num-processes", type=int, default=1,
                     help="with --coordinator: number of processes in the group")
  serve.add_argument("--process-id", type=int, default=0,
                     help="with --coordinator: this process's index (0 serves gRPC)")
  serve.add_argument("--local-devices", type=int, default=None,
                     help="with --coordinator: CPU devices in this process (a CPU stand-in for"
                     " the GPUs of a host; default: all local devices)")
  serve.add_argument("--demo-tiny", action="store_true",
                     help="with no --model-repository: serve tiny demo models (fast start,"
                     " for smoke tests)")


def _add_security_flags(serve: argparse.ArgumentParser) -> None:
  """TLS and bearer-token authentication."""
  serve.add_argument("--tls-cert", default=None,
                     help="PEM certificate (chain) file: serve gRPC over TLS (needs --tls-key)")
  serve.add_argument("--tls-key", default=None, help="PEM private key file for --tls-cert")
  serve.add_argument("--auth-token-file", default=None,
                     help="file holding a bearer token; every RPC except liveness/readiness and"
                     " grpc.health must then send metadata 'authorization: Bearer <token>'. The"
                     " token may instead come from $XLASERVE_AUTH_TOKEN; it is never taken as a"
                     " command-line value (visible to every user in the process list)")


def _add_runtime_flags(serve: argparse.ArgumentParser) -> None:
  """Front end, event loop and logging."""
  serve.add_argument("--log-format", choices=("text", "json"), default="text",
                     help="json: one JSON object per log line (with request_id, model, code)"
                     " for log pipelines, progress lines included")
  serve.add_argument("--frontend", choices=("native", "python"), default=None,
                     help="gRPC front end. native: a C++ gRPC server owns the port, parses"
                     " ModelInfer for batched predict models itself and relays every other call"
                     " (streams, admin, health, anything it does not fully understand) to the"
                     " Python servicer; it cuts per-request CPU several-fold. python: grpc.aio"
                     " only. Default: native when the extension was built (it needs"
                     " libgrpc++-dev and pkg-config at install time), else python; TLS always"
                     " uses python")
  serve.add_argument("--batch-queue", choices=("native", "python"), default="native",
                     help="where plain batched models queue and batch with the native front end:"
                     " native (C++: admission, batching and answers without Python per request)"
                     " or python (the Python batcher, for comparison)")
  serve.add_argument("--native-threads", type=int, default=1,
                     help="gRPC completion-queue threads of the native front end")
  serve.add_argument("--gpu-graphs", action=argparse.BooleanOptionalAction, default=True,
                     help="on GPUs, let XLA run even short kernel sequences as CUDA graphs"
                     " (command buffers), against launch-bound small models; adds"
                     f" {' '.join(GPU_GRAPH_FLAGS)} to XLA_FLAGS unless it names them")
  serve.add_argument("--event-loop", choices=("uvloop", "asyncio"), default="uvloop",
                     help="event loop for the gRPC server; uvloop cuts per-request overhead")
  serve.add_argument("--log-level", default="WARNING",
                     help="Python logging level (DEBUG, INFO, WARNING, ERROR)")


def _client_example(port: int) -> str:
  return ("python -c \"import numpy as np, tritonclient.grpc as g; c=g.InferenceServerClient("
          f"'127.0.0.1:{port}'); d=g.InferInput('dense',[2,13],'FP32'); d.set_data_from_numpy("
          "np.random.rand(2,13).astype(np.float32)); s=g.InferInput('sparse',[2,26],'INT64');"
          " s.set_data_from_numpy(np.random.randint(0,10**6,(2,26))); print(c.infer('dlrm',[d,s])"
          ".as_numpy('prob'))\"")


def _configure_logging(args: argparse.Namespace) -> None:
  if args.log_format == "json":
    from serving.telemetry.logs import JsonFormatter
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter())
    logging.basicConfig(level=args.log_level.upper(), handlers=[handler])
  else:
    logging.basicConfig(level=args.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def server_config(args: argparse.Namespace, repo: str, token: str | None) -> ServerConfig:
  """The ServerConfig the parsed flags describe; raises ValueError for inconsistent values."""
  from serving.frontend import codec
  from serving.repository import ModelServingConfig
  from serving.server import ServerConfig

  default_cfg = ModelServingConfig(max_queue_delay_us=args.max_queue_delay_us,
                                   max_queue_rows=args.max_queue_rows,
                                   max_queue_requests=args.max_queue_requests,
                                   default_timeout_us=args.default_timeout_us,
                                   sharding=args.sharding, devices=args.devices,
                                   instance_count=args.instances)
  return ServerConfig(
      model_repository=repo, host=args.host, grpc_port=args.grpc_port,
      metrics_port=args.metrics_port, http_port=args.http_port,
      max_message_bytes=args.max_message_bytes,
      limits=codec.Limits(max_rows=args.max_rows_per_request,
                          max_tensor_bytes=args.max_tensor_bytes),
      default_model_config=default_cfg, repository_poll_s=args.repository_poll_s,
      tls_cert_file=args.tls_cert, tls_key_file=args.tls_key, auth_token=token,
      frontend=args.frontend or "auto", native_threads=args.native_threads,
      batch_queue=args.batch_queue,
      model_load_threads=args.model_load_thread_count)


class _UsageError(Exception):
  """A flag or environment problem the user must fix: printed, exit code 2."""


def _fail(msg: str) -> None:
  print(f"xlaserve: {msg}", file=sys.stderr)


def _enable_compile_cache(folder: str) -> None:
  """JAX's persistent compilation cache in `folder` ('none' disables it), so restarts skip
  recompiling."""
  import jax

  if not folder or folder.lower() == "none":
    return
  cache = pathlib.Path(os.path.expanduser(folder))
  cache.mkdir(parents=True, exist_ok=True)
  jax.config.update("jax_compilation_cache_dir", str(cache))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def _repository(args: argparse.Namespace, say: Callable[[str], None]) -> tuple[str, Any]:
  """(the repository to serve, the demo models still to build there or None): the flag's folder,
  or the demo repository, whose missing models a first start builds while it serves (multi-host:
  all of them before it serves)."""
  repo = args.model_repository
  if repo is None:
    from demo.repository import demo_build, ensure_demo_repository
    if args.coordinator is not None:
      return str(ensure_demo_repository(say, tiny=args.demo_tiny)), None
    build = demo_build(say, tiny=args.demo_tiny)
    if not build.names:
      return str(build.repo), None
    say(f"first start: building the demo models {', '.join(build.names)} into {build.repo};"
        " each serves as soon as it is built (ModelReady), the server reports ready once all"
        " are loaded")
    return str(build.repo), build
  if not pathlib.Path(repo).is_dir():
    raise _UsageError(f"model repository {repo!r} does not exist. Export a model into it with"
                      " export.export_model(..., repository=DIR), or omit --model-repository to"
                      " serve the demo.")
  return repo, None


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
    say(f"try it: {_client_example(s.grpc_port)}")
    if multihost:
      multihost.on_loaded(s)

  return listening, loaded


def gpu_graph_flags(env: Mapping[str, str]) -> str:
  """XLA_FLAGS with the CUDA-graph flags added (those the user set win). XLA reads the
  variable when its backend starts; on CPU the flags are accepted and do nothing."""
  flags = env.get("XLA_FLAGS", "")
  extra = [f for f in GPU_GRAPH_FLAGS if f.split("=")[0] not in flags]
  return " ".join([flags, *extra]).strip()


def serve(args: argparse.Namespace) -> int:
  _configure_logging(args)
  if args.gpu_graphs:
    os.environ["XLA_FLAGS"] = gpu_graph_flags(os.environ)
  plain = _progress
  if args.log_format == "json":
    from serving.telemetry.logs import progress_line
    plain = lambda msg: print(progress_line(msg), flush=True)  # noqa: E731
  say = _Heartbeat(plain)
  from serving.frontend.auth import TOKEN_ENV, load_token
  try:
    token = load_token(args.auth_token_file)
  except ValueError as e:
    _fail(str(e))
    return 2
  os.environ.pop(TOKEN_ENV, None)  # not inherited by anything this process starts
  _enable_compile_cache(args.compile_cache)
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


def main(argv: list[str] | None = None) -> int:
  args = build_parser().parse_args(argv)
  if args.command == "serve":
    return serve(args)
  raise AssertionError(args.command)


if __name__ == "__main__":
  sys.exit(main())
