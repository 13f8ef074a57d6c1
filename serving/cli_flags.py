"""`xlaserve serve`'s flags (argparse) and the ServerConfig they describe."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # the CLI imports serving lazily: --help answers without loading it
  from serving.server import ServerConfig

DEFAULT_COMPILE_CACHE = "~/.cache/xlaserve/jax-compile-cache"

# CUDA graphs (XLA command buffers) for the usual kernel kinds, from the first kernel on.
GPU_GRAPH_FLAGS = ("--xla_gpu_enable_command_buffer=FUSION,CUBLAS,CUBLASLT,CUSTOM_CALL,CUDNN",
                   "--xla_gpu_graph_min_graph_size=1")
# With a one-thread XLA:CPU pool: schedule each program for one thread (a third of the CPU).
ONE_THREAD_SCHEDULE_FLAG = "--xla_cpu_enable_concurrency_optimized_scheduler=false"


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
  _add_tracing_flags(serve)
  from serving import cli_flags_generation, plan_buckets, profile_cli, shadow_cli, update_cli
  cli_flags_generation.add_generation_flags(serve)
  plan_buckets.add_parser(sub)
  update_cli.add_parser(sub)
  profile_cli.add_parser(sub)
  shadow_cli.add_parser(sub)
  sub.add_parser(  # handed whole to `python -m export.torch.cli` (serving never imports export)
      "export-torch", add_help=False,
      help="write a bundle from a torch.export archive (MODEL.pt2); see"
      " `xlaserve export-torch --help` for its flags")
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
  serve.add_argument("--http-read-timeout-s", type=float, default=30.0,
                     help="an HTTP request must arrive whole (head and body) within this many"
                     " seconds of its first byte, or it gets 408 and the connection closes")
  serve.add_argument("--http-idle-timeout-s", type=float, default=60.0,
                     help="a keep-alive HTTP connection with no request for this many seconds is"
                     " closed (0: never); keep it above your load balancer's idle timeout")
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
  serve.add_argument("--latency-slo-ms", type=float, default=None,
                     help="default per-model latency target (p99): requests the queue cannot"
                     " finish within it are refused at once with RESOURCE_EXHAUSTED, none waits"
                     " longer than it, and batches are sized to it (config.json"
                     " latency_slo_ms overrides); none if omitted")
  serve.add_argument("--max-queue-wait-ms", type=float, default=1000.0,
                     help="for models without a latency target: longest an admitted request"
                     " waits unstarted, and the bound admission estimates against; the excess"
                     " gets RESOURCE_EXHAUSTED at once; 0 disables")
  serve.add_argument("--auto-bucket-max-rows", type=int, default=None, metavar="ROWS",
                     help="default per-model limit for growing the largest batch bucket at"
                     " load: buckets above it are compiled while batch time stays nearly flat"
                     " (each doubling of rows at most 1.5x the time), as on accelerators"
                     " where a batch costs one launch at any size; 0 disables; default 4096 on"
                     " accelerators, off on CPU (config.json auto_bucket_max_rows overrides)")
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
                     " export_model writes for CTR models with categorical tables; generate"
                     " models take tensor: heads, MLP and KV cache split over --devices)")
  serve.add_argument("--embedding-device-budget", default=None, metavar="SIZE",
                     help="device memory (e.g. 512MiB, 2GiB) the embedding tables of each model"
                     " may take, for models whose config.json sets no embedding_cache: tables"
                     " that do not fit are cached (hottest rows on the device, the table in"
                     " host memory); default: every table on the device")
  serve.add_argument("--device-memory-budget", default=None, metavar="SIZE",
                     help="device memory (e.g. 2GiB) every loaded model version may hold"
                     " together on each device: params, compiled code and scratch, measured"
                     " after warm-up; a load beyond it is refused (RESOURCE_EXHAUSTED, naming"
                     " the versions holding the device) and the others keep serving; default:"
                     " no cap")
  serve.add_argument("--preallocate-device-memory", action="store_true",
                     help="let JAX take 75%% of each accelerator's memory at start (its"
                     " default); without it the server sets XLA_PYTHON_CLIENT_PREALLOCATE=false"
                     " (unless already set) so memory is allocated as models load")
  serve.add_argument("--embedding-host", default="memory", choices=("memory", "mmap"),
                     help="where cached tables live in full: host memory, or memory-mapped from"
                     " a raw copy written beside the bundle (tables larger than host memory)")
  serve.add_argument("--coordinator", default=None, metavar="HOST:PORT",
                     help="multi-host serving (jax.distributed): process 0's coordinator address."
                     " Every process gets the same repository (one model); one global mesh"
                     " spans all their devices (--sharding, default embedding_rows); process 0"
                     " serves gRPC and the others run each of its batches in lockstep")
  serve.add_argument("--num-processes", type=int, default=1,
                     help="with --coordinator: number of processes in the group")
  serve.add_argument("--process-id", type=int, default=0,
                     help="with --coordinator: this process's index (0 serves gRPC)")
  serve.add_argument("--heartbeat-timeout-s", type=int, default=10,
                     help="with --coordinator: a process the group has not heard from this long"
                     " is gone. The leader then answers UNAVAILABLE, turns not ready, and"
                     " restarts itself to re-form the group, serving again once every process"
                     " is back; a follower whose leader is gone exits")
  serve.add_argument("--local-devices", type=int, default=None,
                     help="with --coordinator: CPU devices in this process (a CPU stand-in for"
                     " the GPUs of a host; default: all local devices)")
  serve.add_argument("--demo-tiny", action="store_true",
                     help="with no --model-repository: serve tiny demo models (fast start,"
                     " for smoke tests)")
  serve.add_argument("--demo", default=None, metavar="MODELS",
                     help="with no --model-repository: the demo models to serve, comma-separated"
                     " (default: the standard set, every demo model but dlrm_large). dlrm_large,"
                     " a DLRM with several GiB of generated embedding tables (a few huge ones"
                     " hold most bytes), is built and served only when named here; serve it with"
                     " --embedding-device-budget. Each selection is its own cached repository")
  serve.add_argument("--demo-table-gib", type=float, default=4.0, metavar="GIB",
                     help="with --demo dlrm_large: GiB of float32 embedding tables it generates"
                     " (its first start writes about as much to disk, ~10 s a GiB on 2 cores)")


def _add_security_flags(serve: argparse.ArgumentParser) -> None:
  """TLS and bearer-token authentication."""
  serve.add_argument("--tls-cert", default=None,
                     help="PEM certificate (chain) file: serve gRPC over TLS (needs --tls-key)")
  serve.add_argument("--tls-key", default=None, help="PEM private key file for --tls-cert")
  serve.add_argument("--tls-reload-s", type=float, default=60.0,
                     help="the native gRPC front end re-reads --tls-cert and --tls-key this often,"
                     " so a renewed certificate serves new connections without a restart")
  serve.add_argument("--auth-token-file", default=None,
                     help="file holding a bearer token; every RPC except liveness/readiness and"
                     " grpc.health must then send metadata 'authorization: Bearer <token>'. The"
                     " token may instead come from $XLASERVE_AUTH_TOKEN; it is never taken as a"
                     " command-line value (visible to every user in the process list)")
  serve.add_argument("--tls-client-ca", default=None, metavar="FILE",
                     help="PEM CA bundle: mutual TLS on the gRPC port (and HTTPS); a client must"
                     " present a certificate signed by it. Re-read with --tls-reload-s")
  serve.add_argument("--tenants", default=None, metavar="FILE",
                     help="JSON file of tenants (schema: docs/operations.md): each has bearer"
                     " tokens and/or mTLS identities (certificate CN or SAN), requests/s and rows/s"
                     " quotas and a priority. Every call must then come from a tenant"
                     " (UNAUTHENTICATED otherwise); one over a quota gets RESOURCE_EXHAUSTED"
                     " (HTTP 429). Replaces --auth-token-file")
  serve.add_argument("--metrics-tls", action="store_true",
                     help="serve the metrics port over HTTPS with --tls-cert/--tls-key (and, with"
                     " --tls-client-ca, only to scrapers with a client certificate it signed);"
                     " the files are re-read when they change, every --tls-reload-s")


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
                     " libgrpc++-dev, rapidjson-dev and pkg-config at install time), else"
                     " python")
  serve.add_argument("--http-frontend", choices=("native", "python"), default=None,
                     help="HTTP front end. native: a C++ HTTP/1.1 server owns --http-port, answers"
                     " binary-tensor inference (Triton's binary data extension) of natively"
                     " queued models itself and relays every other request to the Python HTTP"
                     " server (uvicorn) on a private unix socket. python: uvicorn owns the port."
                     " Default: native with the native gRPC front end and no TLS, else python")
  serve.add_argument("--batch-queue", choices=("native", "python"), default="native",
                     help="where plain batched models queue and batch with the native front end:"
                     " native (C++: admission, batching and answers without Python per request)"
                     " or python (the Python batcher, for comparison)")
  serve.add_argument("--native-threads", type=int, default=1,
                     help="gRPC completion-queue threads of the native front end")
  serve.add_argument("--native-accept-backlog", type=int, default=1024, metavar="CALLS",
                     help="ModelInfer calls the native front end accepts before their message"
                     " is read; further calls wait inside gRPC (default 1024)")
  serve.add_argument("--native-read-coalesce", action=argparse.BooleanOptionalAction,
                     default=False,
                     help="with a model latency target: when calls arrive fast enough that a"
                     " pause gathers two or more (and two or more are open), the native gRPC"
                     " worker pauses for 2%% of the tightest target (at most 500 us) instead of"
                     " blocking, so arrivals are read together: less CPU per request under"
                     " load (~9%% less server CPU a query on 2 cores), a little more latency;"
                     " never at light load or with one call at a time")
  serve.add_argument("--gpu-graphs", action=argparse.BooleanOptionalAction, default=True,
                     help="on GPUs, let XLA run even short kernel sequences as CUDA graphs"
                     " (command buffers), against launch-bound small models; adds"
                     f" {' '.join(GPU_GRAPH_FLAGS)} to XLA_FLAGS unless it names them")
  serve.add_argument("--cpu-sync-dispatch", action=argparse.BooleanOptionalAction,
                     default=None,
                     help="on CPU, run each single-device batch on the runner thread that"
                     " dispatched it instead of handing it to XLA's worker thread (JAX's"
                     " default): faster for plain models (the runner waits for the batch"
                     " anyway), but an embedding-cached model overlaps its host half with the"
                     " device step only without it. Default: on, unless an embedding cache is"
                     " configured at start (--embedding-device-budget, --demo dlrm_large, or a"
                     " config.json in the repository with embedding_cache)")
  serve.add_argument("--xla-cpu-threads", type=_threads, default=None, metavar="N",
                     help="threads in each of XLA's CPU thread pools (it sets PJRT_NPROC before"
                     " JAX starts; XLA keeps at least one per CPU device). 0: XLA's default,"
                     " one per core. Default: 1 with"
                     " --cpu-sync-dispatch, since each batch then runs on its runner thread and"
                     " the intra-op pool only adds hand-offs (on 2 cores it halved the CPU of a"
                     " light model's batch of 2-64 rows), else a PJRT_NPROC already set, else 0."
                     f" With 1, XLA_FLAGS also gets {ONE_THREAD_SCHEDULE_FLAG} unless it names"
                     " it: a 16-row batch of the light model then costs a third of the CPU."
                     " Without --cpu-sync-dispatch the pool also runs the batches, so fewer"
                     " threads than model instances serialises them")
  serve.add_argument("--event-loop", choices=("uvloop", "asyncio"), default="uvloop",
                     help="event loop for the gRPC server; uvloop cuts per-request overhead")
  serve.add_argument("--shutdown-grace-s", type=float, default=30.0,
                     help="on SIGTERM: readiness turns false, new requests get UNAVAILABLE, and"
                     " accepted ones are answered for at most this long before the ports close")
  serve.add_argument("--drain-quiet-s", type=float, default=0.5,
                     help="once drained, the ports close only after this long without a new"
                     " request (each refused with UNAVAILABLE), within the grace: set it above"
                     " the time your load balancer takes to drop a replica that is not ready")
  serve.add_argument("--profile-dir", default=None,
                     help="where `xlaserve profile` captures (POST /v2/admin/profile) write their"
                     " jax.profiler traces; default: a folder under the system's temp dir")
  serve.add_argument("--log-level", default="WARNING",
                     help="Python logging level (DEBUG, INFO, WARNING, ERROR)")


def _add_tracing_flags(serve: argparse.ArgumentParser) -> None:
  """OpenTelemetry tracing (serving/telemetry/tracing.py)."""
  serve.add_argument("--otlp-endpoint", default=None, metavar="HOST:PORT",
                     help="OpenTelemetry collector (OTLP over gRPC, plaintext) to export request"
                     " and batch spans to, e.g. localhost:4317 (Jaeger, otel-collector); none:"
                     " tracing off. A client's sampled W3C traceparent (gRPC metadata or HTTP"
                     " header) is always traced")
  serve.add_argument("--trace-rate", type=float, default=0.0, metavar="RATE",
                     help="fraction (0..1) of requests without a client traceparent that are"
                     " traced; needs --otlp-endpoint")
  serve.add_argument("--trace-service-name", default="xlaserve",
                     help="the service.name resource of the exported spans")


def _embedding_cache(args: argparse.Namespace) -> Any:
  from serving.engines.cached import EmbeddingCacheConfig, parse_bytes

  budget = args.embedding_device_budget
  return EmbeddingCacheConfig(device_budget_bytes=None if budget is None else parse_bytes(budget),
                              host=args.embedding_host)


def _threads(text: str) -> int:
  """--xla-cpu-threads: a whole number, 0 or more."""
  try:
    n = int(text)
  except ValueError:
    n = -1
  if n < 0:
    raise argparse.ArgumentTypeError(f"{text!r}: give 0 (one thread per core) or more threads")
  return n


def _device_budget(size: str | None) -> int | None:
  from serving.engines.cached import parse_bytes

  try:
    return None if size is None else parse_bytes(size)
  except ValueError as e:
    raise ValueError(f"--device-memory-budget: {e}") from None


def server_config(args: argparse.Namespace, repo: str, token: str | None) -> ServerConfig:
  """The ServerConfig the parsed flags describe; raises ValueError for inconsistent values."""
  from serving.frontend import codec
  from serving.repository import ModelServingConfig
  from serving.frontend.tenants import load_tenants
  from serving.server_config import ServerConfig
  from serving.telemetry.tracing import TracingConfig

  default_cfg = ModelServingConfig(max_queue_delay_us=args.max_queue_delay_us,
                                   max_queue_rows=args.max_queue_rows,
                                   max_queue_requests=args.max_queue_requests,
                                   default_timeout_us=args.default_timeout_us,
                                   latency_slo_ms=args.latency_slo_ms,
                                   max_queue_wait_ms=args.max_queue_wait_ms,
                                   auto_bucket_max_rows=args.auto_bucket_max_rows,
                                   sharding=args.sharding, devices=args.devices,
                                   instance_count=args.instances,
                                   embedding_cache=_embedding_cache(args),
                                   chunked_prefill=args.chunked_prefill,
                                   max_num_batched_tokens=args.max_num_batched_tokens,
                                   prefix_caching=args.prefix_caching,
                                   speculative=args.speculative,
                                   num_speculative_tokens=args.num_speculative_tokens,
                                   speculative_model=args.speculative_model)
  return ServerConfig(
      model_repository=repo, host=args.host, grpc_port=args.grpc_port,
      metrics_port=args.metrics_port, http_port=args.http_port,
      http_read_timeout_s=args.http_read_timeout_s, http_idle_timeout_s=args.http_idle_timeout_s,
      max_message_bytes=args.max_message_bytes,
      limits=codec.Limits(max_rows=args.max_rows_per_request,
                          max_tensor_bytes=args.max_tensor_bytes),
      default_model_config=default_cfg, repository_poll_s=args.repository_poll_s,
      tls_cert_file=args.tls_cert, tls_key_file=args.tls_key, tls_reload_s=args.tls_reload_s,
      auth_token=token, tls_client_ca_file=args.tls_client_ca,
      tenants=load_tenants(args.tenants) if args.tenants else (), metrics_tls=args.metrics_tls,
      frontend=args.frontend or "auto", http_frontend=args.http_frontend or "auto",
      native_threads=args.native_threads, native_accept_backlog=args.native_accept_backlog,
      native_read_coalesce=args.native_read_coalesce,
      batch_queue=args.batch_queue,
      model_load_threads=args.model_load_thread_count,
      device_memory_budget_bytes=_device_budget(args.device_memory_budget),
      shutdown_grace_s=args.shutdown_grace_s, drain_quiet_s=args.drain_quiet_s,
      profile_dir=args.profile_dir,
      tracing=TracingConfig(rate=args.trace_rate, otlp_endpoint=args.otlp_endpoint,
                            service_name=args.trace_service_name))
