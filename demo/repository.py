"""Builds the built-in demo model repository (the serving core never imports concrete models).

`xlaserve serve` with no --model-repository serves these; they are exported once
into a cache folder keyed by the recipe, so later starts only load them. A first start builds
them in BUILDERS order, quickest to answer first, while the server already runs (`DemoBuild`),
and the server serves each one as soon as it is written. The LM's trained weights ship in
demo/weights/ (demo/weights.py); it is trained at build time only if they are missing or stale.
`xlaserve serve --demo NAMES` serves a chosen set instead (`demo_builders`), which may include
the models built only on request (ON_REQUEST: `dlrm_large`, several GiB of tables).
"""

from __future__ import annotations

import concurrent.futures
import functools
import hashlib
import logging
import os
import pathlib
import shutil
import threading
import time
from typing import Any, Callable, Sequence

from demo.ads import build_ad_index, build_ads_pipeline
from demo.large_tables import LARGE_TABLE_GIB, build_dlrm_large
from demo.models import build_dcn_v2, build_ranker, build_relevance, build_two_tower
from demo.weights import LM_WEIGHTS

logger = logging.getLogger(__name__)

# v3: CTR bundles carry the from-embeddings artifact (embedding_tables); v4: the LM from the
# shipped int8 weights (demo/weights.py)
DEMO_RECIPE = "demo-v4"

Progress = Callable[[str], None]


def demo_platforms() -> tuple[str, ...]:
  """CPU always (bundles stay portable); CUDA too when this process has a GPU to serve on."""
  import jax

  return ("cpu", "cuda") if jax.default_backend() == "gpu" else ("cpu",)


def demo_cache_root() -> pathlib.Path:
  return pathlib.Path(os.environ.get("XLASERVE_HOME", pathlib.Path.home() / ".cache" / "xlaserve"))


ROW_BUCKETS: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64, 128, 256)
# The light model's batch time is nearly flat up to 1024 rows here (0.1-0.4 ms): larger
# buckets cost one compile each and let a saturated queue run fewer, fuller batches.
LIGHT_BUCKETS: tuple[int, ...] = ROW_BUCKETS + (512, 1024)


def gpu_reserve(buckets: tuple[int, ...], platforms: tuple[str, ...]) -> tuple[int, ...]:
  """For an export with a GPU platform (fixed-batch artifacts), the larger buckets to write too:
  the ones the server would grow to where batch time is nearly flat (an H200 ran the DLRM in
  0.47 ms at every bucket up to 256 rows, docs/gpu.md), so both stop at the same limit."""
  from serving.engines.growth import ACCELERATOR_MAX_ROWS, candidates

  if not any(p in ("cuda", "rocm") for p in platforms):
    return ()
  return candidates(buckets, ACCELERATOR_MAX_ROWS, None)


def build_dlrm(repository: pathlib.Path, *, tiny: bool = False, seed: int = 0,
               quantization: str = "none", platforms: tuple[str, ...] = ("cpu",),
               light: bool = False, progress: Progress | None = None) -> pathlib.Path:
  """Exports the DLRM CTR demo as `<repository>/dlrm/1` (with `light`: the light CTR model as
  `ctr_light`), trained briefly on the synthetic click log of `seed` (models/train.py) so its
  predictions mean something; deterministic for a seed."""
  from models.dlrm import DLRMConfig
  from models.train import TrainConfig, train_demo_dlrm

  import export

  say = progress or (lambda msg: logger.info("%s", msg))
  label = "ctr_light" if light else "dlrm"
  cfg = DLRMConfig.tiny() if tiny else DLRMConfig.light() if light else DLRMConfig.demo()
  train = TrainConfig.tiny() if tiny or light else TrainConfig.demo()
  say(f"{label}: training {train.steps} steps of {train.batch_size} rows of a synthetic click"
      " log, then scoring held-out rows ...")
  model, report = train_demo_dlrm(cfg, seed=seed, train=train,
                                  held_out_rows=4096 if tiny else 20_000)
  buckets = LIGHT_BUCKETS if light and not tiny else ROW_BUCKETS
  say(f"{label}: trained in {report.seconds:.1f}s: held-out AUC {report.held_out_auc:.3f}"
      f" (planted ceiling {report.oracle_auc:.3f}); exporting {len(buckets)} batch buckets ...")
  what = (f"light CTR model: {cfg.num_dense} dense + {cfg.num_sparse} categorical features,"
          " small MLPs (a batch takes ~0.1 ms: the host path sets the ceiling)" if light else
          f"DLRM-style CTR demo: {cfg.num_dense} dense + {cfg.num_sparse} categorical features")
  return export.export_model(
      model, repository=repository, name="ctr_light" if light else "dlrm", version=1,
      inputs=[export.Input("dense", "float32", ("batch", cfg.num_dense)),
              export.Input("sparse", "int64", ("batch", cfg.num_sparse))],
      config=export.ExportConfig(batch_buckets=buckets, quantization=quantization,
                                 max_queue_delay_us=1000, platforms=platforms,
                                 reserve_batch_buckets=gpu_reserve(buckets, platforms)),
      extra={"description": what + ", trained on a synthetic click log (models/synthetic.py)",
             "table_sizes": list(cfg.table_sizes), "seed": seed,
             "training": {"steps": report.steps, "held_out_auc": round(report.held_out_auc, 4),
                          "held_out_log_loss": round(report.held_out_log_loss, 4),
                          "planted_oracle_auc": round(report.oracle_auc, 4)}})


