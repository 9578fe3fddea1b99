"""MTCNN face detector (Zhang et al. 2016): a cascade of P-, R- and O-Nets giving boxes and five landmarks.

Weights are the PyTorch state dicts inside the ``facenet-pytorch`` 2.6.0 wheel (read from the wheel; the package
itself pins torch<2.3 and is not installed). Images are RGB in ``[0, 1]``; each network sees ``(255 x - 127.5) / 128``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from kornia.geometry.bbox import nms
from kornia.geometry.transform import crop_and_resize
from torch import Tensor, nn

from redteam.assets import RegistryPackage
from redteam.targets.base import TARGETS, Detections, FaceDetector, ModelCard

FACENET_PYTORCH = RegistryPackage(
    name="facenet-pytorch",
    version="2.6.0",
    url="https://files.pythonhosted.org/packages/ed/2e/2d56386bc2f834cdc683743903852cf1428b4e5ee119f16cf808b589d3cd/"
    "facenet_pytorch-2.6.0-py3-none-any.whl",
    sha256="ecb82b27beb226d106f2219efe8f829b01b87a8595badd01545679bdb9f19cca",
    licence="MIT",
)
WEIGHTS = {
    "pnet": FACENET_PYTORCH.file(
        "facenet_pytorch/data/pnet.pt", "a2a71925e0b9996a42f63e47efc1ca19043e69558b5c523b978d611dfae49c8f"
    ),
    "rnet": FACENET_PYTORCH.file(
        "facenet_pytorch/data/rnet.pt", "bbb937de72efc9ef83b186c49f5f558467a1d7e3453a8ece0d71a886633f6a86"
    ),
    "onet": FACENET_PYTORCH.file(
        "facenet_pytorch/data/onet.pt", "165bfbe42940416ccfb977545cf0e976d5bf321f67083ae2aaaa5c764280118d"
    ),
}


class _ConvStack(nn.Module):
    """conv+PReLU layers (named conv1, prelu1, ...) with max-pools after the listed layers."""

    def __init__(self, channels: list[int], kernels: list[int], pools: dict[int, int]):
        super().__init__()
        self.pools = pools  # layer index -> pool kernel (stride 2, ceil mode as in the original Caffe model)
        for i, (c_in, c_out, k) in enumerate(zip(channels, channels[1:], kernels), start=1):
            setattr(self, f"conv{i}", nn.Conv2d(c_in, c_out, k))
            setattr(self, f"prelu{i}", nn.PReLU(c_out))
        self.depth = len(kernels)

    def features(self, x: Tensor) -> Tensor:
        for i in range(1, self.depth + 1):
            x = getattr(self, f"prelu{i}")(getattr(self, f"conv{i}")(x))
            if i in self.pools:
                x = F.max_pool2d(x, self.pools[i], 2, ceil_mode=True)
        return x

    @staticmethod
    def flatten(x: Tensor) -> Tensor:
        # The weights were converted from Caffe, whose dense layers read the feature map transposed.
        return x.permute(0, 3, 2, 1).flatten(1)


class PNet(_ConvStack):
    def __init__(self) -> None:
        super().__init__([3, 10, 16, 32], [3, 3, 3], pools={1: 2})
        self.conv4_1, self.conv4_2 = nn.Conv2d(32, 2, 1), nn.Conv2d(32, 4, 1)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        x = self.features(x)
        return F.softmax(self.conv4_1(x), dim=1)[:, 1], self.conv4_2(x)


class RNet(_ConvStack):
    def __init__(self) -> None:
        super().__init__([3, 28, 48, 64], [3, 3, 2], pools={1: 3, 2: 3})
        self.dense4, self.prelu4 = nn.Linear(576, 128), nn.PReLU(128)
        self.dense5_1, self.dense5_2 = nn.Linear(128, 2), nn.Linear(128, 4)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        x = self.prelu4(self.dense4(self.flatten(self.features(x))))
        return F.softmax(self.dense5_1(x), dim=1)[:, 1], self.dense5_2(x)


class ONet(_ConvStack):
    def __init__(self) -> None:
        super().__init__([3, 32, 64, 64, 128], [3, 3, 3, 2], pools={1: 3, 2: 3, 3: 2})
        self.dense5, self.prelu5 = nn.Linear(1152, 256), nn.PReLU(256)
        self.dense6_1, self.dense6_2, self.dense6_3 = nn.Linear(256, 2), nn.Linear(256, 4), nn.Linear(256, 10)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        x = self.prelu5(self.dense5(self.flatten(self.features(x))))
        return F.softmax(self.dense6_1(x), dim=1)[:, 1], self.dense6_2(x), self.dense6_3(x)


def _normalise(images: Tensor) -> Tensor:
    return (images * 255.0 - 127.5) / 128.0


def _square(boxes: Tensor) -> Tensor:
    """Grow boxes ``[N, 4]`` to squares around their centres."""
    centre = (boxes[:, :2] + boxes[:, 2:]) / 2
    half = (boxes[:, 2:] - boxes[:, :2]).max(dim=1, keepdim=True).values / 2
    return torch.cat([centre - half, centre + half], dim=1)


def _regress(boxes: Tensor, offsets: Tensor) -> Tensor:
    """Apply the networks' box corrections (fractions of the box size)."""
    size = (boxes[:, 2:] - boxes[:, :2]).repeat(1, 2)
    return boxes + offsets * size


