"""MTCNN face detector (Zhang et al. 2016): a cascade of P-, R- and O-Nets giving boxes and five landmarks.

Weights are the PyTorch state dicts inside the ``facenet-pytorch`` 2.6.0 wheel (read from the wheel; the package
itself pins torch<2.3 and is not installed). Images are RGB in ``[0, 1]``; each network sees ``(255 x - 127.5) / 128``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from kornia.geometry.bbox import nms
from torch import Tensor, nn

from redteam.api import TARGETS, Detections, FaceDetector, ModelCard, Preprocessing
from redteam.assets import RegistryPackage

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


def _square(boxes: Tensor) -> Tensor:
    """Grow boxes ``[N, 4]`` to squares around their centres."""
    centre = (boxes[:, :2] + boxes[:, 2:]) / 2
    half = (boxes[:, 2:] - boxes[:, :2]).max(dim=1, keepdim=True).values / 2
    return torch.cat([centre - half, centre + half], dim=1)


def _regress(boxes: Tensor, offsets: Tensor) -> Tensor:
    """Apply the networks' box corrections (fractions of the box size)."""
    size = (boxes[:, 2:] - boxes[:, :2]).repeat(1, 2)
    return boxes + offsets * size


def _slots(owner: Tensor, batch: int) -> tuple[Tensor, int]:
    """Place of each candidate among its image's (``owner [N]`` grouped by image) -> ``[N]`` and the most per image."""
    counts = torch.bincount(owner, minlength=batch)
    slot = torch.arange(len(owner), device=owner.device) - (counts.cumsum(0) - counts)[owner]
    return slot, int(counts.max()) if batch else 0


def _crops(images: Tensor, owner: Tensor, boxes: Tensor, size: int) -> Tensor:
    """Bilinear crops of ``boxes [N, 4]`` from ``images[owner]`` -> ``[N, 3, size, size]``, zeros outside the image.

    Box corners land on the crop's corner pixel centres (kornia's ``crop_and_resize``). One ``grid_sample`` over the
    batch, each image's crops stacked in its grid, keeps the backward pass to one image-sized gradient.

    Args:
        images: ``[B, 3, H, W]``; owner: ``[N]`` image of each box, grouped by image; boxes: ``[N, 4]`` x1, y1, x2, y2.
    """
    (batch, channels, height, width), count = images.shape, len(boxes)
    slot, most = _slots(owner, batch)
    steps = torch.linspace(0, 1, size, device=images.device, dtype=images.dtype)
    xs = (boxes[:, :1] + (boxes[:, 2:3] - boxes[:, :1]) * steps) * (2 / (width - 1)) - 1  # [N, size], in [-1, 1]
    ys = (boxes[:, 1:2] + (boxes[:, 3:] - boxes[:, 1:2]) * steps) * (2 / (height - 1)) - 1
    points = torch.stack([xs[:, None, :].expand(-1, size, -1), ys[:, :, None].expand(-1, -1, size)], -1)
    grid = images.new_full((batch, most, size, size, 2), 2.0)  # unused slots sample outside: zeros
    grid[owner, slot] = points
    crops = F.grid_sample(images, grid.flatten(1, 2), align_corners=True)  # [B, 3, most * size, size]
    return crops.unflatten(2, (most, size)).transpose(1, 2)[owner, slot].reshape(count, channels, size, size)


@dataclass
class _Pass:
    """One batched run of the cascade. Probabilities keep their autograd graph; boxes, and every choice made from
    the probabilities (thresholds, NMS), are constants. Candidates of all images are concatenated, grouped by image.

    ``pyramid``: P-Net face probabilities per scale, ``[B, h, w]`` each. ``owner``, ``p``, ``boxes``, ``r``: the
    proposals R-Net sees (``[N]``, ``[N]``, ``[N, 4]``, ``[N]``: image, P-Net and R-Net probability). ``refined``
    ``[M]``: the proposals O-Net sees (indices into the ``N``), with its crop boxes ``o_boxes [M, 4]``, probabilities
    ``o [M]``, box corrections ``o_offsets [M, 4]`` and landmarks ``points [M, 10]`` (fractions of the box).
    """

    pyramid: list[Tensor]
    owner: Tensor
    p: Tensor
    boxes: Tensor
    r: Tensor
    refined: Tensor
    o_boxes: Tensor
    o: Tensor
    o_offsets: Tensor
    points: Tensor


