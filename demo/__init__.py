"""The built-in demo: concrete models exported into a cached repository for `xlaserve serve` with
no --model-repository. Only the CLI uses it; the serving core never imports it."""

from demo.repository import BUILDERS, build_dlrm, build_lm, ensure_demo_repository
