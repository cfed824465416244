"""``vnm_matmul``: the public op, kept importable from here (it lives in ``vnm_jax.ops.vnm_matmul``)."""

from vnm_jax.ops.vnm_matmul.api import vnm_matmul
from vnm_jax.ops.vnm_matmul.prepared import (IMPLEMENTATIONS, PreparedVNMWeight, prepare,
                                             resolve_implementation)

__all__ = ["IMPLEMENTATIONS", "PreparedVNMWeight", "prepare", "resolve_implementation",
           "vnm_matmul"]
