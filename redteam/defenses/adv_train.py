"""Adversarial fine-tuning (``adv-train``): a recogniser's last blocks retrained against PGD on disjoint identities.

Madry et al.'s min-max on the embedding objective, at a CPU-feasible size (``redteam train adv``,
:func:`redteam.training.train_adversarially`): for each batch of training faces, PGD pushes each face's embedding
away from the *original* model's embedding of the same face; the chosen blocks are then trained to pull the
adversarial and the clean embeddings back to it. Anchoring on the frozen original keeps the embedding space, so
enrolments and the clean price stay small. The weights and their calibrated threshold live in the redteam cache
(:mod:`redteam.finetune`).

The result is used as ``--defense adv-train`` (any target that has been fine-tuned) and as the ``facenet-at`` target.
"""

from __future__ import annotations

from collections.abc import Callable

from redteam.api import DEFENSES, FaceRecognizer, ModelWrapper, Target
from redteam.assets import sha256_of
from redteam.errors import RedteamError
from redteam.finetune import apply_adversarial_weights, weights_path


@DEFENSES.register("adv-train", "adversarial fine-tuning: the target's last blocks retrained against PGD")
class AdversarialFineTuning(ModelWrapper):
    """The target with its adversarially fine-tuned blocks (``redteam train adv``), as a new model: the target it
    is given is left untouched (an undefended cell may still use it)."""

    name = "adv-train"

    def fingerprint(self, target_name: str) -> str:
        path = weights_path(target_name)
        return sha256_of(path) if path.is_file() else ""

    def wrap(self, target: Target, fresh: Callable[[], Target]) -> Target:
        defended = fresh()
        if not isinstance(defended, FaceRecognizer):
            raise RedteamError(f"adv-train fine-tunes recognisers; {target.card.name} is a {target.card.task} model.")
        defended.card = apply_adversarial_weights(defended, target.card.name)
        return defended
