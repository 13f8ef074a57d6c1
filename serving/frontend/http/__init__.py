"""The KServe v2 (Open Inference Protocol) HTTP/REST front end, with Triton's extensions.

It serves in the same process and on the same asyncio event loop as the gRPC server, through
the same servicer: `routes.py` (the endpoints), `tensors.py` (JSON and binary tensors <->
the codec's request objects), `generate.py` (Triton's generate / generate_stream),
`jsonproto.py` (protobuf answers as Triton's JSON), `app.py` (the ASGI app: auth, body,
errors), `server.py` (`HttpConfig`, `HttpFrontend`: start and stop).

Library, chosen by measurement (benchmarks/http_libs.py: the same minimal KServe v2 app,
1-row binary infer, `perf_analyzer -i http` at concurrency 16, client and server on the same
2 CPU cores shared with other work, best of 2 rounds; server CPU per request is the steadier
number on a busy machine):

  library                                 req/s (busy)  server CPU us/req   req/s (quieter run)
  aiohttp 3.14 (web.Application, router)     11063            70.0              15394
  aiohttp 3.14 (low-level web.Server)        12579            64.1              16602
  uvicorn 0.54 + httptools, raw ASGI 3       13267            56.1              20055
  the same, one write per response           14201            50.9                  -

uvicorn with httptools cost the least CPU per request in every round, so the app is a plain
ASGI 3 callable with no framework in between, and each response leaves in one write
(server.py); uvicorn runs on the server's loop (its `startup`/`shutdown`, not `serve`, which
would take over the process's signal handlers).
"""

from serving.frontend.http.server import HttpConfig, HttpFrontend

__all__ = ["HttpConfig", "HttpFrontend"]
