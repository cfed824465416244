"""vnm-jax: V:N:M sparsity for transformers in JAX.

The names below are what users call, grouped as in the README. Report and formatting
helpers (sparsity tables, permutation tables, the V/M candidate table) and the
lower-level building blocks stay importable from their modules:
:mod:`vnm_jax.trees`, :mod:`vnm_jax.permutation`, :mod:`vnm_jax.permutation_search`,
:mod:`vnm_jax.selection`, :mod:`vnm_jax.masks`, :mod:`vnm_jax.format`,
:mod:`vnm_jax.benchmarking`. Models, data sets and the recipes that train them are
the separate package ``vnm_recipes``; this package never imports it.
"""

from vnm_jax.allocation import allocate_configs
from vnm_jax.benchmarking import MatmulTiming, measure_matmul_speedup
from vnm_jax.calibration import collect_input_norms
from vnm_jax.checkpoint import CheckpointError, Checkpointer
from vnm_jax.config import VNMConfig
from vnm_jax.format import VNMWeight, compress, decompress
from vnm_jax.layers import VNMDense, VNMIndex, VNMLinear, VNMPrepared, convert_to_vnm
from vnm_jax.lora import (LoRAAdapter, ThreeStageLoRAState, default_stage_steps, init_lora,
                          lora_masks, lora_params, merge_lora, three_stage_lora)
from vnm_jax.masks import as_matrix, from_matrix, is_vnm, nm_mask, vnm_mask
from vnm_jax.matmul import PreparedVNMWeight, prepare, vnm_matmul
from vnm_jax.permutation import FoldedPair, Permutation, fold_output_permutation
from vnm_jax.permutation_search import find_permutation, kept_score, tree_permutations
from vnm_jax.scores import Importance, importance_scores, magnitude_score, ria_score, wanda_score
from vnm_jax.selection import mask_diversity, measure_speedups, model_gemm_shapes, select_vm
from vnm_jax.sparse_training import (FixedMaskState, SRSTEState, fixed_mask, sparse_masks,
                                     sparse_params, sr_ste)
from vnm_jax.trees import (kernel_scores, leaves_by_path, path_str, tree_apply_masks,
                           tree_configs, tree_masks, tree_permute, tree_unpermute)

__version__ = "0.1.0"

__all__ = (
    # The pattern and masks of one kernel.
    "VNMConfig",
    "vnm_mask",
    "is_vnm",
    "nm_mask",
    "as_matrix",
    "from_matrix",
    # Importance scores and calibration.
    "Importance",
    "importance_scores",
    "magnitude_score",
    "wanda_score",
    "ria_score",
    "collect_input_norms",
    # Whole parameter trees.
    "tree_configs",
    "tree_masks",
    "tree_apply_masks",
    "kernel_scores",
    "tree_permute",
    "tree_unpermute",
    "path_str",
    "leaves_by_path",
    # Channel permutation.
    "Permutation",
    "find_permutation",
    "kept_score",
    "tree_permutations",
    "fold_output_permutation",
    "FoldedPair",
    # V/M selection and per-layer allocation.
    "select_vm",
    "allocate_configs",
    "mask_diversity",
    "measure_speedups",
    "model_gemm_shapes",
    # Sparse training (optax transformations).
    "fixed_mask",
    "sr_ste",
    "sparse_params",
    "sparse_masks",
    "FixedMaskState",
    "SRSTEState",
    # LoRA.
    "init_lora",
    "three_stage_lora",
    "lora_params",
    "lora_masks",
    "merge_lora",
    "default_stage_steps",
    "LoRAAdapter",
    "ThreeStageLoRAState",
    # The compressed format, the sparse matmul and Flax layers.
    "VNMWeight",
    "compress",
    "decompress",
    "vnm_matmul",
    "prepare",
    "PreparedVNMWeight",
    "VNMLinear",
    "VNMDense",
    "VNMIndex",
    "VNMPrepared",
    "convert_to_vnm",
    "measure_matmul_speedup",
    "MatmulTiming",
    # Checkpoints.
    "Checkpointer",
    "CheckpointError",
)
