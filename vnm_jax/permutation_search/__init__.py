"""Searching channel permutations that make a kernel keep more score under V:N:M pruning.

A Flax kernel is (in_features, out_features) = (K, N). V:N:M groups M consecutive
inputs (axis 0) and V consecutive outputs (axis 1) into a block that keeps 4 whole
input columns, then 2 of those 4 entries per output row. Reordering the inputs
decides which channels compete inside an M group; reordering the outputs decides
which rows must agree on their 4 columns. :func:`find_permutation` returns a
:class:`~vnm_jax.permutation.Permutation` that maximises the score kept by pruning
``kernel[inputs][:, outputs]``; the mask in original coordinates is then
``vnm_mask(kernel, config, permutation=p)`` and needs no change to the model.

The search (``method="cocluster"``, the default):

1. Co-clustering start. Output rows are cut into the R = N/V blocks and input
   channels into M "types" (one slot of every M group) at quantiles of the second
   singular vectors of the degree-normalised score matrix; both partitions are then
   refined by a balanced Lloyd iteration on a block x type model in which every
   block keeps its 4 strongest types. Groups are dealt one channel of each type, so
   the rows of a block tend to agree on which 4 columns of each group matter.
2. Exact local search. An input step per slot takes the channel in slot s out of
   every group and re-inserts them by a linear assignment
   (scipy.optimize.linear_sum_assignment) whose costs are the exact kept score of
   every channel in every group under the column-L1 rule (a jitted, vectorised
   computation); after every two input steps an output step re-clusters the rows:
   every row goes to the block where it keeps most given the blocks' current
   columns, block sizes fixed (a balanced transportation problem, solved exactly by
   cycle cancelling). It stops when two cycles in a row each close less than
   ``tolerance`` (default 0.05 %) of the gap to unstructured pruning.
3. Re-slotting: the channels of each group are shuffled among its slots (seeded) and
   the local search runs again from the best grouping, so that the input steps take
   different channels out together; the better result is kept.

``method="paper"`` is this project's reconstruction of the paper's procedure
(zig-zag deal by total score, then two rounds of input and output slot-by-slot
linear assignments); it is kept as the baseline the benchmark compares against.

Whatever the method, the result is never worse than the identity: the kept score
under the requested rule is compared at the end and the identity returned when it
is not beaten. The search optimises the column-L1 rule's score; with
``rule="exhaustive"`` that is a surrogate and only the final comparison uses the
exhaustive rule.

Layout: :mod:`.objective` (the kept score, exact on the host and as jitted costs),
:mod:`.assignment` (balanced assignments and slot tables), :mod:`.search` (starts,
local steps, drivers, :func:`find_permutation`) and :mod:`.reports`
(:func:`tree_permutations` and its table). The names below are the API; the modules'
other functions are the implementation. :func:`~vnm_jax.permutation.fold_output_permutation`
lives beside the :class:`~vnm_jax.permutation.Permutation` type.
"""

from vnm_jax.permutation_search.objective import kept_score, unstructured_kept_score
from vnm_jax.permutation_search.reports import (LayerPermutationReport, PermutationTable,
                                                tree_permutations)
from vnm_jax.permutation_search.search import METHODS, Method, find_permutation

__all__ = [
    "LayerPermutationReport",
    "METHODS",
    "Method",
    "PermutationTable",
    "find_permutation",
    "kept_score",
    "tree_permutations",
    "unstructured_kept_score",
]
