"""scrfd: the converted SCRFD-500M and -2.5G graphs equal onnxruntime (InsightFace's runtime) on real faces in the
640 px canvas, batched (in passes of four canvases) while the files take one image at a time; detect() finds each
LFW face with its keypoints in order; without a file the target says where to get one."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import assert_one_centred_face_with_ordered_landmarks, shared_path
from torch import Tensor

from redteam.errors import MissingWeightsError
from redteam.targets.scrfd import SCRFD

ort = pytest.importorskip("onnxruntime", reason="the parity tests need onnxruntime (pip install onnxruntime)")


@pytest.fixture(scope="module", params=["scrfd_500m.onnx", "scrfd_2.5g.onnx"])
def weights(request):
    return shared_path("weights", request.param)


@pytest.fixture(scope="module")
def scrfd(weights) -> SCRFD:
    return SCRFD(weights=weights).eval()


@pytest.fixture(scope="module")
def lfw(faces) -> Tensor:
    return faces.load(range(0, 3400, 567))  # 6 faces of different people: two passes of the network (4 + 2)


def test_matches_onnxruntime_in_the_canvas(scrfd, weights, lfw):
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(str(weights), options, providers=["CPUExecutionProvider"])
    x, _ = scrfd._canvas(lfw)  # both runtimes get the same network input (the canvas is tested below)
    with torch.no_grad():
        scores, boxes, keypoints, scale = scrfd.raw(lfw)  # batched: raw() undoes the files' batch-1 row order
    assert scale == 640 / 250
    ours = [torch.cat(level, 1).numpy() for level in (scores, boxes, keypoints)]
    for image in range(len(lfw)):
        reference = session.run(None, {session.get_inputs()[0].name: x[image : image + 1].numpy()})
        theirs = [np.concatenate(reference[k : k + 3]) for k in (0, 3, 6)]  # per output kind, strides 8, 16, 32
        assert theirs[0].shape == (16800, 1) and theirs[1].shape == (16800, 4) and theirs[2].shape == (16800, 10)
        # Scores are probabilities; boxes and keypoints in strides reach |8|: float32 rounding of two runtimes.
        assert np.abs(ours[0][image] - theirs[0][:, 0]).max() < 1e-5
        assert np.abs(ours[1][image] - theirs[1]).max() < 2e-4
        assert np.abs(ours[2][image] - theirs[2]).max() < 2e-4


def test_canvas_is_insightfaces(scrfd):
    """InsightFace's SCRFD.detect preprocessing with OpenCV (on float pixels, so no uint8 rounding): resize with the
    aspect kept, paste at the top left of a black 640 x 640 image, blobFromImage(1 / 128, mean 127.5)."""
    cv2 = pytest.importorskip("cv2", reason="the canvas reference needs opencv-python-headless")
    for height, width in ((250, 400), (333, 180)):
        image = torch.rand(1, 3, height, width)
        ratio = height / width
        size = (640, int(640 / ratio)) if ratio > 1 else (int(640 * ratio), 640)
        pixels = image[0].permute(1, 2, 0).numpy() * 255
        canvas = np.zeros((640, 640, 3), np.float32)
        canvas[: size[0], : size[1]] = cv2.resize(pixels, (size[1], size[0]), interpolation=cv2.INTER_LINEAR)
        blob = cv2.dnn.blobFromImage(canvas, 1 / 128, (640, 640), (127.5, 127.5, 127.5))
        x, scale = scrfd._canvas(image)
        assert scale == pytest.approx(size[0] / height)
        assert np.abs(x.numpy() - blob).max() < 1e-4


def test_finds_each_lfw_face_with_keypoints_in_order(scrfd, lfw):
    for box in assert_one_centred_face_with_ordered_landmarks(scrfd, lfw):
        assert 60 < box[2] - box[0] < 140  # image pixels (the canvas scale is undone), LFW faces are ~100 px wide


def test_without_weights_says_where_to_get_them():
    with pytest.raises(MissingWeightsError, match=r"--weights det_10g\.onnx.*buffalo_l.*non-commercial"):
        SCRFD()
