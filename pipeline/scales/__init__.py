"""The scale registry: scales are data files, loaded into frozen :class:`Scale` objects."""

from pipeline.scales.registry import (
    Band,
    Norms,
    Registry,
    Scale,
    load_registry,
    load_scale,
)

__all__ = ["Band", "Norms", "Registry", "Scale", "load_registry", "load_scale"]
