"""Lower kernels for CUDA on a machine without a GPU, pull out their Triton IR, compile it for sm_90.

`lower_for_cuda` gives the StableHLO text a CUDA build would run (the Triton kernel sits in a
`__gpu$xla.gpu.triton` custom call). `triton_kernels` extracts each kernel's Triton IR, and
`compile_triton_kernel` turns it into a cubin with the `triton` PyPI package (test extra), reporting
registers, shared memory and stack (spills), which catches kernels that lower but would not compile,
fit or keep their accumulators in registers.
"""

from __future__ import annotations

import dataclasses
import logging
import pathlib
import struct
import tempfile
import time
from typing import Any, Callable

import jax

logger = logging.getLogger(__name__)

TRITON_CUSTOM_CALL = "__gpu$xla.gpu.triton"
_EIATTR_REGCOUNT = 0x2F  # CUDA ELF .nv.info attribute: (function symbol, register count)
_EIATTR_FRAME_SIZE = 0x11  # (function symbol, stack frame bytes per thread)
_EIFMT_SVAL = 0x04  # .nv.info record with a sized payload


@dataclasses.dataclass(frozen=True, slots=True)
class TritonKernelIR:
  """One Triton kernel of a lowered module: its IR as text and the launch parameters XLA uses."""

  name: str
  ir: str  # Triton MLIR (tt dialect), textual
  num_warps: int
  num_stages: int
  grid: tuple[int, int, int]


@dataclasses.dataclass(frozen=True, slots=True)
class CompiledTritonKernel:
  """What `triton.compile` made of a kernel for one GPU target."""

  name: str
  arch: int  # compute capability, e.g. 90 for sm_90 (H100)
  registers: int  # per thread
  shared_bytes: int  # shared memory Triton allocates per program
  stack_bytes: int  # per-thread stack frame: > 0 means registers spilled to local memory
  num_warps: int
  num_stages: int
  compile_s: float
  cubin: bytes = dataclasses.field(repr=False)


def _lowered(fn: Callable[..., Any], *specs: Any) -> Any:
  return jax.jit(fn).trace(*specs).lower(lowering_platforms=("cuda",))


def lower_for_cuda(fn: Callable[..., Any], *specs: Any) -> str:
  """StableHLO text of `fn` lowered for CUDA (works with no GPU); specs are ShapeDtypeStructs."""
  return _lowered(fn, *specs).as_text()


def _custom_calls(op: Any, target: str) -> list[Any]:
  found = []
  for region in op.regions:
    for block in region.blocks:
      for child in block.operations:
        child = child.operation
        if child.name == "stablehlo.custom_call":
          if str(child.attributes["call_target_name"]).strip('"') == target:
            found.append(child)
        found.extend(_custom_calls(child, target))
  return found


def triton_kernels(fn: Callable[..., Any], *specs: Any) -> list[TritonKernelIR]:
  """The Triton kernels in `fn`'s CUDA lowering, with their IR decoded from MLIR bytecode to text."""
  from jax._src.interpreters import mlir as jax_mlir  # pylint: disable=g-import-not-at-top
  from jax._src.lib import triton as jax_triton  # pylint: disable=g-import-not-at-top
  from jax._src.lib.mlir import ir  # pylint: disable=g-import-not-at-top

  module = _lowered(fn, *specs).compiler_ir("stablehlo")
  kernels = []
  for call in _custom_calls(module.operation, TRITON_CUSTOM_CALL):
    config = call.attributes["mhlo.backend_config"]
    bytecode = ir.StringAttr(config["ir"]).value_bytes
    context = jax_mlir.make_ir_context()
    jax_triton.dialect.register_dialect(context)  # the Triton dialect jaxlib ships
    with context:
      text = ir.Module.parse(bytecode).operation.get_asm(enable_debug_info=False)
    kernels.append(TritonKernelIR(
        name=ir.StringAttr(config["name"]).value,
        ir=text,
        num_warps=ir.IntegerAttr(config["num_warps"]).value,
        num_stages=ir.IntegerAttr(config["num_stages"]).value,
        grid=tuple(ir.IntegerAttr(config[f"grid_{a}"]).value for a in "xyz"),
    ))
  return kernels


