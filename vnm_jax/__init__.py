"""vnm-jax: V:N:M sparsity for transformers in JAX."""

from vnm_jax.calibration import collect_input_norms
from vnm_jax.config import VNMConfig
from vnm_jax.format import VNMWeight, compress, decompress
from vnm_jax.masks import as_matrix, from_matrix, is_vnm, nm_mask, vnm_mask
from vnm_jax.permutation import Permutation
from vnm_jax.scores import Importance, importance_scores, magnitude_score, ria_score, wanda_score
from vnm_jax.trees import (SparsitySummary, sparsity_summary, tree_apply_masks, tree_configs,
                           tree_masks)

__version__ = "0.1.0"

__all__ = [
    "Importance",
    "Permutation",
    "SparsitySummary",
    "VNMConfig",
    "VNMWeight",
    "as_matrix",
    "collect_input_norms",
    "compress",
    "decompress",
    "from_matrix",
    "importance_scores",
    "is_vnm",
    "magnitude_score",
    "nm_mask",
    "ria_score",
    "sparsity_summary",
    "tree_apply_masks",
    "tree_configs",
    "tree_masks",
    "vnm_mask",
    "wanda_score",
]
