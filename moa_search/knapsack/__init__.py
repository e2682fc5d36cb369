"""Exact multiple-choice knapsack (MCKP) solver that picks one candidate window per group of heads.

Each group (an attention head, or the query heads that share one KV head) takes exactly one
candidate. The solver minimises ``sum_g loss[g, c_g]`` subject to
``sum_g weight_g * cost[g, c_g] <= budget`` and, optionally, to at most ``max_distinct_per_layer``
distinct candidate indices among the groups of each layer.

Algorithm:

1. Drop candidates that another candidate of the same group dominates (no more cost and no more
   loss, one of them strictly less). The distinct-per-layer path skips this step, because there
   a dominated candidate can be the only one that a layer's other groups also use.
2. Solve the LP relaxation greedily on the lower convex hull of each group. The split hull edge
   gives the optimal Lagrange multiplier ``lam`` and the lower bound ``L(lam)``.
3. Improve the greedy integral solution by single swaps to get an upper bound ``U``. A candidate
   whose reduced cost ``loss + lam * weighted_cost - min_c(...)`` exceeds ``U - L(lam)`` is in
   no optimal solution (reduced-cost fixing), so it is removed.
4. Solve the remaining core exactly by dynamic programming over the Pareto set of partial
   (cost, loss) sums, pruned with LP bounds. It compares real sums, so it needs no tolerance
   except the budget's. A core too large for it goes to a MILP in HiGHS instead.

With the distinct-per-layer constraint, when the optimum above breaks it, the solver adds
binaries ``y[layer, c]`` with ``x[g, c] <= y[layer, c]`` and ``sum_c y[layer, c] <= K``. It
solves that model's LP relaxation and turns the LP duals into a valid Lagrangian bound with a
penalty per candidate. Rounding the LP gives a good feasible choice, and every candidate whose
penalty exceeds the gap to it is removed. HiGHS (``scipy.optimize.milp``) solves the rest as a
MILP with zero optimality gap.
"""

from moa_search.knapsack._problem import BUDGET_TOLERANCE, KnapsackSolution
from moa_search.knapsack._solve import solve_front, solve_knapsack

__all__ = ["BUDGET_TOLERANCE", "KnapsackSolution", "solve_front", "solve_knapsack"]
