"""Face datasets: identities and canonical face images (see ``redteam.align``), loaded lazily in batches.

Sources:
- a folder of identity folders ``root/<identity>/*.jpg|png`` (LFW-framed crops, or any photos with ``align=True``);
  a LFW ``pairs.txt`` beside or inside it switches verification to LFW's own pairs;
- ``lfw``: LFW through scikit-learn's downloader (needs the network once), with its ``pairs.txt``;
- ``default``: the embedded demo, built offline from the group photos that npm ``@vladmandic/face-api`` ships.
"""

from __future__ import annotations

import hashlib
from abc import ABC, abstractmethod
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError
from torch import Tensor

from redteam.align import CANONICAL_SIZE, align_faces
from redteam.assets import RegistryPackage, cache_dir, files_digest
from redteam.errors import DataError

if TYPE_CHECKING:
    from redteam.api.targets import FaceDetector

#: The zoo detector whose landmarks align arbitrary photos (``--align``) and the demo photos.
ALIGNING_DETECTOR = "mtcnn"
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp"}
MIN_IMAGE_SIDE = 32


@dataclass(frozen=True)
class FaceRecord:
    identity: str
    source: str  # file path, or a description for images that are not files


@dataclass(frozen=True)
class Pair:
    """A verification pair from a protocol file: ``first`` and ``second`` are dataset indices."""

    first: int
    second: int
    same: bool


class FaceDataset(ABC):
    name: str
    spec: str  # what :func:`open_dataset` opens it again from, in any working directory
    description: str
    records: list[FaceRecord]
    pairs: list[Pair] | None = None
    #: Images left out because a face model cannot use them (``skip_bad``), one line each.
    skipped: Sequence[str] = ()

    def __len__(self) -> int:
        return len(self.records)

    @abstractmethod
    def load(self, indices: Sequence[int]) -> Tensor:
        """Canonical face images ``[len(indices), 3, S, S]`` in ``[0, 1]``."""

    @abstractmethod
    def fingerprint(self) -> str:
        """A digest of everything that determines what ``load`` returns: the images' content, not their paths (a
        photo replaced at the same path changes it)."""

    @cached_property
    def by_identity(self) -> dict[str, list[int]]:
        groups: dict[str, list[int]] = defaultdict(list)
        for index, record in enumerate(self.records):
            groups[record.identity].append(index)
        return dict(groups)


def open_image(path: Path | IO[bytes], decode: bool = True, name: str | None = None) -> Image.Image:
    """Open an image file or stream (decoding its pixels unless ``decode`` is False), with a one-line error naming
    it (``name``, else ``path``) for anything a face model cannot use: unreadable, empty, grayscale or tiny."""
    name = name or str(path)
    try:
        image = Image.open(path)
        if decode:
            image.load()
    except (UnidentifiedImageError, Image.DecompressionBombError, OSError, SyntaxError, ValueError) as error:
        raise DataError(f"cannot read image {name}: {error}") from None
    if image.mode in ("1", "L", "LA", "I", "I;16", "F"):
        raise DataError(f"{name} is a grayscale image; the face models here need colour (RGB) photos.")
    if min(image.size) < MIN_IMAGE_SIDE:
        raise DataError(f"{name} is {image.size[0]}x{image.size[1]} pixels; faces need at least {MIN_IMAGE_SIDE}.")
    return image


def read_image(path: Path) -> Image.Image:
    return open_image(path).convert("RGB")


def to_tensor(image: Image.Image) -> Tensor:
    """PIL RGB -> ``[3, H, W]`` float in ``[0, 1]``."""
    return torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1).float() / 255.0


def square_resize(image: Tensor, size: int) -> Tensor:
    """Central square crop then resize: ``[3, H, W]`` -> ``[3, size, size]``."""
    height, width = image.shape[-2:]
    side = min(height, width)
    top, left = (height - side) // 2, (width - side) // 2
    image = image[:, top : top + side, left : left + side]
    if side == size:
        return image
    return F.interpolate(image[None], size=(size, size), mode="bilinear", antialias=True, align_corners=False)[0]


