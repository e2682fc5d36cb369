"""A Bayesian additive model of a config's NLL increase, fitted to exact evaluations.

The model of the NLL increase of a config ``c`` (one candidate index per head group) is

    f(c) = sum over layers l of  a[l] * E_l(c) + b[l] * U_l(c)
         + sum over groups g of  sum over candidates j with c[g] <= j < widest of  step[g, j]

where ``E_l`` sums the profile estimates of layer l's groups and ``U_l`` sums the uniform-window
term: the measured NLL increase of the uniform config at each group's window, divided by the number
of groups. ``step[g, j]`` is what group g loses when its window shrinks from candidate j + 1 to j.
So a group's term grows as its window shrinks, and one measurement at a small window also informs
the larger ones. The prior is ``a = 0``, ``b = 1`` and ``step = 0``: before any evaluation the model
predicts the uniform-window term.

Fitting is Bayesian linear regression with a diagonal Gaussian prior, so the posterior mean is the
ridge solution and the posterior gives each prediction a standard deviation. It is computed in the
dual (kernel) form, which costs O(n² · groups) for n evaluations and never builds the
``groups × candidates`` feature matrix, so it scales to models with a thousand head groups. The
posterior mean stays additive over groups, so :meth:`AdditiveSurrogate.table` turns it into a
``[groups, candidates]`` loss table that the multiple-choice knapsack minimises exactly.
"""

from __future__ import annotations

import numpy as np

# Prior precision of the per-layer weights a and b, in 1 / (squared NLL increase): loose, so a
# handful of evaluations moves them.
LAYER_PRECISION = 1e-3
# Prior precision of each step: tighter, because there are groups × candidates of them.
STEP_PRECISION = 0.1


class AdditiveSurrogate:
    """Posterior of the additive model above, given exact evaluations.

    Args:
        estimates: float64 ``[groups, candidates]`` profile estimates of each group's NLL increase.
        uniform: float64 ``[candidates]`` uniform-window term of one group at each candidate.
        layer_of_group: int ``[groups]`` layer index of each group.
    """

    def __init__(self, estimates: np.ndarray, uniform: np.ndarray, layer_of_group: np.ndarray):
        self.estimates = np.asarray(estimates, dtype=np.float64)
        self.uniform = np.asarray(uniform, dtype=np.float64)
        self.layer_of_group = np.asarray(layer_of_group)
        self.num_groups, self.num_candidates = self.estimates.shape
        self.num_layers = int(self.layer_of_group.max()) + 1
        self._choices = np.zeros((0, self.num_groups), dtype=np.int64)
        self._dual = np.zeros(0)  # (K + I)^-1 (y - prior mean), one entry per evaluation
        self._factor: np.ndarray | None = None  # Cholesky factor of K + I
        self.noise_variance = 1.0

    def layer_features(self, choices: np.ndarray) -> np.ndarray:
        """Sum the estimates and the uniform term of each config per layer.

        Args:
            choices: int ``[configs, groups]`` candidate indices.

        Returns:
            float64 ``[configs, 2 * layers]``: ``E_l`` for every layer, then ``U_l`` for every
            layer.
        """
        choices = np.atleast_2d(choices)
        in_layer = np.eye(self.num_layers)[self.layer_of_group]  # [groups, layers] indicator
        estimates = self.estimates[np.arange(self.num_groups), choices] @ in_layer
        return np.concatenate([estimates, self.uniform[choices] @ in_layer], axis=1)

    def _prior_mean(self, choices: np.ndarray) -> np.ndarray:
        return self.uniform[choices].sum(axis=1)

    def _kernel(self, left: np.ndarray, right: np.ndarray) -> np.ndarray:
        """Return the prior covariance (over the noise variance) of two sets of configs.

        Returns:
            float64 ``[len(left), len(right)]``.
        """
        layer_part = self.layer_features(left) @ self.layer_features(right).T / LAYER_PRECISION
        # The step features of a group at candidate c are ones for j in [c, widest), so two configs
        # share widest - max(c, c') of them.
        widest = self.num_candidates - 1
        shared = np.zeros((left.shape[0], right.shape[0]))
        for group in range(self.num_groups):
            shared += widest - np.maximum(left[:, group, None], right[None, :, group])
        return layer_part + shared / STEP_PRECISION

    def fit(self, choices: np.ndarray, nll_increase: np.ndarray) -> None:
        """Condition the model on exact evaluations.

        Args:
            choices: int ``[configs, groups]`` candidate indices of the evaluated configs.
            nll_increase: float64 ``[configs]`` their measured ``log(ppl / dense ppl)``.
        """
        self._choices = np.atleast_2d(np.asarray(choices, dtype=np.int64))
        target = np.asarray(nll_increase, dtype=np.float64)
        residual = target - self._prior_mean(self._choices)
        gram = self._kernel(self._choices, self._choices) + np.eye(len(target))
        self._factor = np.linalg.cholesky(gram)
        self._dual = self._solve(residual)
        # The residuals of the posterior mean at the data, r - K (K + I)^-1 r, equal the dual
        # weights. The noise variance comes from them, and the prior scales with it, as in ridge
        # regression.
        self.noise_variance = max(float(self._dual @ self._dual) / max(len(target) - 1, 1), 1e-12)

    def _solve(self, right: np.ndarray) -> np.ndarray:
        lower = np.linalg.solve(self._factor, right)
        return np.linalg.solve(self._factor.T, lower)

    def table(self) -> np.ndarray:
        """Return the posterior mean as a loss table: a config's mean is the sum of its entries.

        Returns:
            float64 ``[groups, candidates]``.
        """
        layers = self.num_layers
        weights = self.layer_features(self._choices).T @ self._dual / LAYER_PRECISION
        estimate_weight = weights[:layers][self.layer_of_group]
        uniform_weight = 1.0 + weights[layers:][self.layer_of_group]
        table = estimate_weight[:, None] * self.estimates + uniform_weight[:, None] * self.uniform
        # step[g, j] sums the dual weights of the evaluations whose group g sits at or below j.
        steps = np.zeros((self.num_groups, self.num_candidates))
        for group in range(self.num_groups):
            steps[group] = np.bincount(
                self._choices[:, group], self._dual, minlength=self.num_candidates
            )
        steps = np.cumsum(steps, axis=1)[:, :-1] / STEP_PRECISION
        # A group at candidate c collects the steps j = c .. widest - 1.
        table[:, :-1] += np.cumsum(steps[:, ::-1], axis=1)[:, ::-1]
        return table

    def predict(self, choices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Return the posterior mean and standard deviation of the NLL increase of configs.

        Args:
            choices: int ``[configs, groups]`` candidate indices.

        Returns:
            Two float64 ``[configs]`` arrays: mean and standard deviation.
        """
        choices = np.atleast_2d(np.asarray(choices, dtype=np.int64))
        prior = self._prior_mean(choices)
        # The diagonal of the kernel: a config shares all its features with itself.
        layer_features = self.layer_features(choices)
        own = np.einsum("ij,ij->i", layer_features, layer_features) / LAYER_PRECISION
        own += (self.num_candidates - 1 - choices).sum(axis=1) / STEP_PRECISION
        if len(self._dual) == 0:
            return prior, np.sqrt(self.noise_variance * own)
        cross = self._kernel(choices, self._choices)
        explained = np.einsum("ij,ji->i", cross, self._solve(cross.T))
        variance = np.maximum(own - explained, 0.0)
        return prior + cross @ self._dual, np.sqrt(self.noise_variance * variance)
