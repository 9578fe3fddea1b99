"""The defense layer: input transforms (with a BPDA surrogate) and model wrappers, registered in ``DEFENSES``."""

from redteam.defenses import halftone  # noqa: F401  (registers the defense)
from redteam.defenses import adv_train, lqvae  # noqa: F401  (registers the defenses)
from redteam.defenses.base import DEFENSES, InputTransform, ModelWrapper

__all__ = ["DEFENSES", "InputTransform", "ModelWrapper"]