@TARGETS.register("mtcnn", "MTCNN P/R/O-Net cascade with 5 landmarks, facenet-pytorch wheel weights")
class MTCNN(FaceDetector):
    card = ModelCard(
        name="mtcnn",
        task="detection",
        architecture="MTCNN cascade: P-Net (12 px sliding window), R-Net (24 px), O-Net (48 px, 5 landmarks)",
        weights="PyPI facenet-pytorch 2.6.0, facenet_pytorch/data/{pnet,rnet,onet}.pt (read from the wheel)",
        licence="MIT (facenet-pytorch); original model by Zhang et al., MIT",
        preprocessing=Preprocessing(notes="each network sees its own crops of the image pyramid"),
        threshold=0.7,
        metrics={"recall": 1.0},
        parity="no reference runtime here (facenet-pytorch pins torch<2.3): its state dicts load strictly into the "
        "same P/R/O-Net layers; decoding and NMS follow its code; tests/test_align.py checks the landmarks on LFW",
        calibration="`redteam calibrate --target mtcnn --data ../shared/data/faces`: a face above 0.7 whose box "
        "contains the image centre in all 3,407 LFW evaluation faces (median score 1.00)",
        notes="face_score follows the whole cascade: each P-Net cell -> R-Net crop -> O-Net crop chain scores its "
        "smallest margin over the stage thresholds on O-Net's scale, so face_score >= threshold exactly when detect() "
        "returns a face; evasion attacks push every chain under it",
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

    def _proposals(self, images: Tensor) -> tuple[list[Tensor], Tensor, Tensor, Tensor]:
        """P-Net over the image pyramid -> its probability maps (``[B, h, w]`` per scale) and the proposals: owner
        image ``[N]``, probability ``[N]`` (differentiable) and square box ``[N, 4]``, grouped by image."""
        height, width = images.shape[-2:]
        pyramid: list[Tensor] = []
        found: list[list[tuple[Tensor, Tensor]]] = [[] for _ in images]
        for scale in self._scales(height, width):
            size = (math.ceil(height * scale), math.ceil(width * scale))
            prob, offsets = self.pnet(self.card.preprocessing.normalise(F.interpolate(images, size=size, mode="area")))
            pyramid.append(prob)
            for image in range(len(images)):
                ys, xs = torch.nonzero(prob[image].detach() >= self.thresholds[0], as_tuple=True)
                if len(ys) == 0:
                    continue
                cell = torch.stack([xs, ys, xs, ys], 1).to(images) * 2 + images.new_tensor([1.0, 1.0, 12.0, 12.0])
                boxes = _regress(torch.floor(cell / scale), offsets[image, :, ys, xs].detach().T)
                keep = nms(boxes, prob[image, ys, xs].detach(), 0.5)
                found[image].append((boxes[keep], prob[image, ys[keep], xs[keep]]))
        owners, scores, squares = [], [], []
        for image, candidates in enumerate(found):
            if not candidates:
                continue
            boxes, prob = torch.cat([b for b, _ in candidates]), torch.cat([p for _, p in candidates])
            keep = nms(boxes, prob.detach(), 0.7)
            owners.append(torch.full((len(keep),), image, device=images.device))
            scores.append(prob[keep])
            squares.append(_square(boxes[keep]))
        if not owners:
            empty = images.new_zeros(0)
            return pyramid, empty.long(), empty, images.new_zeros(0, 4)
        return pyramid, torch.cat(owners), torch.cat(scores), torch.cat(squares)

    def _cascade(self, images: Tensor) -> _Pass:
        """The whole cascade on ``[B, 3, H, W]`` images in ``[0, 1]``, as :class:`_Pass`."""
        pyramid, owner, p, boxes = self._proposals(images)
        r, r_offsets = self.rnet(self.card.preprocessing.normalise(_crops(images, owner, boxes, 24)))
        passed = r.detach() >= self.thresholds[1]
        kept = [owner.new_zeros(0)]
        for image in range(len(images)):
            index = torch.nonzero(passed & (owner == image)).squeeze(1)
            kept.append(index[nms(boxes[index], r.detach()[index], 0.7)])
        refined = torch.cat(kept)
        o_boxes = _square(_regress(boxes[refined], r_offsets.detach()[refined]))
        o, o_offsets, points = self.onet(self.card.preprocessing.normalise(_crops(images, owner[refined], o_boxes, 48)))
        return _Pass(pyramid, owner, p, boxes, r, refined, o_boxes, o, o_offsets, points)

    differentiable_landmarks = True

    @torch.no_grad()
    def detect(self, images: Tensor) -> list[Detections]:
        return self.faces(images)

    def faces(self, images: Tensor) -> list[Detections]:
        """As :meth:`detect`; the landmarks keep O-Net's gradient (boxes and choices are constants)."""
        run = self._cascade(images.float())
        found = []
        for image in range(len(images)):
            index = torch.nonzero((run.owner[run.refined] == image) & (run.o >= self.threshold)).squeeze(1)
            boxes, scores, points = run.o_boxes[index], run.o[index], run.points[index]
            size = boxes[:, 2:] - boxes[:, :2]
            landmarks = torch.stack([points[:, :5], points[:, 5:]], dim=2) * size[:, None] + boxes[:, None, :2]
            boxes = _regress(boxes, run.o_offsets[index])
            keep = _nms_min(boxes, scores, 0.7)
            found.append(Detections(boxes[keep].cpu(), scores[keep].cpu(), landmarks[keep].cpu()))
        return found

    def candidate_scores(self, images: Tensor) -> Tensor:
        """The cascade's decision as differentiable confidences, the best ``>= threshold`` exactly when it finds a face.

        Each chain of candidates the cascade follows (a P-Net cell, the R-Net crop of its box, the O-Net crop of
        R-Net's box) scores its smallest margin over its stages' thresholds, put on the final stage's scale:
        ``threshold + min(p - t_P, r - t_R, o - threshold)``; a chain R-Net stops scores its (negative) margin there,
        and the image's best cell below P-Net's threshold counts as one more candidate, so scores stay finite with a
        gradient when nothing is found. Chains dropped by NMS are represented by the chain that dropped them. Boxes
        are constants; the crops are re-sampled differentiably, exactly as the cascade samples them. Agreement with
        :meth:`detect` holds by construction (both read one pass of the cascade): on 256 LFW faces, clean and under
        PGD, ``face_score >= threshold`` and "detect() finds a face" never disagreed (tests/test_evasion.py).

        Args:
            images: ``[B, 3, H, W]`` in ``[0, 1]``.
        Returns:
            ``[B, K]``: the best rejected P-Net cell, then each image's chains (``-inf`` padding).
        """
        run = self._cascade(images)
        t_p, t_r = self.thresholds[:2]
        below = [torch.where(p.detach() < t_p, p, -math.inf).flatten(1).amax(dim=1) for p in run.pyramid]
        rejected = torch.stack(below, 1).amax(dim=1) - t_p
        margin = torch.minimum(run.p - t_p, run.r - t_r)
        final = torch.full_like(margin, math.inf).index_put((run.refined,), run.o - self.threshold)
        counted = (run.r.detach() < t_r).index_fill(0, run.refined, True)  # every chain but those NMS dropped
        owner, chains = run.owner[counted], torch.minimum(margin, final)[counted]
        slot, most = _slots(owner, len(images))
        padded = rejected.new_full((len(images), most), -math.inf).index_put((owner, slot), chains)
        return torch.cat([rejected[:, None], padded], 1) + self.threshold

    def face_score(self, images: Tensor) -> Tensor:
        """``[B, 3, H, W]`` -> ``[B]``: the best of :meth:`candidate_scores`."""
        return self.candidate_scores(images).amax(dim=1)


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
    return torch.tensor(keep, dtype=torch.long, device=boxes.device)
