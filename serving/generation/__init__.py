"""Generative serving: continuous batching over a paged KV cache, token events streamed to callers.

Request path: `GenerationService.submit` (service.py) -> `Scheduler` decisions (scheduler.py,
pages.py; or chunked prefill and prefix caching: chunking.py, prefix_cache.py; speculative
decoding: speculative.py, ngram.py; plain Python, importable without JAX) -> `BundleEngine`
(engine.py: exported prefill/decode + sampling.py, or verify + spec_sampling.py, compiled once
per shape at load). Names are re-exported lazily,
so `import serving.generation.scheduler` loads neither JAX nor the engine.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "BundleEngine": "engine",
    "ChunkConfig": "chunking",
    "ChunkedScheduler": "chunking",
    "DecodeBatch": "scheduler",
    "Engine": "engine_api",
    "FinishReason": "request",
    "GenerateSpec": "engine_api",
    "GenerationEvent": "request",
    "GenerationRequest": "request",
    "GenerationService": "service",
    "MockEngine": "mock_engine",
    "PagePool": "pages",
    "PrefillBatch": "scheduler",
    "PrefixCachePool": "prefix_cache",
    "PrefillBucket": "scheduler",
    "RequestHandle": "request",
    "RequestMetrics": "request",
    "SamplingParams": "request",
    "Scheduler": "scheduler",
    "SchedulerConfig": "scheduler",
    "ServiceConfig": "service",
    "SpeculativeConfig": "speculative",
    "SpeculativeScheduler": "speculative",
    "mock_spec": "mock_engine",
    "pages_for": "pages",
    "sample_tokens": "sampling",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
  if name in _EXPORTS:
    return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
  raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
