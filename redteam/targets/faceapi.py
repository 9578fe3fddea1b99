"""face-api's face recognition net: dlib's ResNet descriptor as ``@vladmandic/face-api`` 1.7.15 ships and runs it.

The weights are a TF.js weights manifest (uint8-quantised) whose architecture lives in face-api's JavaScript
(``src/faceRecognitionNet``): conv + bias + per-channel scale, ReLU, a 3x3/2 max-pool, residual blocks whose
downsampling shortcut is a 2x2 average pool zero-padded to the branch's shape, a global mean and a 256 -> 128 dense
layer. That is dlib's face-descriptor ResNet, so the torch module is :class:`redteam.convert.dlib.DlibMetricResNet`,
filled from face-api's tensors. face-api subtracts the same mean RGB but divides by 255 where dlib divides by 256;
the factor is folded into the first convolution.
"""

from __future__ import annotations

import numpy as np
from torch import Tensor

from redteam.align import CANONICAL_LANDMARKS, CANONICAL_SIZE
from redteam.api import TARGETS, CentralCrop, FaceRecognizer, ModelCard, Preprocessing
from redteam.convert.dlib import DlibLayer, DlibMetricResNet, DlibNet
from redteam.convert.tfjs import TFJSModel, load_tfjs_weights
from redteam.datasets import FACE_API

RECOGNITION_MODEL = TFJSModel(
    FACE_API.file(
        "package/model/face_recognition_model-weights_manifest.json",
        "cbaffa501b0b9275a12b63357a6843e7e30c054e1c9151e1a5f879b26e32986b",
    ),
    (
        FACE_API.file(
            "package/model/face_recognition_model.bin",
            "b413e420d6840b2775fba32008db6f3cddb07d485967fb42cfcf379c16a8c589",
        ),
    ),
)

MEAN_RGB = (122.782, 117.001, 104.298)  # face-api's FaceRecognitionNet.forwardInput
INPUT_SIZE = 150
# Residual stages in face-api's forward order: (name, downsamples).
BLOCKS = [
    *((f"conv32_{i}", False) for i in (1, 2, 3)),
    ("conv64_down", True),
    *((f"conv64_{i}", False) for i in (1, 2, 3)),
    ("conv128_down", True),
    *((f"conv128_{i}", False) for i in (1, 2)),
    ("conv256_down", True),
    *((f"conv256_{i}", False) for i in (1, 2)),
    ("conv256_down_out", True),
]


def _face_box() -> CentralCrop:
    """face-api's ``alignDlib`` box on the canonical landmarks, as a central crop.

    face-api crops a square of side (mean eye-to-mouth distance) / 0.45 whose reference point, the centroid of the
    two eye centres and the mouth centre, sits at 50% across and 43% down (``FaceLandmarks.alignDlib``).
    """
    left_eye, right_eye, _, mouth_left, mouth_right = CANONICAL_LANDMARKS
    mouth = (mouth_left + mouth_right) / 2
    side = float(((mouth - left_eye).norm() + (mouth - right_eye).norm()) / 2 / 0.45)
    centre_y = float((left_eye[1] + right_eye[1] + mouth[1]) / 3) + (0.5 - 0.43) * side
    return CentralCrop(side / CANONICAL_SIZE, centre_y / CANONICAL_SIZE - 0.5)