def _crops(image: Tensor, boxes: Tensor, size: int) -> Tensor:
    """Bilinear crops of ``boxes [N, 4]`` from ``image [3, H, W]`` -> ``[N, 3, size, size]`` (zeros outside)."""
    x1, y1, x2, y2 = boxes.unbind(1)
    corners = torch.stack([torch.stack([x1, y1], 1), torch.stack([x2, y1], 1),
                           torch.stack([x2, y2], 1), torch.stack([x1, y2], 1)], 1)  # fmt: skip
    return crop_and_resize(image.expand(len(boxes), -1, -1, -1), corners, (size, size))


@TARGETS.register("mtcnn", "MTCNN P/R/O-Net cascade with 5 landmarks, facenet-pytorch wheel weights")
class MTCNN(FaceDetector):
    card = ModelCard(
        name="mtcnn",
        task="detection",
        architecture="MTCNN cascade: P-Net (12 px sliding window), R-Net (24 px), O-Net (48 px, 5 landmarks)",
        weights="PyPI facenet-pytorch 2.6.0, facenet_pytorch/data/{pnet,rnet,onet}.pt (read from the wheel)",
        licence="MIT (facenet-pytorch); original model by Zhang et al., MIT",
        input_size=(0, 0),
        channel_order="RGB",
        normalisation="(255 x - 127.5) / 128",
        threshold=0.7,
        notes="face_score is the P-Net face probability (max over the pyramid); detected() runs the whole cascade",
    )

    weights = tuple(WEIGHTS.values())

    def __init__(
        self,
        min_face: int = 20,
        thresholds: tuple[float, float, float] = (0.6, 0.7, 0.7),
        pyramid_factor: float = 0.709,
    ) -> None:
        super().__init__()
        self.pnet, self.rnet, self.onet = PNet(), RNet(), ONet()
        for name, net in (("pnet", self.pnet), ("rnet", self.rnet), ("onet", self.onet)):
            net.load_state_dict(torch.load(WEIGHTS[name].path(), map_location="cpu", weights_only=True))
        self.min_face, self.thresholds, self.pyramid_factor = min_face, thresholds, pyramid_factor
        self.score_threshold = thresholds[2]

    def _scales(self, height: int, width: int) -> list[float]:
        scale = 12.0 / self.min_face
        scales, side = [], min(height, width) * scale
        while side >= 12:
            scales.append(scale)
            scale *= self.pyramid_factor
            side *= self.pyramid_factor
        return scales

    def _proposals(self, image: Tensor) -> tuple[Tensor, Tensor]:
        """P-Net over the image pyramid -> candidate boxes ``[N, 4]`` and scores ``[N]``."""
        height, width = image.shape[-2:]
        all_boxes, all_scores = [], []
        for scale in self._scales(height, width):
            size = (math.ceil(height * scale), math.ceil(width * scale))
            scaled = F.interpolate(image[None], size=size, mode="area")
            prob, offsets = self.pnet(_normalise(scaled))
            ys, xs = torch.nonzero(prob[0] >= self.thresholds[0], as_tuple=True)
            if len(ys) == 0:
                continue
            cell = torch.stack([xs, ys, xs, ys], 1).float() * 2 + torch.tensor([1.0, 1.0, 12.0, 12.0])
            boxes = _regress(torch.floor(cell / scale), offsets[0, :, ys, xs].T)
            scores = prob[0, ys, xs]
            keep = nms(boxes, scores, 0.5)
            all_boxes.append(boxes[keep])
            all_scores.append(scores[keep])
        if not all_boxes:
            return torch.zeros(0, 4), torch.zeros(0)
        boxes, scores = torch.cat(all_boxes), torch.cat(all_scores)
        keep = nms(boxes, scores, 0.7)
        return _square(boxes[keep]), scores[keep]

    @torch.no_grad()
    def detect(self, images: Tensor) -> list[Detections]:
        return [self._detect_one(image) for image in images.float().cpu()]

    def _detect_one(self, image: Tensor) -> Detections:
        empty = Detections(torch.zeros(0, 4), torch.zeros(0), torch.zeros(0, 5, 2))
        boxes, _ = self._proposals(image)
        if len(boxes) == 0:
            return empty
        scores, offsets = self.rnet(_normalise(_crops(image, boxes, 24)))
        keep = scores >= self.thresholds[1]
        boxes, scores, offsets = boxes[keep], scores[keep], offsets[keep]
        keep = nms(boxes, scores, 0.7)
        if len(keep) == 0:
            return empty
        boxes = _square(_regress(boxes[keep], offsets[keep]))
        scores, offsets, points = self.onet(_normalise(_crops(image, boxes, 48)))
        keep = scores >= self.thresholds[2]
        boxes, scores, offsets, points = boxes[keep], scores[keep], offsets[keep], points[keep]
        size = boxes[:, 2:] - boxes[:, :2]
        landmarks = torch.stack([points[:, :5], points[:, 5:]], dim=2) * size[:, None] + boxes[:, None, :2]
        boxes = _regress(boxes, offsets)
        keep = _nms_min(boxes, scores, 0.7)
        return Detections(boxes[keep], scores[keep], landmarks[keep])

    def detected(self, images: Tensor, scores: Tensor | None = None) -> Tensor:
        """Whether the whole cascade still finds a face (its P-Net score alone can stay high when O-Net rejects)."""
        found = [bool((d.scores >= self.threshold).any()) for d in self.detect(images)]
        return torch.tensor(found, device=images.device)

    def face_score(self, images: Tensor) -> Tensor:
        """Highest P-Net face probability over the pyramid (differentiable proxy used for evasion)."""
        height, width = images.shape[-2:]
        best = []
        for scale in self._scales(height, width):
            size = (math.ceil(height * scale), math.ceil(width * scale))
            prob, _ = self.pnet(_normalise(F.interpolate(images, size=size, mode="area")))
            best.append(prob.flatten(1).amax(dim=1))
        return torch.stack(best, 1).amax(dim=1)


def _nms_min(boxes: Tensor, scores: Tensor, threshold: float) -> Tensor:
    """NMS where overlap is intersection over the smaller box (removes faces nested in bigger ones)."""
    order = scores.argsort(descending=True)
    area = (boxes[:, 2:] - boxes[:, :2]).prod(dim=1)
    keep: list[int] = []
    while len(order):
        i = int(order[0])
        keep.append(i)
        rest = order[1:]
        top_left = torch.maximum(boxes[i, :2], boxes[rest, :2])
        bottom_right = torch.minimum(boxes[i, 2:], boxes[rest, 2:])
        inter = (bottom_right - top_left).clamp(min=0).prod(dim=1)
        order = rest[inter / torch.minimum(area[i], area[rest]) <= threshold]
    return torch.tensor(keep, dtype=torch.long)
