"""xlaserve sharding: meshes, logical-axis rules as data, plans that place params and batches.

From (strategy, device count, per-leaf logical axes and shapes) to placed params and jit
shardings: `ShardingPlan.create`, `param_shardings`, `restore_sharded`/`serving_params`,
`input_sharding`/`output_sharding`; `TablePlacement` puts whole embedding tables on single
devices; `hlo` measures what the placement costs.
"""

from sharding.hlo import (
    COLLECTIVE_OPS, Collective, CollectiveStats, collective_stats, collectives, peak_memory_bytes,
    per_device_bytes,
)
from sharding.mesh import make_mesh, mesh_shape, single_device_mesh
from sharding.plan import (
    ShardingPlan, abstract_params, jit_step, place_from_host, restore_sharded, serving_params,
)
from sharding.rules import (
    DATA, LOGICAL_AXES, MESH_AXES, MODEL, STRATEGIES, STRATEGY_RULES, rules_for,
)
from sharding.tables import TablePlacement

__all__ = [
    "COLLECTIVE_OPS", "Collective", "CollectiveStats", "DATA", "LOGICAL_AXES", "MESH_AXES",
    "MODEL", "STRATEGIES", "STRATEGY_RULES", "ShardingPlan", "TablePlacement", "abstract_params",
    "collective_stats", "collectives", "jit_step", "make_mesh", "mesh_shape", "peak_memory_bytes",
    "per_device_bytes", "place_from_host", "restore_sharded", "rules_for", "serving_params",
    "single_device_mesh",
]
