"""The built-in demo: concrete models exported into a cached repository for `xlaserve serve` with
no --model-repository. Only the CLI uses it; the serving core never imports it."""

from demo.large_tables import LargeTablesConfig, build_dlrm_large, skewed_ids
from demo.repository import (BUILDERS, ON_REQUEST, DemoBuild, build_dlrm, build_lm, demo_build,
                             demo_builders, ensure_demo_repository)
