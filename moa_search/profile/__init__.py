"""First-order estimates of the loss increase of restricting each attention head to a window.

For every (layer, query head) and every candidate window, :func:`profile_heads` estimates how much
the mean NLL per predicted token would rise if that head alone used the window. The estimate takes
one forward and one backward pass per batch (the "attention influence" of MoA, arXiv 2406.14909).

Per attention row i of a head, with softmax probabilities ``A[i, :]`` and ``g = dL/dA[i, :]``, a
window W under :data:`moa_search.masks.WINDOW_CONVENTION` drops the keys ``D = {j : sink_tokens <=
j <= i - W}``. With ``m = sum_D A``, ``G = sum_D A*g`` and ``S = sum_j A*g``:

- ``"set"`` (default) linearises the loss around masking D and renormalising the row over the kept
  keys, ``A' = A * [j kept] / (1 - m)``, which gives ``dL = (S - G) * m / (1 - m) - G``.
- ``"additive"`` is the estimator of the reference MoA code: the sum over dropped keys of the
  effect of dropping each key alone, ``A_j * (S - g_j) / (1 - A_j)``. Both agree to first order in
  m, but only the set estimator is the exact first-order term of the actual change ``A' - A``, so
  the two drift apart as the dropped mass grows.

Row estimates for all candidates come from prefix sums over the key index (O(seq_len) per row) and
are summed over rows, sequences and batches in float64.

Memory: the profiling attention function is a custom autograd function that never stores the
attention probabilities. Its forward keeps only the query, key and value states. Its backward
recomputes the probabilities in blocks of query rows, so the extra memory is O(batch * query_heads
* rows_per_block * seq_len) for the one layer being differentiated, on top of the model's usual
activations O(layers * batch * seq_len * hidden). No gradient checkpointing is needed.
"""

from moa_search.profile._attention import (
    PROFILE_ATTENTION_NAME,
    _ProfiledAttention,  # noqa: F401  (imported by the tests)
    profiling_attention_forward,
)
from moa_search.profile._driver import profile_estimators, profile_heads
from moa_search.profile._estimators import (
    ESTIMATORS,
    KEPT_MASS_FLOOR,
    _LayerStatistics,  # noqa: F401  (imported by the tests)
    row_loss_increase,
)
from moa_search.profile._head_profile import FILE_FORMAT_VERSION, HeadProfile

# The tuning constants BLOCK_ELEMENTS (in moa_search.profile._attention) and KEY_GROUP (in
# moa_search.profile._estimators) are not re-exported, because a patched copy here would not reach
# the code that reads them.

__all__ = [
    "ESTIMATORS",
    "FILE_FORMAT_VERSION",
    "KEPT_MASS_FLOOR",
    "PROFILE_ATTENTION_NAME",
    "HeadProfile",
    "profile_estimators",
    "profile_heads",
    "profiling_attention_forward",
    "row_loss_increase",
]