def build_lm(repository: pathlib.Path, *, tiny: bool = False,
             platforms: tuple[str, ...] = ("cpu",), progress: Progress | None = None,
             weights: pathlib.Path | None = LM_WEIGHTS) -> pathlib.Path:
  """Exports the generative demo (byte-level decoder trained on ad copy) as `lm`: the shipped
  trained weights when `weights` holds this recipe's (demo/weights.py), else trained now."""
  import dataclasses

  from demo.weights import trained_lm
  from export.generative import GenerativeExportConfig, export_generative
  from models.decoder import DecoderConfig

  say = progress or (lambda msg: logger.info("%s", msg))
  config = GenerativeExportConfig.tiny() if tiny else GenerativeExportConfig.demo()
  config = dataclasses.replace(config, platforms=platforms)
  model_config = DecoderConfig.tiny() if tiny else DecoderConfig.demo()
  # Weights are shipped for the demo recipe only: the tiny one trains in seconds.
  model, info = trained_lm(model_config, config, say, weights=None if tiny else weights)
  say(f"lm: exporting {len(config.prefill_lengths)} prefill and {len(config.chunk_lengths)} extend"
      " signatures and the decode ...")
  return export_generative(model, repository / "lm" / "1", config, name="lm", extra=info)


def build_ctr_light(repository: pathlib.Path, **kwargs) -> pathlib.Path:
  """Exports the light CTR model as `<repository>/ctr_light/1` (see `build_dlrm`)."""
  return build_dlrm(repository, light=True, **kwargs)


# Build (and so serve) order on a first start: the quickest model to build and load first, the
# flagship `dlrm` (the README's first example) next. Each builder takes
# (repository, *, tiny, platforms, progress).
BUILDERS: dict[str, Callable[..., pathlib.Path]] = {
    "ctr_light": build_ctr_light, "dlrm": build_dlrm, "dcn_v2": build_dcn_v2, "ranker": build_ranker,
    "lm": build_lm, "two_tower": build_two_tower, "relevance": build_relevance,
    "ad_index": build_ad_index, "ads_pipeline": build_ads_pipeline}
# Served only when `--demo` names them: `dlrm_large` writes several GiB (demo/large_tables.py).
ON_REQUEST: tuple[str, ...] = ("dlrm_large",)


def demo_builders(models: Sequence[str] | None = None, *,
                  table_gib: float = LARGE_TABLE_GIB) -> dict[str, Callable[..., pathlib.Path]]:
  """The builders of the demo models `models` names (None: BUILDERS, the standard set), in
  BUILDERS order with the on-request ones last; `table_gib` sizes `dlrm_large`. Raises
  ValueError naming the valid models for an unknown or empty selection."""
  if models is None:
    return dict(BUILDERS)
  catalog = {**BUILDERS, "dlrm_large": functools.partial(build_dlrm_large, table_gib=table_gib)}
  choices = f"choose from {', '.join(catalog)} (default: all but {', '.join(ON_REQUEST)})"
  unknown = [m for m in models if m not in catalog]
  if unknown:
    raise ValueError(f"unknown demo model(s) {', '.join(unknown)}: {choices}")
  if not models:
    raise ValueError(f"no demo model named: {choices}")
  return {name: build for name, build in catalog.items() if name in models}


