"""vnm-jax: V:N:M sparsity for transformers in JAX."""

from vnm_jax.benchmarking import MatmulTiming, measure_matmul_speedup
from vnm_jax.calibration import collect_input_norms
from vnm_jax.config import VNMConfig
from vnm_jax.format import VNMWeight, compress, decompress
from vnm_jax.layers import VNMDense, VNMIndex, VNMLinear, convert_to_vnm
from vnm_jax.masks import as_matrix, from_matrix, is_vnm, nm_mask, vnm_mask
from vnm_jax.matmul import vnm_matmul
from vnm_jax.permutation import Permutation
from vnm_jax.scores import Importance, importance_scores, magnitude_score, ria_score, wanda_score
from vnm_jax.trees import (SparsitySummary, sparsity_summary, tree_apply_masks, tree_configs,
                           tree_masks)

__version__ = "0.1.0"

__all__ = [
    "Importance",
    "MatmulTiming",
    "Permutation",
    "SparsitySummary",
    "VNMConfig",
    "VNMDense",
    "VNMIndex",
    "VNMLinear",
    "VNMWeight",
    "as_matrix",
    "collect_input_norms",
    "compress",
    "convert_to_vnm",
    "decompress",
    "from_matrix",
    "importance_scores",
    "is_vnm",
    "magnitude_score",
    "measure_matmul_speedup",
    "nm_mask",
    "ria_score",
    "sparsity_summary",
    "tree_apply_masks",
    "tree_configs",
    "tree_masks",
    "vnm_mask",
    "vnm_matmul",
    "wanda_score",
]
