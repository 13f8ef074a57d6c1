"""Pallas (Triton back end) kernels, each beside its plain-jnp reference."""

from pallas_kernels.dispatch import IMPLS, Impl, check_impl, dispatch
from pallas_kernels.embedding_bag import (
    embedding_bag,
    embedding_bag_multi,
    embedding_bag_multi_reference,
    embedding_bag_reference,
)
from pallas_kernels.flash_attention import flash_attention, flash_attention_reference
from pallas_kernels.int4_matmul import int4_matmul, int4_matmul_reference
from pallas_kernels.paged_attention import paged_attention, paged_attention_reference
from pallas_kernels.quantize import (
    dequantize_fp8_per_channel,
    dequantize_int8_per_channel,
    dequantize_rows,
    quantize_activations_int8,
    quantize_fp8_per_channel,
    quantize_int8_per_channel,
    quantize_rows_int8,
)
from pallas_kernels.quantized_matmul import quantized_matmul, quantized_matmul_reference
