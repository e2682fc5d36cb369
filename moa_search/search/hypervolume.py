"""Hypervolume of a two-objective front, both objectives minimised."""

from __future__ import annotations

from collections.abc import Iterable

Point = tuple[float, float]


def non_dominated(points: Iterable[Point]) -> list[Point]:
    """Return the points that no other point dominates, by increasing first coordinate."""
    front: list[Point] = []
    for first, second in sorted(set(points)):
        if not front or second < front[-1][1]:
            front.append((first, second))
    return front


def hypervolume(points: Iterable[Point], reference: Point) -> float:
    """Return the area that ``points`` dominate below ``reference``.

    Points with a first coordinate above the reference's, or a second at or above it, add nothing.
    """
    inside = [point for point in points if point[0] <= reference[0] and point[1] < reference[1]]
    staircase = non_dominated(inside)
    area = 0.0
    for index, (first, second) in enumerate(staircase):
        right = staircase[index + 1][0] if index + 1 < len(staircase) else reference[0]
        area += (right - first) * (reference[1] - second)
    return area
