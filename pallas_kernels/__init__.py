"""Pallas (Triton back end) kernels, each beside its plain-jnp reference."""

from pallas_kernels.dispatch import IMPLS, Impl, check_impl, dispatch
