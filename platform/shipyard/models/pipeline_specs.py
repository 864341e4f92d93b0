"""DeepSpeed layer specs that build a piece by calling a function (imported only by code that
builds pipelines: DeepSpeed is slow to import)."""

from __future__ import annotations

from collections.abc import Callable

from deepspeed.runtime.pipe import LayerSpec, TiedLayerSpec
from torch import nn


class PieceSpec(LayerSpec):
    """A pipeline layer that `make()` builds, only on the stage that holds it."""

    def __init__(self, make: Callable[[], nn.Module], typename: type[nn.Module]):
        super().__init__(typename)
        self.make = make

    def build(self, log: bool = False) -> nn.Module:
        return self.make()


class TiedPieceSpec(TiedLayerSpec):
    """A tied pipeline layer (an embedding shared with the output projection) that `make()`
    builds on each stage that uses it."""

    def __init__(self, make: Callable[[], nn.Module], key: str, typename: type, **options):
        super().__init__(key, typename, **options)
        self.make = make

    def build(self, log: bool = False) -> nn.Module:
        return self.make()
