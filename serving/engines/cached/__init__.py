"""Embedding tables larger than the device: a device cache of each big table's hottest rows,
the whole table on the host (`config.py` places tables, `row_cache.py` is the index and policy,
`assemble.py` the device half of a lookup, `host_tables.py` the host tier, `engine.py` the
engine)."""

from serving.engines.cached.config import EmbeddingCacheConfig, TablePlan, parse_bytes, plan_tables
from serving.engines.cached.engine import CachedTablesEngine
from serving.engines.cached.row_cache import RowCache