def _nv_info_values(cubin: bytes, attr: int) -> list[int]:
  """Values of a per-function (symbol, value) attribute in a cubin's .nv.info sections."""
  if cubin[:4] != b"\x7fELF":
    raise ValueError("not an ELF cubin")
  shoff = struct.unpack_from("<Q", cubin, 0x28)[0]
  shentsize, shnum, shstrndx = struct.unpack_from("<HHH", cubin, 0x3A)
  sections = [struct.unpack_from("<IIQQQQ", cubin, shoff + i * shentsize) for i in range(shnum)]
  strtab = sections[shstrndx][4]
  values = []
  for name_off, _, _, _, offset, size in sections:
    name = cubin[strtab + name_off:cubin.index(b"\0", strtab + name_off)]
    if not name.startswith(b".nv.info"):
      continue
    pos = offset
    while pos + 4 <= offset + size:
      fmt, record, value = struct.unpack_from("<BBH", cubin, pos)
      pos += 4
      if fmt == _EIFMT_SVAL:
        if record == attr:
          values.append(struct.unpack_from("<II", cubin, pos)[1])
        pos += value
  return values


def cubin_registers(cubin: bytes) -> int:
  """Registers per thread from a cubin's .nv.info EIATTR_REGCOUNT record (max over functions)."""
  counts = _nv_info_values(cubin, _EIATTR_REGCOUNT)
  if not counts:
    raise ValueError("cubin has no EIATTR_REGCOUNT record")
  return max(counts)


def cubin_stack_bytes(cubin: bytes) -> int:
  """Per-thread stack frame (EIATTR_FRAME_SIZE); Triton kernels use none unless registers spill."""
  return max(_nv_info_values(cubin, _EIATTR_FRAME_SIZE), default=0)


def compile_triton_kernel(kernel: TritonKernelIR, *, arch: int = 90) -> CompiledTritonKernel:
  """Compiles jax-emitted Triton IR to a cubin for sm_`arch` with the `triton` package (no GPU needed).

  Raises ImportError when `triton` is not installed (it is in the `test` extra).
  """
  import triton  # pylint: disable=g-import-not-at-top
  from triton.backends.compiler import GPUTarget  # pylint: disable=g-import-not-at-top

  with tempfile.TemporaryDirectory() as tmp:
    path = pathlib.Path(tmp) / f"{kernel.name}.ttir"
    path.write_text(kernel.ir)
    start = time.perf_counter()
    compiled = triton.compile(
        str(path), target=GPUTarget("cuda", arch, 32),
        # FMA contraction on: triton's default through 3.9, set explicitly to silence its warning.
        options={"num_warps": kernel.num_warps, "num_stages": kernel.num_stages,
                 "enable_fp_fusion": True})
    elapsed = time.perf_counter() - start
  cubin = compiled.asm["cubin"]
  result = CompiledTritonKernel(
      name=kernel.name, arch=arch, registers=cubin_registers(cubin),
      shared_bytes=int(compiled.metadata.shared), stack_bytes=cubin_stack_bytes(cubin),
      num_warps=kernel.num_warps,
      num_stages=kernel.num_stages, compile_s=elapsed, cubin=cubin)
  logger.info("compiled %s for sm_%d: %d registers, %d B shared, %d B stack, %.1fs", kernel.name,
              arch, result.registers, result.shared_bytes, result.stack_bytes, elapsed)
  return result


def export_for_cuda(fn: Callable[..., Any], *specs: Any) -> jax.export.Exported:
  """`jax.export` of `fn` for CUDA only, allowing the Triton custom call.

  Triton IR carries no compatibility guarantee: whoever serializes this must record the jax version.
  """
  return jax.export.export(
      jax.jit(fn), platforms=("cuda",),
      disabled_checks=[jax.export.DisabledSafetyCheck.custom_call(TRITON_CUSTOM_CALL)])(*specs)
