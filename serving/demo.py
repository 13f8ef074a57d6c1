"""Builds the built-in demo model repository (the only place serving/ touches concrete models).

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

logger = logging.getLogger(__name__)

DEMO_RECIPE = "demo-v1"


def demo_cache_root() -> pathlib.Path:
  return pathlib.Path(os.environ.get("XLASERVE_HOME", pathlib.Path.home() / ".cache" / "xlaserve"))


def build_dlrm(repository: pathlib.Path, *, tiny: bool = False, seed: int = 0) -> pathlib.Path:
  """Exports the DLRM CTR demo (weights from a fixed seed) as `<repository>/dlrm/1`."""
  from flax import nnx

  import export
  from models.dlrm import DLRM, DLRMConfig

  cfg = DLRMConfig.tiny() if tiny else DLRMConfig.demo()
  model = DLRM(cfg, rngs=nnx.Rngs(seed))
  return export.export_model(
      model, repository=repository, name="dlrm", version=1,
      inputs=[export.Input("dense", "float32", ("batch", cfg.num_dense)),
              export.Input("sparse", "int64", ("batch", cfg.num_sparse))],
      config=export.ExportConfig(batch_buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256),
                                 max_queue_delay_us=1000),
      extra={"description": "DLRM-style CTR demo: 13 dense + 26 categorical features",
             "table_sizes": list(cfg.table_sizes), "seed": seed})


BUILDERS: dict[str, Callable[..., pathlib.Path]] = {"dlrm": build_dlrm}


def ensure_demo_repository(progress: Callable[[str], None], *, tiny: bool = False,
                           root: pathlib.Path | None = None) -> pathlib.Path:
  """Returns a repository holding every demo model, exporting the missing ones first."""
  import jax

  key = hashlib.sha256(f"{DEMO_RECIPE}|{jax.__version__}|{tiny}".encode()).hexdigest()[:12]
  repo = (root or demo_cache_root()) / f"demo-repo-{key}"
  repo.mkdir(parents=True, exist_ok=True)
  for name, build in BUILDERS.items():
    if (repo / name / "1" / "manifest.json").exists():
      continue
    shutil.rmtree(repo / name, ignore_errors=True)  # a half-written export
    progress(f"building demo model {name!r} into {repo} (first start only) ...")
    t0 = time.perf_counter()
    build(repo, tiny=tiny)
    progress(f"built {name!r} in {time.perf_counter() - t0:.1f}s")
  return repo
