"""The pipeline section of a manifest (kind "pipeline"): steps over served models and built-in ops.

A pipeline is data, in the spirit of Triton's ensemble config: its own inputs and outputs (the
manifest's one signature), and steps run in order. A step is a served model (`model`, optional
`version`) or a built-in host op (`op`: "tokenize", "top_k"); `inputs` map the step's input
names to sources, `options` configure an op. A source is a pipeline input's name or
"<step>.<output>" of an earlier step, optionally reshaped ({"from": ..., "reshape": [...]}, one
-1 allowed). `outputs` map the pipeline's outputs to sources. `handoff` says where tensors pass
from a model step to a later one: "device" (kept in device memory), "host", or "auto" (the
default: device on accelerators, host on CPU, where device memory is host memory).
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Mapping

OPS = ("tokenize", "top_k")
HANDOFFS = ("auto", "device", "host")
_STEP_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_-]{0,63}")


@dataclasses.dataclass(frozen=True, slots=True)
class Source:
  """Where a step input or pipeline output comes from: `tensor` ("x" or "step.out")."""

  tensor: str
  reshape: tuple[int, ...] | None = None

  def __post_init__(self):
    if self.reshape is not None and sum(1 for d in self.reshape if d == -1) > 1:
      raise ValueError(f"source {self.tensor!r}: reshape {list(self.reshape)} has more than one"
                       " -1")

  @property
  def step(self) -> str | None:
    """The step that produces it (None: a pipeline input)."""
    return self.tensor.split(".", 1)[0] if "." in self.tensor else None

  def to_json(self) -> Any:
    return self.tensor if self.reshape is None else {"from": self.tensor,
                                                     "reshape": list(self.reshape)}

  @classmethod
  def from_json(cls, d: Any) -> Source:
    if isinstance(d, str):
      return cls(d)
    return cls(d["from"], tuple(int(x) for x in d["reshape"]) if "reshape" in d else None)


@dataclasses.dataclass(frozen=True, slots=True)
class Step:
  """One step: a served model or a built-in op, its input sources and op options."""

  name: str
  inputs: Mapping[str, Source]
  model: str | None = None
  version: int | None = None
  op: str | None = None
  options: Mapping[str, Any] = dataclasses.field(default_factory=dict)

  def __post_init__(self):
    if not _STEP_NAME.fullmatch(self.name):
      raise ValueError(f"step name {self.name!r}: a letter, then letters, digits, '_' or '-'")
    if (self.model is None) == (self.op is None):
      raise ValueError(f"step {self.name!r}: give exactly one of 'model' and 'op'")
    if self.op is not None and self.op not in OPS:
      raise ValueError(f"step {self.name!r}: unknown op {self.op!r} (ops: {', '.join(OPS)})")

  def to_json(self) -> dict[str, Any]:
    d: dict[str, Any] = {"name": self.name}
    if self.model is not None:
      d["model"] = self.model
      if self.version is not None:
        d["version"] = self.version
    else:
      d["op"] = self.op
    d["inputs"] = {k: s.to_json() for k, s in self.inputs.items()}
    if self.options:
      d["options"] = dict(self.options)
    return d

  @classmethod
  def from_json(cls, d: Mapping[str, Any]) -> Step:
    return cls(d["name"], {k: Source.from_json(v) for k, v in d["inputs"].items()},
               d.get("model"), int(d["version"]) if d.get("version") is not None else None,
               d.get("op"), dict(d.get("options", {})))


@dataclasses.dataclass(frozen=True, slots=True)
class PipelineSpec:
  """Steps in order and the pipeline's outputs; every source names something defined earlier."""

  steps: tuple[Step, ...]
  outputs: Mapping[str, Source]
  handoff: str = "auto"

  def __post_init__(self):
    if self.handoff not in HANDOFFS:
      raise ValueError(f"pipeline handoff {self.handoff!r}: one of {', '.join(HANDOFFS)}")

  def check(self, inputs: tuple[str, ...], outputs: tuple[str, ...]) -> None:
    """Raises ValueError unless every source is a pipeline input or an earlier step's output,
    step names are unique, and `outputs` are exactly the signature's outputs."""
    if not self.steps:
      raise ValueError("a pipeline needs at least one step")
    seen: set[str] = set()
    for step in self.steps:
      if step.name in seen or step.name in inputs:
        raise ValueError(f"step name {step.name!r} is used twice (or is a pipeline input)")
      for name, src in step.inputs.items():
        _check_source(src, inputs, seen, f"step {step.name!r} input {name!r}")
      seen.add(step.name)
    for name, src in self.outputs.items():
      _check_source(src, inputs, seen, f"pipeline output {name!r}")
    if sorted(self.outputs) != sorted(outputs):
      raise ValueError(f"pipeline outputs {sorted(self.outputs)} differ from the signature's"
                       f" {sorted(outputs)}")

  def to_json(self) -> dict[str, Any]:
    d = {"steps": [s.to_json() for s in self.steps],
         "outputs": {k: s.to_json() for k, s in self.outputs.items()}}
    return d if self.handoff == "auto" else {**d, "handoff": self.handoff}

  @classmethod
  def from_json(cls, d: Mapping[str, Any]) -> PipelineSpec:
    return cls(tuple(Step.from_json(s) for s in d["steps"]),
               {k: Source.from_json(v) for k, v in d["outputs"].items()},
               d.get("handoff", "auto"))


def _check_source(src: Source, inputs: tuple[str, ...], steps: set[str], where: str) -> None:
  if src.step is None and src.tensor not in inputs:
    raise ValueError(f"{where}: {src.tensor!r} is not a pipeline input ({list(inputs)})")
  if src.step is not None and src.step not in steps:
    raise ValueError(f"{where}: {src.tensor!r} names step {src.step!r}, which does not run"
                     " before it")
