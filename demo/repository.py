"""Builds the built-in demo model repository (the serving core never imports concrete models).

`xlaserve serve` with no --model-repository serves these; they are exported once
into a cache folder keyed by the recipe, so later starts only load them.
"""

from __future__ import annotations

import hashlib
import logging
import os
import pathlib
import shutil
import time
from typing import Callable

from demo.models import build_dcn_v2, build_relevance, build_two_tower

logger = logging.getLogger(__name__)

DEMO_RECIPE = "demo-v3"  # v3: CTR bundles carry the from-embeddings artifact (embedding_tables)


def demo_platforms() -> tuple[str, ...]:
  """CPU always (bundles stay portable); CUDA too when this process has a GPU to serve on."""
  import jax

  return ("cpu", "cuda") if jax.default_backend() == "gpu" else ("cpu",)


def demo_cache_root() -> pathlib.Path:
  return pathlib.Path(os.environ.get("XLASERVE_HOME", pathlib.Path.home() / ".cache" / "xlaserve"))


def build_dlrm(repository: pathlib.Path, *, tiny: bool = False, seed: int = 0,
               quantization: str = "none", platforms: tuple[str, ...] = ("cpu",)) -> pathlib.Path:
  """Exports the DLRM CTR demo as `<repository>/dlrm/1`, trained briefly on the synthetic click log
  of `seed` (models/train.py) so its predictions mean something; deterministic for a seed."""
  from models.dlrm import DLRMConfig
  from models.train import TrainConfig, train_demo_dlrm

  import export

  cfg = DLRMConfig.tiny() if tiny else DLRMConfig.demo()
  model, report = train_demo_dlrm(
      cfg, seed=seed, train=TrainConfig.tiny() if tiny else TrainConfig.demo(),
      held_out_rows=4096 if tiny else 20_000)
  logger.info("demo DLRM trained in %.1fs: held-out AUC %.3f (planted ceiling %.3f)",
              report.seconds, report.held_out_auc, report.oracle_auc)
  return export.export_model(
      model, repository=repository, name="dlrm", version=1,
      inputs=[export.Input("dense", "float32", ("batch", cfg.num_dense)),
              export.Input("sparse", "int64", ("batch", cfg.num_sparse))],
      config=export.ExportConfig(batch_buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256),
                                 quantization=quantization, max_queue_delay_us=1000,
                                 platforms=platforms),
      extra={"description": "DLRM-style CTR demo: 13 dense + 26 categorical features, trained on"
                            " a synthetic click log (models/synthetic.py)",
             "table_sizes": list(cfg.table_sizes), "seed": seed,
             "training": {"steps": report.steps, "held_out_auc": round(report.held_out_auc, 4),
                          "held_out_log_loss": round(report.held_out_log_loss, 4),
                          "planted_oracle_auc": round(report.oracle_auc, 4)}})


def build_lm(repository: pathlib.Path, *, tiny: bool = False,
             platforms: tuple[str, ...] = ("cpu",)) -> pathlib.Path:
  """Exports the generative demo (byte-level decoder trained briefly on ad copy) as `lm`."""
  import dataclasses

  from export.generative import GenerativeExportConfig, build_bundle
  from models.decoder import DecoderConfig

  config = GenerativeExportConfig.tiny() if tiny else GenerativeExportConfig()
  config = dataclasses.replace(config, platforms=platforms)
  if tiny:
    return build_bundle(repository / "lm" / "1", model_config=DecoderConfig.tiny(),
                        config=config, name="lm")
  return build_bundle(repository / "lm" / "1", config=config, name="lm")


BUILDERS: dict[str, Callable[..., pathlib.Path]] = {
    "dlrm": build_dlrm, "relevance": build_relevance, "dcn_v2": build_dcn_v2,
    "two_tower": build_two_tower, "lm": build_lm}


def ensure_demo_repository(progress: Callable[[str], None], *, tiny: bool = False,
                           root: pathlib.Path | None = None) -> pathlib.Path:
  """Returns a repository holding every demo model, exporting the missing ones first."""
  import jax

  platforms = demo_platforms()
  key = hashlib.sha256(
      f"{DEMO_RECIPE}|{jax.__version__}|{tiny}|{','.join(platforms)}".encode()).hexdigest()[:12]
  repo = (root or demo_cache_root()) / f"demo-repo-{key}"
  repo.mkdir(parents=True, exist_ok=True)
  for name, build in BUILDERS.items():
    if (repo / name / "1" / "manifest.json").exists():
      continue
    shutil.rmtree(repo / name, ignore_errors=True)  # a half-written export
    progress(f"building demo model {name!r} into {repo} (first start only) ...")
    t0 = time.perf_counter()
    build(repo, tiny=tiny, platforms=platforms)
    progress(f"built {name!r} in {time.perf_counter() - t0:.1f}s")
  return repo
