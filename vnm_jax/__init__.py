"""vnm-jax: V:N:M sparsity for transformers in JAX."""

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
from vnm_jax.permutation import Permutation
from vnm_jax.permutation_search import (FoldedPair, LayerPermutationReport, PermutationTable,
                                        find_permutation, fold_output_permutation, kept_score,
                                        tree_permutations, unstructured_kept_score)
from vnm_jax.scores import Importance, importance_scores, magnitude_score, ria_score, wanda_score
from vnm_jax.selection import (Candidate, format_candidates, llama_gemm_shapes, mask_diversity,
                               measure_speedups, model_gemm_shapes, rank_candidates, select_vm)
from vnm_jax.sparse_training import (FixedMaskState, SRSTEState, fixed_mask, sparse_masks,
                                     sparse_params, sr_ste)
from vnm_jax.trees import (SparsitySummary, kernel_scores, sparsity_summary, tree_apply_masks,
                           tree_configs, tree_masks)

__version__ = "0.1.0"

__all__ = [
    "Candidate",
    "CheckpointError",
    "Checkpointer",
    "FixedMaskState",
    "FoldedPair",
    "Importance",
    "LayerPermutationReport",
    "LoRAAdapter",
    "MatmulTiming",
    "Permutation",
    "PermutationTable",
    "PreparedVNMWeight",
    "SRSTEState",
    "SparsitySummary",
    "ThreeStageLoRAState",
    "VNMConfig",
    "VNMDense",
    "VNMIndex",
    "VNMLinear",
    "VNMPrepared",
    "VNMWeight",
    "as_matrix",
    "collect_input_norms",
    "compress",
    "convert_to_vnm",
    "decompress",
    "default_stage_steps",
    "find_permutation",
    "fixed_mask",
    "fold_output_permutation",
    "format_candidates",
    "from_matrix",
    "importance_scores",
    "init_lora",
    "is_vnm",
    "kept_score",
    "kernel_scores",
    "llama_gemm_shapes",
    "lora_masks",
    "lora_params",
    "magnitude_score",
    "mask_diversity",
    "measure_matmul_speedup",
    "measure_speedups",
    "merge_lora",
    "model_gemm_shapes",
    "nm_mask",
    "prepare",
    "rank_candidates",
    "ria_score",
    "select_vm",
    "sparse_masks",
    "sparse_params",
    "sparsity_summary",
    "sr_ste",
    "three_stage_lora",
    "tree_apply_masks",
    "tree_configs",
    "tree_masks",
    "tree_permutations",
    "unstructured_kept_score",
    "vnm_mask",
    "vnm_matmul",
    "wanda_score",
]