class ImageFolderDataset(FaceDataset):
    """``root/<identity>/<image>`` with LFW-framed faces, or arbitrary photos when ``align`` (MTCNN + alignment).

    An image a face model cannot use (unreadable, grayscale, tiny) stops the dataset with a one-line error naming
    it; with ``skip_bad``, every image is decoded up front and the bad ones are left out and listed in ``skipped``.
    """

    def __init__(
        self,
        root: Path,
        image_size: int = CANONICAL_SIZE,
        align: bool = False,
        pairs_file: Path | None = None,
        skip_bad: bool = False,
    ):
        self.root = Path(root)
        self.name = self.root.name
        self.spec = str(self.root.expanduser().resolve())
        self.image_size, self.align = image_size, align
        if not self.root.exists():
            raise DataError(f"dataset folder {self.root} does not exist.")
        if not self.root.is_dir():
            raise DataError(f"{self.root} is a file; --data wants a folder of identity folders.")
        records = []
        for identity_dir in sorted(p for p in self.root.iterdir() if p.is_dir()):
            for file in sorted(identity_dir.iterdir()):
                if file.suffix.lower() in IMAGE_SUFFIXES:
                    records.append(FaceRecord(identity_dir.name, str(file)))
        if not records:
            loose = [p for p in self.root.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES]
            layout = (
                " (found images directly in it: put each identity's photos in a folder of its own)" if loose else ""
            )
            raise DataError(f"no face images under {self.root}; expected {self.root}/<identity>/<image>{layout}.")
        self.skipped: list[str] = []
        usable = []
        for record in records:  # headers only unless skipping: bad files are reported before any work starts
            try:
                open_image(Path(record.source), decode=skip_bad).close()
            except DataError as error:
                if not skip_bad:
                    raise DataError(f"{error} (--skip-bad-images leaves such images out)") from None
                self.skipped.append(str(error))
                continue
            usable.append(record)
        if not usable:
            raise DataError(f"no usable face image under {self.root} ({len(self.skipped)} skipped).")
        records = usable
        self.records = records
        self.description = f"{len(records)} images of {len(self.by_identity)} identities in {self.root}"
        self.pairs_file = pairs_file or next(
            (p for p in (self.root / "pairs.txt", self.root.parent / "pairs.txt") if p.is_file()), None
        )
        if self.pairs_file is not None:
            self.pairs = parse_lfw_pairs(Path(self.pairs_file), self)
            self.description += f", verification pairs from {self.pairs_file}"
        self._detector: FaceDetector | None = None

    def fingerprint(self) -> str:
        files = [Path(record.source) for record in self.records]
        if self.pairs_file is not None:
            files.append(Path(self.pairs_file))
        return files_digest(self.root, files)

    def load(self, indices: Sequence[int]) -> Tensor:
        images = [to_tensor(read_image(Path(self.records[i].source))) for i in indices]
        if self.align:
            return torch.stack([self._aligned(image, self.records[i].source) for image, i in zip(images, indices)])
        return torch.stack([square_resize(image, self.image_size) for image in images])

    def _aligned(self, image: Tensor, source: str) -> Tensor:
        if self._detector is None:
            self._detector = aligning_detector()
        found = self._detector.detect(image[None])[0]
        if len(found.boxes) == 0:
            raise DataError(f"no face found in {source}.")
        assert found.landmarks is not None  # the aligning detector (MTCNN) finds five landmarks per face
        largest = int((found.boxes[:, 2:] - found.boxes[:, :2]).prod(1).argmax())
        return align_faces(image[None], found.landmarks[largest : largest + 1], self.image_size)[0]


def aligning_detector(**settings: Any) -> FaceDetector:
    """The detector whose five landmarks align photos (MTCNN, looked up in the target registry), in eval mode."""
    # Imported here: the target interface imports the dataset layer's neighbours, and the registry finds the detector
    # plugin at run time.
    from redteam.api.targets import TARGETS, FaceDetector

    detector = TARGETS.get(ALIGNING_DETECTOR)(**settings).eval()
    assert isinstance(detector, FaceDetector)
    return detector