def faceapi_resnet(weights: dict[str, np.ndarray]) -> DlibMetricResNet:
    """face-api's recognition net from its named tensors (``load_tfjs_weights``) as a torch module.

    Returns:
        a module mapping ``[B, 3, 150, 150]`` RGB in ``[0, 1]`` to ``[B, 128]`` raw descriptors.
    """

    def conv(prefix: str, stride: int, scale: float = 1.0) -> list[DlibLayer]:
        filters = weights[f"{prefix}/conv/filters"].transpose(3, 2, 0, 1) * np.float32(scale)  # HWIO -> OIHW
        # face-api pads stride-1 convolutions 'same' (1 px for 3x3) and strided ones 'valid'.
        padding = 0 if stride == 2 else filters.shape[-1] // 2
        settings = {"stride": stride, "padding": padding}
        return [
            DlibLayer("con", {"weight": filters, "bias": weights[f"{prefix}/conv/bias"]}, settings),
            DlibLayer(
                "affine", {"weight": weights[f"{prefix}/scale/weights"], "bias": weights[f"{prefix}/scale/biases"]}
            ),
        ]

    # x / 255 = (x / 256) * (256 / 255): dlib's input layer divides by 256, so the first filters absorb the rest.
    layers = [*conv("conv32_down", 2, scale=256 / 255), DlibLayer("relu"), DlibLayer("max_pool", {}, _pool(3, 2))]
    for name, down in BLOCKS:
        layers += [*conv(f"{name}/conv1", 2 if down else 1), DlibLayer("relu"), *conv(f"{name}/conv2", 1)]
        layers += [DlibLayer("avg_pool", {}, _pool(2, 2))] if down else []
        layers += [DlibLayer("add_prev"), DlibLayer("relu")]
    layers += [DlibLayer("avg_pool", {}, _pool(0, 1)), DlibLayer("fc", {"weight": weights["fc"].T})]
    return DlibMetricResNet(DlibNet(input_size=(INPUT_SIZE, INPUT_SIZE), mean_rgb=MEAN_RGB, layers=layers))


def _pool(window: int, stride: int) -> dict[str, int]:
    return {"window": window, "stride": stride, "padding": 0}  # window 0: the whole feature map


@TARGETS.register("faceapi-resnet", "face-api face recognition net (dlib ResNet, 128-d, Euclidean), face-api npm")
class FaceApiResNet(FaceRecognizer):
    card = ModelCard(
        name="faceapi-resnet",
        task="recognition",
        architecture="ResNet-34-like (dlib's face descriptor net): 7x7/2 stem, 3x3/2 max-pool, 14 residual blocks "
        "(32-256 channels), global mean, 256->128 dense; batch norms folded into per-channel scales",
        weights="npm @vladmandic/face-api 1.7.15, model/face_recognition_model-weights_manifest.json + .bin "
        "(uint8-quantised TF.js weights of Davis King's dlib model: ~3M faces of 7,485 people)",
        licence="MIT (face-api); original weights CC0 (dlib-models)",
        preprocessing=Preprocessing(
            size=(INPUT_SIZE, INPUT_SIZE),
            crop=_face_box(),
            mean=None,
            notes="face-api's alignDlib box (side = eye-to-mouth distance / 0.45); the network takes "
            "(255 x - (122.782, 117.001, 104.298)) / 255",
        ),  # fmt: skip
        embedding_dim=128,
        metric="euclidean",
        threshold=-0.6386,
        threshold_far=-0.5363,
        calibration="`redteam calibrate --data ../shared/data/faces-train`: 555 genuine and 100,000 impostor pairs of "
        "LFW View-1 training identities (disjoint from the evaluation faces); balanced accuracy 0.978 at the "
        "threshold, TAR 0.869 at FAR 1e-3, AUC 0.996",
        metrics={"verification_accuracy": 0.9775, "tar@far=1e-3": 0.8692, "auc": 0.9967},
        parity="max |descriptor difference| vs face-api 1.7.15's own network on tfjs 4.22 (pure-JS CPU backend) on "
        "8 LFW faces: 2.4e-7 (descriptor values reach 0.48) (tests/test_faceapi.py)",
        notes="thresholds are negative L2 distances between raw descriptors; face-api's own rule is same person "
        "when the distance < 0.6 (similarity > -0.6)",
    )

    weights = RECOGNITION_MODEL.files
    runtimes = ("torch", "onnxruntime")  # the whole network is self.net

    def __init__(self) -> None:
        super().__init__()
        self.net = faceapi_resnet(load_tfjs_weights(RECOGNITION_MODEL))

    def embed(self, images: Tensor) -> Tensor:
        return self.net(self.preprocess(images))
