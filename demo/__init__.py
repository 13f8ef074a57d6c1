"""The built-in demo: concrete models exported into a cached repository for `xlaserve serve` with
no --model-repository. Only the CLI uses it; the serving core never imports it."""

from demo.repository import (BUILDERS, DemoBuild, build_dlrm, build_lm, demo_build,
                             ensure_demo_repository)