def parse_lfw_pairs(path: Path, dataset: FaceDataset) -> list[Pair]:
    """LFW ``pairs.txt``: ``name n1 n2`` (same person) or ``name1 n1 name2 n2`` lines; header lines are skipped."""
    index = {(r.identity, Path(r.source).name): i for i, r in enumerate(dataset.records)}

    def lookup(name: str, number: str) -> int:
        key = (name, f"{name}_{int(number):04d}.jpg")
        if key not in index:
            raise DataError(f"{path} names {key[1]}, which is not in {getattr(dataset, 'root', dataset.name)}.")
        return index[key]

    pairs = []
    for line_number, line in enumerate(path.read_text().splitlines(), start=1):
        fields = line.split()
        if len(fields) == 3:
            pairs.append(Pair(lookup(fields[0], fields[1]), lookup(fields[0], fields[2]), True))
        elif len(fields) == 4:
            pairs.append(Pair(lookup(fields[0], fields[1]), lookup(fields[2], fields[3]), False))
        elif len(fields) > 2:
            raise DataError(f"{path}:{line_number}: not a LFW pairs line: {line!r}")
    if not pairs:
        raise DataError(f"{path} holds no LFW pairs.")
    return pairs


def lfw_dataset(data_home: Path | None = None, image_size: int = CANONICAL_SIZE) -> ImageFolderDataset:
    """LFW (funneled) with its ``pairs.txt``, downloaded once by scikit-learn into ``data_home``."""
    try:
        from sklearn.datasets import fetch_lfw_pairs
    except ImportError:
        raise DataError("the lfw dataset uses scikit-learn's downloader: pip install scikit-learn") from None
    home = Path(data_home or cache_dir() / "sklearn")
    try:
        fetch_lfw_pairs(subset="10_folds", data_home=home, funneled=True, download_if_missing=True)
    except OSError as error:
        raise DataError(
            f"cannot download LFW ({error}); without the network, pass --data path/to/lfw (identity folders, "
            "with LFW's pairs.txt beside them)."
        ) from None
    lfw_home = home / "lfw_home"
    return ImageFolderDataset(lfw_home / "lfw_funneled", image_size, pairs_file=lfw_home / "pairs.txt")


FACE_API = RegistryPackage(
    name="@vladmandic/face-api",
    version="1.7.15",
    url="https://registry.npmjs.org/@vladmandic/face-api/-/face-api-1.7.15.tgz",
    sha256="0d77fffeef362ef9c0939cf6c567f3a2e8e177f114fa257a3270cbd2e509b031",
    licence="MIT",
)
DEMO_PHOTOS = [
    FACE_API.file(f"package/demo/sample{i}.jpg", digest)
    for i, digest in enumerate(
        [
            "8ecae4b267b2d3169e06e00c7dee97097aa2a94635d45216f7732a5f4943cb51",
            "7d2b60ae6f13bf30f422e04df87451081a02c83de469056f25afb44b7000c691",
            "8eb081c9efb14370fa94d9feab9e5fbeafd19a627491853a80c2bf67f7ffa936",
            "729efa5923061d40eb4ed5f267a18cc7b8ba6f852bb2757b16d8b7e4937476fc",
            "6d45095ebb182d8f975c0790e0e4eefd86fbb40609cf4b271776d92e12662938",
            "9baad80f9d5e306fb9b8c0913d44445f1e95848df317530efb03d0934c57ba87",
        ],
        start=1,
    )
]


