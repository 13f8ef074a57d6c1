"""Engines execute one padded batch of a model version; the runner decides what goes in it.

`base.py` is the interface and placement; `replica.py` the shared replica and warm-up loop;
`bundle.py` (batch buckets), `grid.py` (batch x sequence buckets) and `context.py` (a request
grid and a candidate grid) serve exported bundles;
`tablewise.py` composes a fused table lookup for `embedding_tables`; `lockstep.py` runs one
model across processes; `memory.py` is what a loaded version holds (its `memory()` report);
`mock.py` and `mock_seq.py` are engines whose outputs can be worked by
hand, for exact server tests.
"""

from serving.engines.base import (Engine, Placement, Progress, check_jax_version, export_platform,
                                  param_bytes)
from serving.engines.bundle import BundleEngine
from serving.engines.context import SEGMENT_INPUT, ContextEngine
from serving.engines.grid import SeqBundleEngine, pad_axis, seq_axes
from serving.engines.replica import ReplicaEngine
