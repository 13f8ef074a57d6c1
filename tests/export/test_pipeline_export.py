"""`export.export_pipeline`: the pipeline config as written by hand becomes a manifest that reads
back the same (steps, sources, reshapes, the hand-off mode), and a malformed one is refused with
what is wrong."""

from __future__ import annotations

import json

import pytest

import bundle
import export

CONFIG = {
    "inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 8]}],
    "outputs": [{"name": "y", "datatype": "FP32", "shape": [1, 4],
                 "from": {"from": "second.out", "reshape": [1, 4]}}],
    "steps": [{"name": "first", "model": "a", "inputs": {"x": "x"}},
              {"name": "second", "model": "b", "version": 2,
               "inputs": {"h": {"from": "first.h", "reshape": [2, 4]}}}],
}


@pytest.mark.parametrize("handoff", [None, "auto", "device", "host"])
def test_the_manifest_reads_back_the_config(tmp_path, handoff):
  config = CONFIG if handoff is None else {**CONFIG, "handoff": handoff}
  path = export.export_pipeline(config, repository=tmp_path, name="p", version=1)
  spec = bundle.read_manifest(path).pipeline
  assert spec.handoff == (handoff or "auto")
  assert [s.name for s in spec.steps] == ["first", "second"]
  assert spec.steps[1].version == 2 and spec.steps[1].inputs["h"].reshape == (2, 4)
  assert spec.outputs["y"].tensor == "second.out"
  written = json.loads((path / "manifest.json").read_text())["pipeline"]
  assert written.get("handoff", "auto") == (handoff or "auto")


@pytest.mark.parametrize("change,message", [
    ({"handoff": "gpu"}, "pipeline handoff 'gpu': one of auto, device, host"),
    ({"steps": [{"name": "second", "model": "b", "inputs": {"h": "first.h"}}]},
     "names step 'first', which does not run before it"),
    ({"steps": [{"name": "s", "op": "sort", "inputs": {"x": "x"}}]}, "unknown op 'sort'"),
    ({"steps": [{"name": "s", "model": "a", "inputs": {"x": "nope"}}]},
     "'nope' is not a pipeline input"),
])
def test_a_malformed_pipeline_is_refused_with_what_is_wrong(tmp_path, change, message):
  with pytest.raises(ValueError, match=message):
    export.export_pipeline({**CONFIG, **change}, repository=tmp_path, name="p", version=1)
