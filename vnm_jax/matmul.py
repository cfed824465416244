"""``vnm_matmul`` and ``prepare``: kept importable from here; they live in ``vnm_jax.ops.vnm_matmul``."""

from vnm_jax.ops.vnm_matmul.api import vnm_matmul
from vnm_jax.ops.vnm_matmul.prepared import (IMPLEMENTATIONS, PreparedVNMWeight, prepare,
                                             resolve_implementation)

__all__ = ["IMPLEMENTATIONS", "PreparedVNMWeight", "prepare", "resolve_implementation",
           "vnm_matmul"]
