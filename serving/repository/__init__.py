"""The model repository: bundles on disk -> loaded, warmed-up versions with their runners.

`repository.py` discovers, loads (through a kind -> runner factory table), versions and
retires models; `config.py` holds per-model settings and the factory types; `placement.py`
chooses devices and sharding for a version; `reload.py` polls the folder for hot reloads; `budget.py` refuses versions over the device-memory budget;
`auto_plan.py` (decisions) and `replan.py` (the planner thread) re-plan batch buckets from traffic
(`bucket_plan: auto`), switched in by `rebuild.py`; `bucket_override.py` checks `batch_buckets`.
"""

from serving.repository.config import (CONFIG_FILE, EngineFactory, LoadSpec, ModelServingConfig,
                                       RunnerFactory)
from serving.repository.placement import default_engine_factory, engine_factory_for, placements_for
from serving.repository.reload import RepositoryPoller
from serving.repository.repository import ModelRepository, ServedVersion, State
