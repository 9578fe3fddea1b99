"""The defense layer: input transforms (with a BPDA surrogate) and model wrappers, registered in ``DEFENSES``."""

from redteam.registry import Registry

DEFENSES: Registry[type] = Registry("defense")

__all__ = ["DEFENSES"]
