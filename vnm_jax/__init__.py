"""vnm-jax: V:N:M sparsity for transformers in JAX."""

from vnm_jax.config import VNMConfig
from vnm_jax.format import VNMWeight, compress, decompress
from vnm_jax.masks import as_matrix, from_matrix, is_vnm, nm_mask, vnm_mask
from vnm_jax.permutation import Permutation

__version__ = "0.1.0"

__all__ = [
    "Permutation",
    "VNMConfig",
    "VNMWeight",
    "as_matrix",
    "compress",
    "decompress",
    "from_matrix",
    "is_vnm",
    "nm_mask",
    "vnm_mask",
]
