"""``facenet-at``: FaceNet with its last blocks adversarially fine-tuned on training faces (``redteam train adv``)."""

from __future__ import annotations

from dataclasses import replace

from redteam.api import TARGETS
from redteam.assets import sha256_of
from redteam.finetune import apply_adversarial_weights, weights_path
from redteam.targets.facenet import FaceNet


@TARGETS.register("facenet-at", "FaceNet with its last blocks adversarially fine-tuned (`redteam train adv`)")
class FaceNetAT(FaceNet):
    card = replace(
        FaceNet.card,
        name="facenet-at",
        weights=FaceNet.card.weights + "; Block8 and the embedding layer fine-tuned by `redteam train adv --target "
        "facenet` (cached, keyed by the base graph's checksum)",
        threshold=None,
        threshold_far=None,
        calibration="calibrated on the training faces when trained; the loaded model's card carries it",
        metrics={},
        parity="the base graph is facenet's (2.8e-7 vs cv2.dnn); the fine-tuned blocks exist only here",
        notes="PGD adversarial fine-tuning on identities disjoint from the evaluation faces (redteam/finetune.py)",
    )
    frozen_graph = None  # its fine-tuned tail is not the graph file's

    @classmethod
    def weights_fingerprint(cls) -> str:
        path = weights_path("facenet")
        return f"{super().weights_fingerprint()}:{sha256_of(path) if path.is_file() else ''}"

    def __init__(self) -> None:
        super().__init__()
        self.card = apply_adversarial_weights(self, "facenet")