class DemoDataset(FaceDataset):
    """Faces from the six group photos in npm ``@vladmandic/face-api`` 1.7.15 (MIT), found by MTCNN and aligned.

    Each person appears in one photo only, so every identity gets three canonical images standing in for three
    photos: the aligned face, its mirror image, and the face framed 8% wider. Three is what a campaign about one
    person needs (an enrolment, one to optimise on, one held out). That is enough to exercise the whole pipeline
    offline on real faces and a real model; its accuracy numbers are a demo, not a benchmark (use LFW or your own
    data for that).
    """

    name = spec = "default"
    version = 2  # of how faces are cut from the photos (part of the cache's name and of the fingerprint)
    min_face = 80  # pixels in the 1920-wide photos: skips the few small false positives
    min_score = 0.95
    wider = 1.08  # the third view's framing: landmarks spread 8% wider apart before aligning

    def __init__(self, image_size: int = CANONICAL_SIZE):
        cached = cache_dir() / "datasets" / f"face-api-demo-v{self.version}-{image_size}.pt"
        try:
            payload = torch.load(cached, weights_only=True)
        except Exception:  # absent or damaged: build it again
            payload = self._build(image_size)
            cached.parent.mkdir(parents=True, exist_ok=True)
            torch.save(payload, cached)
        self._images: Tensor = payload["images"]
        self.records = [FaceRecord(identity, source) for identity, source in payload["records"]]
        self.description = (
            f"{len(self.by_identity)} faces from the demo photos of npm @vladmandic/face-api 1.7.15 (MIT), "
            "each with its mirror image and a wider framing as second and third photos"
        )

    def _build(self, image_size: int) -> dict:
        detector = aligning_detector(min_face=self.min_face)
        images, records = [], []
        for photo_number, photo in enumerate(DEMO_PHOTOS, start=1):
            image = to_tensor(read_image(photo.path()))
            found = detector.detect(image[None])[0]
            assert found.landmarks is not None  # the aligning detector (MTCNN) finds five landmarks per face
            keep = found.scores >= self.min_score
            boxes, landmarks = found.boxes[keep], found.landmarks[keep]
            for face_number, i in enumerate(boxes[:, 0].argsort().tolist(), start=1):  # left to right
                points = landmarks[i : i + 1]
                face = align_faces(image[None], points, image_size)[0]
                spread = points.mean(1, keepdim=True) + (points - points.mean(1, keepdim=True)) * self.wider
                framed = align_faces(image[None], spread, image_size)[0]
                identity = f"photo{photo_number}-person{face_number}"
                for view, pixels in (("", face), (" (mirrored)", face.flip(-1)), (" (framed wider)", framed)):
                    images.append((pixels * 255).round().to(torch.uint8))
                    records.append((identity, f"{photo.member} face {face_number}{view}"))
        return {"images": torch.stack(images), "records": records}

    def load(self, indices: Sequence[int]) -> Tensor:
        return self._images[list(indices)].float() / 255.0

    def fingerprint(self) -> str:
        """The demo photos' published checksums and how faces are cut from them."""
        source = ":".join(photo.sha256 for photo in DEMO_PHOTOS)
        return hashlib.sha256(f"{source}:{self.version}:{self._images.shape}".encode()).hexdigest()


#: Datasets known by name, no folder needed (the embedded demo faces; LFW, downloaded once): image size -> dataset.
NAMED_DATASETS: dict[str, Callable[[int], FaceDataset]] = {
    "default": DemoDataset,
    "lfw": lambda image_size: lfw_dataset(image_size=image_size),
}


def dataset_available(spec: str) -> bool:
    """Whether :func:`open_dataset` can find ``spec`` here: a named dataset, or a folder that exists."""
    return spec in NAMED_DATASETS or Path(spec).expanduser().exists()


def open_dataset(
    spec: str, image_size: int = CANONICAL_SIZE, align: bool = False, pairs: Path | None = None, skip_bad: bool = False
) -> FaceDataset:
    """``default``, ``lfw``, or a path to identity folders (``skip_bad``: leave out images that cannot be used)."""
    if spec in NAMED_DATASETS:
        return NAMED_DATASETS[spec](image_size)
    path = Path(spec).expanduser()
    if not path.exists():
        raise DataError(f"no dataset {spec!r}: give a folder of identity folders, 'lfw' or 'default'.")
    return ImageFolderDataset(path, image_size, align=align, pairs_file=pairs, skip_bad=skip_bad)
