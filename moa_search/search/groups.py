"""Head groups: the units that get one searched window each."""

from __future__ import annotations

from dataclasses import dataclass

from moa_search.models import ModelShape
from moa_search.space import Granularity


@dataclass(frozen=True)
class HeadGroups:
    """Maps searched groups to the query heads they cover.

    With ``kv_head`` granularity a group is one (layer, KV head) and covers the query heads that
    read that KV head; with ``query_head`` granularity a group is one (layer, query head).
    """

    shape: ModelShape
    granularity: Granularity

    @property
    def heads_per_group(self) -> int:
        """Query heads in one group."""
        return self.shape.group_size if self.granularity is Granularity.KV_HEAD else 1

    @property
    def groups_per_layer(self) -> int:
        """Groups in one layer."""
        return self.shape.num_query_heads // self.heads_per_group

    @property
    def num_groups(self) -> int:
        """Groups in the model."""
        return self.shape.num_layers * self.groups_per_layer

    def label(self, group: int) -> str:
        """Name a group as ``L<layer>.kv<head>`` or ``L<layer>.q<head>``; also its Optuna parameter name."""
        layer, index = divmod(group, self.groups_per_layer)
        kind = "kv" if self.granularity is Granularity.KV_HEAD else "q"
        return f"L{layer}.{kind}{index}"

    def layer_of(self, group: int) -> int:
        """Return the layer a group belongs to."""
        return group // self.groups_per_layer

    def expand(self, group_windows: list[int | None]) -> list[list[int | None]]:
        """Turn one window per group into ``[layers][query_heads]`` windows."""
        if len(group_windows) != self.num_groups:
            raise ValueError(f"expected {self.num_groups} group windows, got {len(group_windows)}")
        per_layer = self.groups_per_layer
        return [
            [
                group_windows[layer * per_layer + head // self.heads_per_group]
                for head in range(self.shape.num_query_heads)
            ]
            for layer in range(self.shape.num_layers)
        ]
