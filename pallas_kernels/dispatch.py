"""Choose between a Pallas kernel and its XLA reference, per lowering platform.

`impl="auto"` uses `jax.lax.platform_dependent`, so the choice is made when the
computation is lowered: a CUDA lowering (or a CUDA `jax.export`) gets the Triton
kernel, every other platform gets the plain-`jnp` reference. Export one artifact
per platform: a multi-platform export would lower the kernel for CPU too.
"""

from __future__ import annotations

from typing import Any, Callable, Literal

import jax

Impl = Literal["auto", "pallas", "xla"]
IMPLS: tuple[str, ...] = ("auto", "pallas", "xla")


def check_impl(impl: str) -> None:
  """Raises ValueError for an unknown `impl` name."""
  if impl not in IMPLS:
    raise ValueError(f"impl={impl!r} must be one of {IMPLS}")


def dispatch(
    impl: str,
    *args: Any,
    pallas_fn: Callable[..., Any],
    xla_fn: Callable[..., Any],
) -> Any:
  """Calls `pallas_fn(*args)` or `xla_fn(*args)` as `impl` says.

  "pallas" always takes the kernel (pass `interpret=True` inside `pallas_fn` to
  run it on CPU), "xla" always the reference, "auto" the kernel on CUDA only.
  """
  check_impl(impl)
  if impl == "pallas":
    return pallas_fn(*args)
  if impl == "xla":
    return xla_fn(*args)
  return jax.lax.platform_dependent(*args, cuda=pallas_fn, default=xla_fn)
