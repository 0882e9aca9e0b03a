"""Torch modules (importing this imports torch)."""
from .functional import gem_torch
from .gem import GeM

__all__ = ["GeM", "gem_torch"]
