"""Adversarial face masks (Zolfi et al. 2022, AdvMask): a printed texture on a mask over the nose, mouth and chin.

The mask is a cut-out in the print's coordinates: its top edge arches over the nose, its bottom rounds under the
chin, its sides reach the cheeks. The print bends around the lower face (a parabolic cylinder, so it turns away
from the camera towards the cheeks) and is placed from five landmarks: square to the eye line and scaled by the
eyes' distance, centred ``drop`` below the middle of the nose and mouth corners. Image formation, shooting
conditions and optimisation are the printable accessories' own (:mod:`redteam.attacks.accessory`).

Two variants:

- with ``--identity``, a mask for one wearer, for dodging and impersonation, judged on their held-out photos like
  the other accessories;
- without it, one universal mask for everyone, as in the paper: the identities are halved by the seed, the mask is
  learned on photos of the first half and judged on photos of people it never saw, for verification (each photo
  against its owner's enrolment photo) and identification (rank-1 over a gallery of one enrolment photo per
  person), beside the same photos without a mask, with a plain surgical-blue mask and with a random texture, and on
  every other recogniser in the zoo.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path

import pandas as pd
import torch
from torch import Tensor

from redteam.api import ATTACKS, Axis, CampaignContext, CampaignReport, FaceRecognizer
from redteam.attacks.accessory import (
    OUTLINE_EDGE,
    Accessory,
    Photos,
    Surface,
    SurfacePose,
    centred_pose,
    coverage_of,
    decided_right,
    wear,
)
from redteam.errors import DataError, RedteamError
from redteam.evidence import as_saved
from redteam.results import SYSTEM_STAGES, stage_shares, tally
from redteam.runtime import chunks
from redteam.threats import IdentificationObjective, VerificationObjective

#: Height / width of the print.
ASPECT = 0.6
#: How far the top edge dips from the nose to the cheeks, and the bottom edge rises from the chin to the cheeks,
#: in print heights.
TOP_DIP, CHIN_ROUNDING = 0.3, 0.3
#: A mask of common size covers this share of a canonical face image: 2.8 inter-ocular distances wide, 17.6 cm
#: flat for eyes 63 mm apart, as a surgical mask is 17.5 cm (``tests/test_accessories.py`` re-measures it).
STANDARD_AREA = 0.088
#: Print widths the area axis can reach, in inter-ocular distances.
WIDTHS = (0.5, 3.2)
#: Held-out wearers a universal mask is judged on when ``--limit`` is not given.
DEFAULT_WEARERS = 100
#: The conditions every universal mask is judged under, in order.
CONDITIONS = ("clean", "random", "plain", "mask")


def mask_outline(grid: Tensor, width: float) -> Tensor:
    """Coverage of the mask on a print ``width`` inter-ocular distances wide.

    Args:
        grid: ``[..., 2]`` print coordinates in ``[-1, 1]`` (``grid_sample``'s).
    Returns:
        ``[...]`` in ``[0, 1]``.
    """
    half_width, half_height = width / 2, width * ASPECT / 2
    x, y = grid[..., 0] * half_width, grid[..., 1] * half_height  # inter-ocular distances, y down
    sideways = grid[..., 0].square()
    top = -half_height + TOP_DIP * 2 * half_height * sideways
    bottom = half_height - CHIN_ROUNDING * 2 * half_height * sideways
    inside = torch.stack([y - top, bottom - y, half_width - x.abs()]).amin(0)
    return (0.5 + inside / OUTLINE_EDGE).clamp(0, 1)


@dataclass
class PeopleSplit:
    """A universal mask's people. ``gallery``: one enrolment photo per person with two or more photos, in name order
    (a person's gallery row is its position); ``learn`` / ``judge``: the photos worn while learning and when judged
    (dataset indices; never an enrolment photo), from disjoint halves of the people, with their owners' gallery rows
    (``learn_rows`` / ``judge_rows``)."""

    gallery: list[int]
    learn: list[int]
    learn_rows: list[int]
    judge: list[int]
    judge_rows: list[int]


@dataclass
class Wearers:
    """Photos with landmarks (``photos``), each photo's person as a row of the gallery (``label``, ``[N]``)."""

    photos: Photos
    label: Tensor


@dataclass
class Universal:
    """A universal mask of one size judged on the held-out wearers under the conditions after ``clean``:
    ``similarity`` to their own enrolment and ``identified`` (rank-1 right), each ``[3, N]``; ``stages``: where a face
    system stopped each photo (``SYSTEM_STAGES``; empty for a single recogniser); ``covered``: share of their face
    images it covers."""

    area: float
    width: float
    texture: Tensor
    similarity: Tensor
    identified: Tensor
    stages: list[list[str]]
    covered: float
    steps: int


@ATTACKS.register("mask", "adversarial face mask (Zolfi et al. 2022): universal, or for one wearer with --identity")
@dataclass
class Mask(Accessory):
    """:class:`~redteam.attacks.accessory.Accessory`'s settings, and ``drop``: inter-ocular distances from the
    middle of the nose and mouth corners down to the mask's centre. A universal mask (no ``--identity``) also
    takes ``learn_photos`` (photos of the learning half, spread over its people) and ``per_step`` (photos per
    step); ``--limit`` caps the held-out wearers (default :data:`DEFAULT_WEARERS`)."""

    name = "mask"
    noun = "mask"
    plain_colour = (0.45, 0.66, 0.82)  # surgical blue
    axes = {
        "area": Axis("area", "fraction of the face image", "mask area", (0.0, STANDARD_AREA), high=0.15),
    }
    threats = ("dodging", "impersonation", "identification")
    needs_identity = False

    steps: int = 150
    bend: float = 1.1
    drop: float = 0.08
    learn_photos: int = 256
    per_step: int = 8

    def __post_init__(self) -> None:
        super().__post_init__()
        if min(self.learn_photos, self.per_step) < 1:
            raise ValueError("learn_photos and per_step must be at least 1")

    def surface(self, area: float) -> tuple[Surface, float]:
        width = self.solved_size(area, lambda width: self.canonical_coverage(self._mask(width), width), WIDTHS)
        return self._mask(width), width

    def nominal_pose(self, landmarks: Tensor, width: float, surface: Surface) -> SurfacePose:
        nose_and_mouth = landmarks[:, 2:].mean(1)
        pitch = math.radians(self.pitch)
        return centred_pose(landmarks[:, :2], width, surface, self.drop, self.bend, pitch, origin=nose_and_mouth)

    def _mask(self, width: float) -> Surface:
        return Surface(ASPECT, self.camera_distance, partial(mask_outline, width=width))

    def run(self, context: CampaignContext) -> CampaignReport:
        if context.identity is not None:
            if context.threat == "identification":
                raise RedteamError(
                    "a mask for one wearer (--identity) supports --threat dodging or impersonation; without "
                    "--identity a universal mask is judged on identification too."
                )
            return super().run(context)
        if context.threat == "impersonation":
            raise RedteamError(
                "a universal mask (no --identity) supports --threat dodging or identification; pass --identity for "
                "a mask that impersonates someone."
            )
        return self._universal(context)

    # The universal mask.

    def _universal(self, context: CampaignContext) -> CampaignReport:
        target = context.target
        assert isinstance(target, FaceRecognizer)  # the engine checked the threat's task against the target
        split = self.split_people(context)
        learn, judged = (
            Wearers(self._photos(context, indices), torch.tensor(rows, device=context.device))
            for indices, rows in ((split.learn, split.learn_rows), (split.judge, split.judge_rows))
        )
        gallery = self._embed(context, target, split.gallery, "the gallery")
        outcomes = [
            Universal(
                **context.stage(
                    f"area {area:g}", partial(self._stored_universal, context, gallery, learn, judged, area)
                )
            )
            for area in context.budgets[1:]
        ]
        clean = self._judge(context, target, gallery, judged, None)
        final = outcomes[-1]
        identification = context.threat == "identification"

        similarity = torch.cat([clean[0][None], final.similarity])  # [conditions, N]
        identified = torch.cat([clean[1][None], final.identified])
        verified_share = decided_right(similarity, target.threshold, impersonate=False).float().mean(-1).tolist()
        identified_share = identified.float().mean(-1).tolist()
        metrics = {
            "area": final.area,
            "covered": final.covered,
            "threshold": target.threshold,
            **{f"{c}_verified": v for c, v in zip(CONDITIONS, verified_share)},
            **{f"{c}_identified": v for c, v in zip(CONDITIONS, identified_share)},
            **{f"{c}_similarity": s.mean().item() for c, s in zip(CONDITIONS, similarity)},
            "learning_people": len(set(split.learn_rows)),
            "judged_people": len(set(split.judge_rows)),
            "gallery": len(split.gallery),
            "learn_photos": len(split.learn),
            "judged_photos": len(split.judge),
        }
        rows = []
        for outcome in [None, *outcomes]:
            worn_similarity = clean[0] if outcome is None else outcome.similarity[-1]
            worn_identified = clean[1] if outcome is None else outcome.identified[-1]
            worn_verified = decided_right(worn_similarity, target.threshold, impersonate=False)
            rows.append({
                "area": 0.0 if outcome is None else outcome.area,
                "covered": 0.0 if outcome is None else outcome.covered,
                "verified": worn_verified.float().mean().item(),
                "identified": worn_identified.float().mean().item(),
                "accuracy": (worn_identified if identification else worn_verified).float().mean().item(),
                "steps": 0 if outcome is None else outcome.steps,
                **(self.sizes(outcome.area) if outcome else {}),
            })  # fmt: skip
        areas_table = pd.DataFrame(rows)
        names = judged.photos.names
        people = [context.dataset.records[i].identity for i in split.judge]
        per_photo = pd.DataFrame({"person": people, "photo": names})
        for k, condition in enumerate(CONDITIONS):
            per_photo[condition] = similarity[k].tolist()
            per_photo[f"{condition}_identified"] = identified[k].tolist()
        system_lines = []
        if clean[2]:  # a face system: where it stopped each photo
            per_photo["stage"] = final.stages[-1]
            metrics |= stage_shares(dict(zip(CONDITIONS, [clean[2], *final.stages])))
            system_lines.append(
                f"where {context.target_name} stopped the held-out wearers with the adversarial mask: "
                f"{tally(pd.Series(final.stages[-1]), SYSTEM_STAGES)} (without it: "
                f"{tally(pd.Series(clean[2]), SYSTEM_STAGES)}); a face no longer found is detector evasion, not dodging"
            )
        self._record_universal_evidence(context, gallery, judged, people, final, clean)
        transfer, skipped = self._universal_transfer(context, split.gallery, judged, final)
        measure = "identified (rank-1)" if identification else "verified"
        share = "identified" if identification else "verified"
        lines = [
            f"one mask learned on {len(split.learn)} photos of {metrics['learning_people']} people, worn in "
            f"{len(names)} photos of {metrics['judged_people']} others it never saw: {measure} "
            f"{metrics['clean_' + share]:.1%} without a mask, {metrics['plain_' + share]:.1%} with a plain one, "
            f"{metrics['random_' + share]:.1%} with a random texture, {metrics['mask_' + share]:.1%} with the "
            "adversarial one",
            f"verified against their own enrolment photo (threshold {target.threshold:.4f}): "
            + ", ".join(f"{c} {v:.1%}" for c, v in zip(CONDITIONS, verified_share))
            + f"; identified (rank-1 over {len(split.gallery)} people): "
            + ", ".join(f"{c} {v:.1%}" for c, v in zip(CONDITIONS, identified_share)),
            f"{self.print_line(final.area)}; it covers {final.covered:.1%} of the face image; {final.steps} steps of "
            f"{self.per_step} photos x {self.draws} shooting conditions",
            *system_lines,
            *skipped,
        ]
        return CampaignReport(
            metrics=metrics,
            tables={"transfer": transfer, "held_out": per_photo, "areas": areas_table},
            curve=areas_table[["area", "accuracy"]].rename(columns={"area": "eps"}).assign(n=len(names)),
            images=[
                self._save_print(context.out, final.texture, final.area),
                self._universal_faces(context, target, judged, final, clean[0]),
            ],
            lines=lines,
        )

    def split_people(self, context: CampaignContext) -> PeopleSplit:
        """People halved by the seed, the first half's photos learned on (at most ``learn_photos``), the second's
        judged (at most ``--limit``); photos are taken in turns across people, so a prefix spreads over many."""
        dataset = context.dataset
        people = sorted(name for name, photos in dataset.by_identity.items() if len(photos) >= 2)
        if len(people) < 4:
            raise DataError(
                f"a universal mask needs at least 4 people with two or more photos (two to learn on, two to judge "
                f"on); {dataset.name} has {len(people)}."
            )
        photos = {
            name: context.shuffled(sorted(dataset.by_identity[name]), "mask", context.seed, name) for name in people
        }
        row = {name: k for k, name in enumerate(people)}
        order = context.shuffled(people, "mask-split", context.seed)

        def in_turns(names: list[str], cap: int) -> tuple[list[int], list[int]]:
            taken: list[tuple[int, int]] = []
            for turn in range(max(len(photos[n]) for n in names) - 1):
                taken += [(photos[n][1 + turn], row[n]) for n in names if turn + 1 < len(photos[n])]
            return [index for index, _ in taken[:cap]], [label for _, label in taken[:cap]]

        learn, learn_rows = in_turns(order[: len(order) // 2], self.learn_photos)
        judge, judge_rows = in_turns(order[len(order) // 2 :], context.limit or DEFAULT_WEARERS)
        return PeopleSplit([photos[name][0] for name in people], learn, learn_rows, judge, judge_rows)

    def _embed(self, context: CampaignContext, model: FaceRecognizer, indices: list[int], what: str) -> Tensor:
        """Embeddings ``[N, D]`` of these dataset photos by ``model``."""
        advance = context.progress(f"mask: embedding {what} ({model.card.name})", len(indices))
        embeddings = []
        with torch.no_grad():
            for batch in chunks(indices, context.batch_size):
                embeddings.append(model.embed(context.load(batch)))
                advance(len(batch))
        return torch.cat(embeddings)

    def _stored_universal(
        self, context: CampaignContext, gallery: Tensor, learn: Wearers, judged: Wearers, area: float
    ) -> dict:
        """A universal mask covering ``area`` learned on ``learn``, judged on ``judged``, as plain data (a stage)."""
        target = context.target
        assert isinstance(target, FaceRecognizer)  # the engine checked the threat's task against the target
        if context.threat == "identification":

            def goal(index: Tensor) -> IdentificationObjective:
                return IdentificationObjective(target.embed, target.similarity_matrix, gallery, learn.label[index])
        else:

            def goal(index: Tensor) -> VerificationObjective:  # type: ignore[misc]
                reference = gallery[learn.label[index]]
                return VerificationObjective(target.embed, target.similarity, target.threshold, False, reference)

        texture, steps = self._optimise(context, learn.photos, goal, area, per_step=self.per_step)
        surface, width = self.surface(area)
        textures = self.baselines(context, texture, area)
        judgements = [self._judge(context, target, gallery, judged, (t, area)) for t in textures]
        pose = self.nominal_pose(judged.photos.landmarks, width, surface)
        with torch.no_grad():
            coverage = coverage_of(texture, pose, judged.photos.images.shape[-1], surface)
        return asdict(
            Universal(
                area=area,
                width=width,
                texture=texture,
                similarity=torch.stack([similarity for similarity, _, _ in judgements]),
                identified=torch.stack([identified for _, identified, _ in judgements]),
                stages=[stages for _, _, stages in judgements],
                covered=coverage.mean().item(),
                steps=steps,
            )
        )

    def _worn(self, photos: Photos, texture: Tensor, area: float) -> Tensor:
        surface, width = self.surface(area)
        with torch.no_grad():
            return wear(photos.images, texture, self.nominal_pose(photos.landmarks, width, surface), surface)

    def _judge(
        self,
        context: CampaignContext,
        model: FaceRecognizer,
        gallery: Tensor,
        judged: Wearers,
        worn: tuple[Tensor, float] | None,
    ) -> tuple[Tensor, Tensor, list[str]]:
        """``judged``'s photos (wearing ``worn``'s texture at its area, or nothing) by ``model``: similarity to
        their own enrolment ``[N]``, rank-1 right over ``gallery`` (``model``'s embeddings) ``[N]``, and where a face
        system stopped each (``SYSTEM_STAGES``; empty for a single recogniser)."""
        similarity, identified, stages = [], [], []
        for index in chunks(list(range(len(judged.label))), context.batch_size):
            part = Photos(judged.photos.images[index], judged.photos.landmarks[index], [])
            images = part.images if worn is None else self._worn(part, *worn)
            with torch.no_grad():
                embedding = model.embed(images)
                label = judged.label[index]
                similarity.append(model.similarity(embedding, gallery[label]))
                identified.append(model.similarity_matrix(embedding, gallery).argmax(1) == label)
                stages += model.verdicts(images, similarity[-1], model.threshold) or []
        return torch.cat(similarity), torch.cat(identified), stages

    def _record_universal_evidence(
        self,
        context: CampaignContext,
        gallery: Tensor,
        judged: Wearers,
        people: list[str],
        final: Universal,
        clean: tuple[Tensor, Tensor, list[str]],
    ) -> None:
        """The held-out wearers the final mask fooled the target with (decided right without it: verified, or
        under identification identified), wearing it, into the run's evidence log, each with the verdict on it as
        an 8-bit file holds it."""
        target, identification = context.target, context.threat == "identification"
        assert isinstance(target, FaceRecognizer)  # the engine checked the threat's task against the target

        def right(similarity: Tensor, identified: Tensor) -> Tensor:
            return identified if identification else decided_right(similarity, target.threshold, impersonate=False)

        fooled = torch.nonzero(right(*clean[:2]) & ~right(final.similarity[-1], final.identified[-1])).squeeze(1)
        if len(fooled) == 0:
            return
        photos = Photos(judged.photos.images[fooled], judged.photos.landmarks[fooled], [])
        worn = self._worn(photos, final.texture, final.area)
        saved = Wearers(Photos(as_saved(worn), photos.landmarks, []), judged.label[fooled])
        saved_similarity, saved_identified, _ = self._judge(context, target, gallery, saved, None)
        saved_right = right(saved_similarity, saved_identified)
        entries = [
            {"probe": judged.photos.names[k], "eps": final.area, "identity": people[k], "reference": people[k],
             "score": float(final.similarity[-1, k]), "threshold": float(target.threshold), "covered": final.covered,
             "saved_fooled": not bool(saved_right[i]), "saved_score": float(saved_similarity[i])}
            for i, k in enumerate(fooled.tolist())
        ]  # fmt: skip
        context.record_evidence(entries, list(worn))

    def _universal_transfer(
        self, context: CampaignContext, gallery_photos: list[int], judged: Wearers, final: Universal
    ) -> tuple[pd.DataFrame, list[str]]:
        """The final mask and its baselines judged by every recogniser in the zoo, with its own gallery."""
        models, skipped = context.recognizers()
        textures = [None, *((t, final.area) for t in self.baselines(context, final.texture, final.area))]
        rows = []
        for name, model in models:
            gallery = self._embed(context, model, gallery_photos, "the gallery")
            row: dict[str, object] = {"target": name, "threshold": model.threshold}
            for condition, worn in zip(CONDITIONS, textures):
                similarity, identified, _ = self._judge(context, model, gallery, judged, worn)
                right = decided_right(similarity, model.threshold, impersonate=False)
                row[f"{condition}_verified"] = right.float().mean().item()
                row[f"{condition}_identified"] = identified.float().mean().item()
            rows.append(row)
        return pd.DataFrame(rows), skipped

    def _universal_faces(
        self, context: CampaignContext, model: FaceRecognizer, judged: Wearers, final: Universal, clean: Tensor
    ) -> Path:
        """Held-out wearers (different people) without a mask, with a random, a plain and the adversarial one."""
        shown = min(len(judged.label), 6)
        part = Photos(judged.photos.images[:shown], judged.photos.landmarks[:shown], [])
        textures = self.baselines(context, final.texture, final.area)
        labels = ("random mask", "plain mask", "adversarial mask")
        rows = [("no mask", part.images, clean[:shown])] + [
            (label, self._worn(part, texture, final.area), similarity[:shown])
            for label, texture, similarity in zip(labels, textures, final.similarity)
        ]
        title = f"people the mask never saw: similarity to their enrolment photo (threshold {model.threshold:.3f})"
        marked = [
            (label, faces, similarity, ~decided_right(similarity, model.threshold, impersonate=False))
            for label, faces, similarity in rows
        ]
        return self._faces_figure(context.out / "mask-faces.png", marked, title)
