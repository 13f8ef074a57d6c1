"""XLA's device-memory preallocation for the server process: off unless asked for.

JAX's GPU client grabs 75% of each accelerator's memory when its backend starts, which hides
what models really use and starves anything else on the device. The server turns that off by
setting `XLA_PYTHON_CLIENT_PREALLOCATE=false` before anything starts a JAX backend (the CLI
calls `configure` first thing); a value the user already set wins. CPU backends ignore it.
"""

from __future__ import annotations

from typing import MutableMapping

PREALLOCATE_ENV = "XLA_PYTHON_CLIENT_PREALLOCATE"


def configure(env: MutableMapping[str, str], *, preallocate: bool) -> str:
  """Sets `env[PREALLOCATE_ENV]` to "false" unless `preallocate` or the user set it; returns a
  line saying which applies (for the start-up log)."""
  if PREALLOCATE_ENV in env:
    return f"XLA preallocation: {PREALLOCATE_ENV}={env[PREALLOCATE_ENV]} (set by the environment)"
  if preallocate:
    return ("XLA preallocation: on (--preallocate-device-memory: JAX takes 75% of each"
            " accelerator's memory at start)")
  env[PREALLOCATE_ENV] = "false"
  return (f"XLA preallocation: off ({PREALLOCATE_ENV}=false: device memory is allocated as"
          " models load; --preallocate-device-memory restores JAX's default)")
