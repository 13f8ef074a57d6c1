"""The host tier of a cached table: the whole table in host memory, or memory-mapped from a raw
copy on disk (written once beside the bundle, or under ~/.cache when the bundle is read-only).

Either way the array is writable by this process (live updates) without touching the bundle:
a memory map is copy-on-write, so updates live in memory and a restart sees the bundle's rows.
"""

from __future__ import annotations

import hashlib
import logging
import os
import pathlib
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)
HOST_TABLES_DIR = "host_tables"


def _raw_path(bundle: pathlib.Path, param_path: str) -> pathlib.Path:
  name = param_path.replace("/", ".") + ".npy"
  here = bundle / HOST_TABLES_DIR
  if os.access(bundle, os.W_OK) or here.exists():
    return here / name
  digest = hashlib.sha256(str(bundle.resolve()).encode()).hexdigest()[:16]
  return pathlib.Path("~/.cache/xlaserve/host_tables").expanduser() / digest / name


def host_table(bundle: pathlib.Path, param_path: str, restored: Any, mode: str) -> np.ndarray:
  """A writable host array holding `restored` (a restored param leaf): "memory" copies it into
  host memory, "mmap" maps a raw copy on disk (written on first use)."""
  if mode == "memory":
    return np.array(restored)
  raw = _raw_path(bundle, param_path)
  if not raw.exists() or np.load(raw, mmap_mode="r").shape != tuple(restored.shape):
    raw.parent.mkdir(parents=True, exist_ok=True)
    tmp = raw.with_name(f"{raw.name}.{os.getpid()}.tmp")
    out = np.lib.format.open_memmap(tmp, mode="w+", dtype=restored.dtype, shape=restored.shape)
    step = max(1, (64 << 20) // max(1, out[0].nbytes))  # 64 MiB at a time
    for start in range(0, out.shape[0], step):
      out[start:start + step] = np.asarray(restored[start:start + step])
    out.flush()
    del out
    tmp.replace(raw)
    logger.info("wrote the raw copy %s for memory mapping", raw)
  return np.load(raw, mmap_mode="c")
