"""Pallas kernels on raw arrays (no Flax): the V:N:M sparse matmul and its weight layout."""

from vnm_jax.ops.vnm_matmul.layout import condense
from pallas_kernels.vnm_matmul import (vnm_matmul_pallas, vnm_matmul_pallas_condensed,
                                       vnm_matmul_pallas_packed, vnm_matmul_reference)

__all__ = [
    "condense",
    "vnm_matmul_pallas",
    "vnm_matmul_pallas_condensed",
    "vnm_matmul_pallas_packed",
    "vnm_matmul_reference",
]
