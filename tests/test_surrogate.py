"""The additive surrogate against an explicit ridge regression, and the hypervolume against a grid."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from moa_search.search.hypervolume import hypervolume, non_dominated
from moa_search.search.surrogate import LAYER_PRECISION, STEP_PRECISION, AdditiveSurrogate

LAYER_OF_GROUP = np.array([0, 0, 1, 1, 2, 2])
NUM_CANDIDATES = 4


def make_surrogate(seed: int = 0) -> AdditiveSurrogate:
    rng = np.random.default_rng(seed)
    estimates = rng.normal(0.0, 0.01, size=(len(LAYER_OF_GROUP), NUM_CANDIDATES))
    estimates[:, -1] = 0.0
    uniform = np.array([0.04, 0.02, 0.005, 0.0])
    return AdditiveSurrogate(estimates, uniform, LAYER_OF_GROUP)


def explicit_features(surrogate: AdditiveSurrogate, choices: np.ndarray) -> np.ndarray:
    """Build the feature matrix the dual form avoids: layer sums, then one step indicator per (group, j)."""
    steps = np.zeros((len(choices), surrogate.num_groups, NUM_CANDIDATES - 1))
    for row, choice in enumerate(choices):
        for group, candidate in enumerate(choice):
            steps[row, group, candidate:] = 1.0
    return np.concatenate(
        [surrogate.layer_features(choices), steps.reshape(len(choices), -1)], axis=1
    )


def random_choices(rng: np.random.Generator, count: int) -> np.ndarray:
    return rng.integers(0, NUM_CANDIDATES, size=(count, len(LAYER_OF_GROUP)))


def test_fit_matches_primal_ridge() -> None:
    surrogate = make_surrogate()
    rng = np.random.default_rng(1)
    choices = random_choices(rng, 15)
    increases = rng.uniform(0.0, 0.2, size=15)
    features = explicit_features(surrogate, choices)
    layers = surrogate.num_layers
    precision = np.full(features.shape[1], STEP_PRECISION)
    precision[: 2 * layers] = LAYER_PRECISION
    prior = np.zeros(features.shape[1])
    prior[layers : 2 * layers] = 1.0
    gram = features.T @ features + np.diag(precision)
    weights = np.linalg.solve(gram, features.T @ increases + precision * prior)
    residual = increases - features @ weights
    noise_variance = residual @ residual / (len(increases) - 1)

    surrogate.fit(choices, increases)

    queries = random_choices(rng, 20)
    query_features = explicit_features(surrogate, queries)
    mean, std = surrogate.predict(queries)
    expected_std = np.sqrt(
        noise_variance
        * np.einsum("ij,ji->i", query_features, np.linalg.solve(gram, query_features.T))
    )
    groups = np.arange(surrogate.num_groups)
    table_sums = np.array([surrogate.table()[groups, query].sum() for query in queries])
    np.testing.assert_allclose(mean, query_features @ weights, rtol=1e-8, atol=1e-10)
    np.testing.assert_allclose(table_sums, query_features @ weights, rtol=1e-8, atol=1e-10)
    np.testing.assert_allclose(std, expected_std, rtol=1e-6, atol=1e-10)
    assert surrogate.noise_variance == pytest.approx(noise_variance, rel=1e-8)


def test_prior_predicts_uniform_term() -> None:
    surrogate = make_surrogate()
    choices = np.array([[0, 0, 0, 0, 0, 0], [3, 3, 3, 3, 3, 3], [0, 1, 2, 3, 0, 1]])

    mean, _ = surrogate.predict(choices)

    np.testing.assert_allclose(mean, [6 * 0.04, 0.0, 2 * 0.04 + 2 * 0.02 + 0.005])


def test_fit_recovers_additive_truth() -> None:
    """With enough noiseless evaluations of an additive truth, predictions of new configs are close."""
    surrogate = make_surrogate()
    rng = np.random.default_rng(2)
    truth = np.cumsum(rng.uniform(0.0, 0.05, size=(6, NUM_CANDIDATES))[:, ::-1], axis=1)[:, ::-1]
    truth[:, -1] = 0.0
    groups = np.arange(6)
    choices = random_choices(rng, 200)

    surrogate.fit(choices, np.array([truth[groups, choice].sum() for choice in choices]))

    queries = random_choices(rng, 50)
    mean, _ = surrogate.predict(queries)
    expected = np.array([truth[groups, query].sum() for query in queries])
    assert np.max(np.abs(mean - expected)) < 0.01 * np.ptp(expected)


def test_std_smaller_at_evaluated_configs() -> None:
    surrogate = make_surrogate()
    rng = np.random.default_rng(3)
    choices = np.zeros((8, 6), dtype=np.int64)
    choices[:, :3] = rng.integers(0, NUM_CANDIDATES, size=(8, 3))
    surrogate.fit(choices, rng.uniform(0.0, 0.2, size=8))

    # Groups 3 to 5 only ever took candidate 0 in the evaluations, so moving them is unexplored.
    unexplored = choices[:1].copy()
    unexplored[0, 3:] = 2
    _, seen_std = surrogate.predict(choices[:1])
    _, unseen_std = surrogate.predict(unexplored)

    assert seen_std[0] < unseen_std[0]


@pytest.mark.parametrize("seed", range(5))
def test_hypervolume_matches_grid_count(seed: int) -> None:
    rng = np.random.default_rng(seed)
    points = [(float(x), float(y)) for x, y in rng.integers(0, 10, size=(6, 2))]
    reference = (8.0, 9.0)
    # Unit cells [x, x+1) x [y, y+1) below the reference that some point dominates.
    cells = sum(
        any(px <= x and py <= y for px, py in points)
        for x, y in itertools.product(range(8), range(9))
    )

    assert hypervolume(points, reference) == pytest.approx(cells)


def test_non_dominated_drops_dominated_points() -> None:
    points = [(1.0, 5.0), (2.0, 3.0), (2.0, 4.0), (3.0, 3.0), (4.0, 1.0), (1.0, 5.0)]

    assert non_dominated(points) == [(1.0, 5.0), (2.0, 3.0), (4.0, 1.0)]