class DemoBuild:
  """The demo models `repo` still lacks, built in BUILDERS order; `run` hands each to `serve` as
  soon as it is written, so a first start answers with its first model while the rest build."""

  def __init__(self, repo: pathlib.Path, names: list[str], progress: Progress, *,
               tiny: bool = False, platforms: tuple[str, ...] = ("cpu",),
               builders: dict[str, Callable[..., pathlib.Path]] | None = None,
               serve_first: int = 2):
    self.repo, self.names, self.say = repo, names, progress
    self.tiny, self.platforms, self.serve_first = tiny, platforms, serve_first
    self.builders = builders if builders is not None else BUILDERS
    self.current: str | None = None  # the model being built now (for "still working" lines)

  def run(self, serve: Callable[[str], None], *, serve_threads: int = 1,
          stop: threading.Event | None = None) -> None:
    """Builds every model and serves it (`serve(name)`, on `serve_threads` pool threads): the
    first `serve_first` ones before the next build starts (on a few cores a load and a build
    halve each other's speed, and these are what a newcomer calls first), the others while the
    next one builds. A failed build is reported and skipped; RuntimeError names the failed
    ones once the others are served. Once `stop` is set no further model is built."""
    failed = []
    with concurrent.futures.ThreadPoolExecutor(
        max(1, serve_threads), thread_name_prefix="demo-serve") as pool:
      served = []
      for i, name in enumerate(self.names, 1):
        if stop is not None and stop.is_set():
          self.say(f"stopping: {', '.join(self.names[i - 1:])} not built (the next start"
                   " builds them)")
          break
        self.say(f"building demo model {name!r} ({i} of {len(self.names)}) into {self.repo}"
                 " (first start only) ...")
        t0 = time.perf_counter()
        self.current = name
        try:
          self.builders[name](self.repo, tiny=self.tiny, platforms=self.platforms,
                              progress=self.say)
        except Exception as e:  # the other models still build and serve
          logger.exception("building demo model %s failed", name)
          self.say(f"building demo model {name!r} FAILED: {type(e).__name__}: {e}")
          failed.append(name)
          continue
        finally:
          self.current = None
        self.say(f"built {name!r} in {time.perf_counter() - t0:.1f}s")
        served.append(pool.submit(serve, name))
        if len(served) <= self.serve_first:
          served[-1].result()
      for future in served:
        future.result()
    if failed:
      raise RuntimeError(f"demo models not built: {failed} (see the lines above)")

  def serve_on(self, server: Any) -> None:
    """The start-up work of a server (serving/server.py `Server(startup=...)`): builds the
    models, loading each into `server` on its model-load threads; stops building when it stops."""
    self.run(server.load_model, serve_threads=server.config.model_load_threads,
             stop=server.stopping)


def demo_build(progress: Progress, *, tiny: bool = False, root: pathlib.Path | None = None,
               builders: dict[str, Callable[..., pathlib.Path]] | None = None,
               models: Sequence[str] | None = None,
               table_gib: float = LARGE_TABLE_GIB) -> DemoBuild:
  """The demo repository of `models` (`demo_builders`; created if absent) and the models it
  still lacks, in build order; half-written exports (a folder without a manifest) are removed
  first. The server serves every model in a repository, so each selection other than the
  standard set has its own folder, keyed by the names (and `table_gib` with `dlrm_large`)."""
  import jax

  builders = builders if builders is not None else demo_builders(models, table_gib=table_gib)
  platforms = demo_platforms()
  recipe = f"{DEMO_RECIPE}|{jax.__version__}|{tiny}|{','.join(platforms)}"
  if models is not None and list(builders) != list(BUILDERS):
    recipe += f"|models={','.join(builders)}"
  if "dlrm_large" in builders and not tiny:
    recipe += f"|table_gib={table_gib:g}"
  key = hashlib.sha256(recipe.encode()).hexdigest()[:12]
  repo = (root or demo_cache_root()) / f"demo-repo-{key}"
  repo.mkdir(parents=True, exist_ok=True)
  missing = [name for name in builders if not (repo / name / "1" / "manifest.json").exists()]
  for name in missing:
    shutil.rmtree(repo / name, ignore_errors=True)
  return DemoBuild(repo, missing, progress, tiny=tiny, platforms=platforms, builders=builders)


def ensure_demo_repository(progress: Progress, *, tiny: bool = False,
                           root: pathlib.Path | None = None, models: Sequence[str] | None = None,
                           table_gib: float = LARGE_TABLE_GIB) -> pathlib.Path:
  """Returns a repository holding the demo models `models` names (default: the standard set),
  exporting the missing ones first."""
  build = demo_build(progress, tiny=tiny, root=root, models=models, table_gib=table_gib)
  build.run(lambda name: None)
  return build.repo
