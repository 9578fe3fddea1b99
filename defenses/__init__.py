"""The defense layer: input transforms (with a BPDA surrogate) and model wrappers, registered in ``DEFENSES``."""

from redteam.defenses.base import DEFENSES, InputTransform, ModelWrapper

__all__ = ["DEFENSES", "InputTransform", "ModelWrapper"]
