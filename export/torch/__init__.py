"""PyTorch models -> xlaserve bundles: `torch.export` capture lowered to JAX by our ATen op table.

Export-time only (needs torch); the bundles it writes serve without torch.
"""

from export.torch.capture import Program, capture, program
from export.torch.exporter import export_torch, torch_program
from export.torch.lower import LoweringError, lowered
from export.torch.ops import UnsupportedOperatorError, aten_ops
