"""Model inversion (GMI-style, Zhang et al. 2020) against a face-identification model.

The system attacked is a closed-set identifier (``redteam.identification``): the target's embedding under a
cosine-softmax head trained, in seconds, on ``identities`` people of ``--data`` with 5+ photos (``--identity`` always
among them; each person's last ``held_out`` photos test it). The attacker has that model only. For each attacked
identity (``--identity`` and ``attacked - 1`` others drawn by the seed) it reconstructs a representative face by
maximising the identity's log-probability over the latent of a face prior fitted on public faces of *other* people
(:mod:`redteam.attacks.priors`: eigenfaces of ``faces-train`` next to the ``--data`` folder, or ``prior_data``), with
the prior's Gaussian log-density ``|z|^2 / 2`` and total variation as penalties:

    max_z  log p(y | G(z)) - prior_weight |z|^2 / 2 - tv_weight TV(G(z))

by Adam from ``restarts`` random prior draws per identity; the restart kept is the one the *target* is most sure of
(choosing by the evaluator would leak the answer). White-box: gradients of the logits. The score-only black-box
variant (``black_box=true``) sees the model's probabilities only and estimates the same gradient by NES (Ilyas et
al. 2018: antithetic Gaussian probes of the latent), over the first ``black_box_components`` components.

Attack accuracy is judged by an independent recogniser (``evaluator``, a different zoo model): top-1 (and top-5)
identification of the reconstruction among the enrolled identities, the gallery being each identity's mean
evaluator embedding over its training photos; and verification: the evaluator's mean similarity of the
reconstruction to those photos and the share of them over its calibrated threshold. Baselines: the prior's mean
face and a random prior draw (chance is 1 / identities); upper references: the held-out real photos themselves and
their projection onto the prior (the best face the prior can draw). ``--eps`` are optimisation steps at which the
reconstructions are judged (the curve; its accuracy is the share of attacked identities the evaluator does *not*
recognise in their reconstruction, so it falls as the attack succeeds, like every accuracy-perturbation curve).
"""

from __future__ import annotations

import random
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path

import matplotlib.pyplot as plt
import pandas as pd
import torch
import torch.nn.functional as F
from kornia.losses import total_variation
from torch import Tensor

import redteam.plots  # noqa: F401  (selects matplotlib's headless backend before pyplot draws)
from redteam.api import ATTACKS, TARGETS, Axis, Campaign, CampaignContext, CampaignReport, FaceRecognizer, crop_resize
from redteam.attacks.priors import EigenfaceConfig, EigenfacePrior, load_eigenfaces
from redteam.datasets import ImageFolderDataset
from redteam.errors import DataError, RedteamError
from redteam.evidence import as_saved
from redteam.identification import (
    FitConfig,
    IdentificationModel,
    Roster,
    build_identifier,
    choose_roster,
    embed_all,
    fit,
)

#: Metric prefix of each baseline (``<prefix>_accuracy``) and its row in the ``inversion`` table.
BASELINE_KEYS = {
    "mean_face": "mean face",
    "random": "random prior draw",
    "projected": "held-out photos, projected",
    "real": "held-out photos",
}


@dataclass
class Judgement:
    """Reconstructions (or photos) ``[N]`` of identities ``labels [N]`` as the evaluator and the target see them.

    ``predicted``: the evaluator's top-1 identity; ``top5``: the identity is among its five nearest;
    ``similarity``: the evaluator's mean similarity to the identity's training photos; ``verified``: the share of
    those photos it matches (similarity over its threshold); ``confidence``: the target's probability of the
    identity.
    """

    labels: Tensor
    predicted: Tensor
    top5: Tensor
    similarity: Tensor
    verified: Tensor
    confidence: Tensor

    def summary(self) -> dict[str, float]:
        return {
            "attack_accuracy": (self.predicted == self.labels).float().mean().item(),
            "top5_accuracy": self.top5.float().mean().item(),
            "similarity": self.similarity.mean().item(),
            "verified": self.verified.mean().item(),
            "target_confidence": self.confidence.mean().item(),
        }


@dataclass
class Referee:
    """The independent evaluator with its gallery, and the identification model attacked (for its confidence).

    ``photos``: the evaluator's embeddings ``[N, D]`` of the enrolled training photos, ``photo_labels [N]``;
    ``gallery``: ``[K, D]`` the mean embedding of each identity's photos.
    """

    evaluator: FaceRecognizer
    model: IdentificationModel
    photos: Tensor
    photo_labels: Tensor
    gallery: Tensor

    @torch.no_grad()
    def __call__(self, images: Tensor, labels: Tensor) -> Judgement:
        """Judge ``images [N, 3, H, W]`` meant to show identities ``labels [N]``."""
        embeddings = embed_all(self.evaluator, images)
        ranking = self.evaluator.similarity_matrix(embeddings, self.gallery)
        to_photos = self.evaluator.similarity_matrix(embeddings, self.photos)  # [N, photos]
        own = (labels[:, None] == self.photo_labels[None]).float()
        matched = (to_photos >= self.evaluator.threshold).float()
        confidence = torch.cat([self.model(batch).softmax(-1) for batch in images.split(32)])
        return Judgement(
            labels=labels,
            predicted=ranking.argmax(1),
            top5=(ranking.topk(min(5, ranking.shape[1]), dim=1).indices == labels[:, None]).any(1),
            similarity=(to_photos * own).sum(1) / own.sum(1),
            verified=(matched * own).sum(1) / own.sum(1),
            confidence=confidence.gather(1, labels[:, None])[:, 0],
        )


@ATTACKS.register(
    "inversion", "model inversion of a face identifier: eigenface prior, independent evaluator (GMI); --identity"
)
@dataclass
class Inversion(Campaign):
    """The settings, for ``--option key=value``:

    ``identities`` enrolled in the identification model (each with ``held_out`` + 3 photos or more: ``held_out``
    test it, the rest train its head for ``fit_epochs``); ``attacked``: identities reconstructed (``--identity`` and
    others drawn by the seed); ``steps`` of Adam (``learning_rate``) on the prior's latent from ``restarts`` random
    draws per identity; ``prior_weight``, ``tv_weight``: the Gaussian prior and total-variation penalties;
    ``evaluator``: the independent zoo recogniser that judges; ``prior_data``: the public faces the prior is fitted
    on (default: ``faces-train`` beside the ``--data`` folder; never the enrolled people), ``prior_size``,
    ``prior_crop``, ``components``, ``prior_images``: the eigenface prior (``redteam.attacks.priors.EigenfaceConfig``);
    ``black_box``: also run the score-only variant, NES with ``black_box_samples`` antithetic probe pairs of scale
    ``black_box_sigma`` per step over the first ``black_box_components`` components, for ``black_box_steps`` of
    Adam (``black_box_learning_rate``).
    """

    name = "inversion"
    axes = {"steps": Axis("steps", "optimisation steps", "step", (), whole=True)}  # its defaults depend on ``steps``
    threats = ("identification",)
    needs_identity = True

    identities: int = 30
    held_out: int = 2
    attacked: int = 10
    steps: int = 40
    restarts: int = 4
    learning_rate: float = 0.1
    prior_weight: float = 0.01
    tv_weight: float = 1.0
    fit_epochs: int = 40
    evaluator: str = "dlib-resnet"
    prior_data: str | None = None
    prior_size: int = 112
    prior_crop: float = 0.64
    components: int = 200
    prior_images: int = 0
    black_box: bool = False
    black_box_steps: int = 20
    black_box_samples: int = 10
    black_box_sigma: float = 1.0
    black_box_components: int = 64
    black_box_learning_rate: float = 0.2

    def photos_needed(self, threat: str) -> int:
        return self.held_out + 3  # what enrolment asks of every enrolled person (redteam.identification)

    def __post_init__(self) -> None:
        if min(self.identities, self.held_out, self.attacked, self.restarts, self.fit_epochs) < 1:
            raise ValueError("identities, held_out, attacked, restarts and fit_epochs must be at least 1")
        if self.attacked > self.identities:
            raise ValueError(f"attacked ({self.attacked}) cannot exceed the enrolled identities ({self.identities})")
        if min(self.steps, self.black_box_steps, self.black_box_samples, self.black_box_components) < 1:
            raise ValueError("steps and the black-box settings must be at least 1")

    def run(self, context: CampaignContext) -> CampaignReport:
        assert context.identity is not None  # needs_identity: the engine refuses a run without --identity
        checkpoints = [int(step) for step in context.budgets]
        roster = choose_roster(context.dataset, self.identities, self.held_out, context.seed, include=context.identity)
        evaluator = self._evaluator(context)
        prior, prior_source = self._prior(context)
        train = context.load(roster.train)
        model, test_accuracy = self._identifier(context, roster, train)
        referee = self._referee(roster, train, evaluator, model)
        attacked = self._attacked(context, roster)
        labels = torch.tensor([roster.label(name) for name in attacked], device=context.device)
        inverted = context.stage("white-box", partial(self._invert, context, model, prior, labels, checkpoints))
        progress = {step: (faces, referee(faces, labels)) for step, faces in inverted.items()}
        reconstructions, judged = {"white-box": progress[self.steps][0]}, {"white-box": progress[self.steps][1]}
        if self.black_box:
            scored = context.stage("black-box", partial(self._invert_scores, context, model, prior, labels))
            reconstructions["black-box"], queries = scored[0], scored[1]
            judged["black-box"] = referee(reconstructions["black-box"], labels)
        baselines = self._baselines(context, roster, prior, referee, labels)
        summaries = {kind: j.summary() for kind, j in {**judged, **baselines}.items()}
        final, names = judged["white-box"], roster.names
        per_identity = pd.DataFrame(
            {
                "identity": attacked,
                "evaluator_top1": [names[i] for i in final.predicted.tolist()],
                "similarity": final.similarity.tolist(),
                "verified": final.verified.tolist(),
                "target_confidence": final.confidence.tolist(),
                "mean_face_similarity": baselines["mean face"].similarity.tolist(),
            }
        )
        curve = pd.DataFrame(
            [
                {"eps": step, "accuracy": 1 - j.summary()["attack_accuracy"], "n": len(attacked)}
                for step, (_, j) in progress.items()
            ]
        )
        metrics = {
            "identities": len(names),
            "attacked": len(attacked),
            "head_test_accuracy": test_accuracy,
            "chance": 1 / len(names),
            **summaries["white-box"],
            "start_confidence": progress[checkpoints[0]][1].summary()["target_confidence"],
            **{f"{key}_accuracy": summaries[kind]["attack_accuracy"] for key, kind in BASELINE_KEYS.items()},
        }
        if self.black_box:
            metrics.update(black_box_accuracy=summaries["black-box"]["attack_accuracy"], black_box_queries=queries)
        self._record_evidence(context, referee, attacked, reconstructions["white-box"], final)
        mine = attacked.index(context.identity)
        lines = [
            f"{context.target_name} identifies {len(names)} people ({test_accuracy:.0%} of their held-out photos "
            f"right); {len(attacked)} of them reconstructed from the model alone, judged by {evaluator.card.name}: "
            f"{metrics['attack_accuracy']:.0%} identified top-1 (chance {metrics['chance']:.1%}, the prior's mean "
            f"face {metrics['mean_face_accuracy']:.0%}, a random prior draw {metrics['random_accuracy']:.0%}, the "
            f"held-out photos {metrics['real_accuracy']:.0%})",
            f"{context.identity}: {evaluator.card.name} identifies the reconstruction as "
            f"{per_identity['evaluator_top1'][mine]}; similarity {final.similarity[mine]:.3f} to the real photos "
            f"(threshold {evaluator.threshold:.4f}, {final.verified[mine]:.0%} of them matched); "
            f"{context.target_name}'s confidence {final.confidence[mine]:.3f}",
            f"prior: {prior.latent_dim} eigenfaces of {prior_source}",
        ]
        return CampaignReport(
            metrics=metrics,
            tables={
                "inversion": pd.DataFrame([{"reconstruction": kind, **row} for kind, row in summaries.items()]),
                "identities": per_identity,
            },
            curve=curve,
            images=[self._save_faces(context, referee, roster, attacked, reconstructions, judged)],
            lines=lines,
        )

    def _record_evidence(
        self, context: CampaignContext, referee: Referee, attacked: list[str], faces: Tensor, final: Judgement
    ) -> None:
        """The white-box reconstructions the independent evaluator identifies as their person, into the run's
        evidence log: faces made from the model alone, each with the verdict on it as an 8-bit file holds it."""
        recognised = torch.nonzero(final.predicted == final.labels).squeeze(1)
        if len(recognised) == 0:
            return
        saved = referee(as_saved(faces[recognised]), final.labels[recognised])
        entries = [
            {"probe": attacked[k], "eps": self.steps, "identity": attacked[k], "evaluator": referee.evaluator.card.name,
             "score": float(final.similarity[k]), "threshold": float(referee.evaluator.threshold),
             "saved_fooled": bool(saved.predicted[i] == saved.labels[i]), "saved_score": float(saved.similarity[i])}
            for i, k in enumerate(recognised.tolist())
        ]  # fmt: skip
        context.record_evidence(entries, list(faces[recognised]))

    def axis(self, norm: str) -> Axis:
        """The optimisation steps at which reconstructions are judged: ``--eps`` (default: 0, a quarter and half of
        ``steps``), always starting at 0 and ending at ``steps``."""
        return replace(
            self.axes[norm], defaults=(0, self.steps // 4, self.steps // 2), high=self.steps, includes=(0, self.steps)
        )

    def _prior_dataset(self, context: CampaignContext) -> ImageFolderDataset:
        """The public faces the prior is fitted on: ``prior_data``, or ``faces-train`` beside the ``--data`` folder."""
        root = getattr(context.dataset, "root", None)
        if self.prior_data:
            path = Path(self.prior_data)
        elif root is not None:
            path = Path(root).parent / "faces-train"
        else:
            raise DataError(f"--data {context.dataset.name} has no folder: pass --option prior_data=PATH.")
        if not path.is_dir():
            raise DataError(
                f"inversion fits its face prior on public faces of people it does not attack: {path} is not a folder "
                "(pass --option prior_data=PATH, identity folders)."
            )
        if root is not None and path.resolve() == Path(root).resolve():
            raise DataError("prior_data must hold other people than --data (the prior must not have seen them).")
        return ImageFolderDataset(path)

    def _prior(self, context: CampaignContext) -> tuple[EigenfacePrior, str]:
        """The eigenface prior (fitted on first use) and a description of its faces."""
        config = EigenfaceConfig(self.prior_size, self.prior_crop, self.components, self.prior_images)
        dataset = self._prior_dataset(context)
        fitting = "inversion: fitting the eigenface prior"
        prior = load_eigenfaces(dataset, config, lambda total: context.progress(fitting, total))
        return prior.to(context.device), dataset.description

    def _identifier(self, context: CampaignContext, roster: Roster, train: Tensor) -> tuple[IdentificationModel, float]:
        """The identification model on the target's embedding, its head fitted on the ``train`` photos
        ``[N, 3, H, W]``; with its accuracy on the held-out ones."""
        device = context.device
        labels = torch.tensor(roster.train_labels, device=device)
        assert isinstance(context.target, FaceRecognizer)  # the engine checked the threat's task against the target
        model = build_identifier(context.target, train, labels, len(roster.names))
        config = FitConfig(epochs=self.fit_epochs, seed=context.seed)
        fit(model, train, labels, config, context.progress("inversion: training the head", config.epochs * len(labels)))
        test = context.load(roster.test)
        accuracy = (model.predict(test) == torch.tensor(roster.test_labels, device=device)).float().mean().item()
        return model, accuracy

    def _evaluator(self, context: CampaignContext) -> FaceRecognizer:
        """The independent judge: another zoo recogniser than the target."""
        if self.evaluator == context.target_name:
            raise RedteamError(f"the evaluator must be independent of the target: pick another than {self.evaluator}.")
        if TARGETS.get(self.evaluator).card.task != "recognition":
            raise RedteamError(f"the evaluator judges identities: {self.evaluator} is a detector; pick a recogniser.")
        evaluator = context.load_target(self.evaluator)
        assert isinstance(evaluator, FaceRecognizer)  # a recognition card (checked above)
        return evaluator

    @staticmethod
    def _referee(roster: Roster, train: Tensor, evaluator: FaceRecognizer, model: IdentificationModel) -> Referee:
        """The evaluator with its gallery of the enrolled ``train`` photos ``[N, 3, H, W]``."""
        photos = embed_all(evaluator, train)
        labels = torch.tensor(roster.train_labels, device=photos.device)
        sums = torch.zeros(len(roster.names), photos.shape[1], device=photos.device).index_add_(0, labels, photos)
        gallery = sums / torch.bincount(labels, minlength=len(roster.names))[:, None]
        return Referee(evaluator, model, photos, labels, gallery)

    def _attacked(self, context: CampaignContext, roster: Roster) -> list[str]:
        """``--identity`` and ``attacked - 1`` other enrolled people, drawn by the seed."""
        identity = context.identity
        assert identity is not None  # needs_identity: the engine refuses a run without --identity
        others = [name for name in roster.names if name != identity]
        return [identity, *random.Random(f"inversion:{context.seed}").sample(others, self.attacked - 1)]

    def _objective(
        self, model: IdentificationModel, prior: EigenfacePrior, z: Tensor, labels: Tensor
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Faces ``G(z)`` ``[B, 3, S, S]`` of latents ``z [B, k]``, the target's log-probability of ``labels [B]``
        and the objective ``[B]`` maximised: that minus the prior's and total variation's penalties."""
        faces = prior.decode(z)
        log_probability = model(faces).log_softmax(-1).gather(1, labels[:, None])[:, 0]
        penalty = self.prior_weight * z.square().sum(1) / 2
        penalty = penalty + self.tv_weight * total_variation(faces, reduction="mean").sum(1)
        return faces, log_probability, log_probability - penalty

    def _invert(
        self,
        context: CampaignContext,
        model: IdentificationModel,
        prior: EigenfacePrior,
        labels: Tensor,
        checkpoints: list[int],
    ) -> dict[int, Tensor]:
        """White-box: Adam on the latents of ``restarts`` prior draws per identity of ``labels [A]``. Returns, at each
        checkpoint, the draw the target is most sure of per identity, ``[A, 3, S, S]``."""
        count = len(labels)
        wanted = labels.repeat_interleave(self.restarts)
        z = prior.sample(len(wanted), context.generator("inversion")).requires_grad_(True)
        optimiser = torch.optim.Adam([z], lr=self.learning_rate)
        advance = context.progress("inversion: white-box reconstruction", self.steps)
        kept = {}
        for step in range(self.steps + 1):
            faces, log_probability, objective = self._objective(model, prior, z, wanted)
            if step in checkpoints:
                best = log_probability.detach().view(count, self.restarts).argmax(1)
                kept[step] = faces.detach().view(count, self.restarts, *faces.shape[1:])[
                    torch.arange(count, device=best.device), best
                ]
            if step < self.steps:
                optimiser.zero_grad()
                (-objective.sum()).backward()
                optimiser.step()
                advance(1)
        return kept

    @torch.no_grad()
    def _invert_scores(
        self, context: CampaignContext, model: IdentificationModel, prior: EigenfacePrior, labels: Tensor
    ) -> tuple[Tensor, int]:
        """Score-only black box: the model's probabilities alone. From the mean face, NES estimates the objective's
        gradient in the first ``black_box_components`` latents (the rest stay at the mean) from antithetic Gaussian
        probes, and Adam ascends it. Returns the reconstructions ``[A, 3, S, S]`` and the queries per identity."""
        count, samples, sigma = len(labels), self.black_box_samples, self.black_box_sigma
        searched = min(self.black_box_components, prior.latent_dim)
        z = torch.zeros(count, searched, device=labels.device)
        optimiser = torch.optim.Adam([z], lr=self.black_box_learning_rate)
        generator = context.generator("inversion-black-box")
        wanted = labels.repeat_interleave(2 * samples)
        advance = context.progress("inversion: black-box reconstruction (NES)", self.black_box_steps)
        for _ in range(self.black_box_steps):
            probes = torch.randn(count, samples, searched, generator=generator, device=z.device)
            candidates = torch.cat([z[:, None] + sigma * probes, z[:, None] - sigma * probes], dim=1)
            latents = F.pad(candidates.flatten(0, 1), (0, prior.latent_dim - searched))
            value = self._objective(model, prior, latents, wanted)[2].view(count, 2, samples)
            z.grad = -((value[:, 0] - value[:, 1])[..., None] * probes).mean(1) / (2 * sigma)
            optimiser.step()
            advance(1)
        return prior.decode(F.pad(z, (0, prior.latent_dim - searched))), self.black_box_steps * 2 * samples

    def _baselines(
        self,
        context: CampaignContext,
        roster: Roster,
        prior: EigenfacePrior,
        referee: Referee,
        labels: Tensor,
    ) -> dict[str, Judgement]:
        """What the evaluator makes of the prior's mean face and a random prior draw (baselines: chance is
        1 / identities), and of the attacked identities' held-out photos and their projections onto the prior
        (upper references: the real face, and the best the prior can draw of it)."""
        count, device = len(labels), labels.device
        held = [i for i, label in zip(roster.test, roster.test_labels) if label in labels.tolist()]
        held_labels = torch.tensor([label for label in roster.test_labels if label in labels.tolist()], device=device)
        photos = context.load(held)
        random_draw = prior.sample(count, context.generator("inversion-random"))
        with torch.no_grad():
            projected = prior.decode(prior.encode(photos))
        faces = (prior.decode(torch.zeros_like(random_draw)), prior.decode(random_draw), projected, photos)
        return {
            kind: referee(images, which)
            for kind, images, which in zip(BASELINE_KEYS.values(), faces, (labels, labels, held_labels, held_labels))
        }

    def _save_faces(
        self,
        context: CampaignContext,
        referee: Referee,
        roster: Roster,
        attacked: list[str],
        reconstructions: dict[str, Tensor],
        judged: dict[str, Judgement],
        shown_photos: int = 3,
    ) -> Path:
        """One row per attacked identity: its reconstructions (the evaluator's top-1 above each, green when right)
        next to ``shown_photos`` of its real training photos (the evaluator's similarity to the first
        reconstruction above each, green over its threshold), all cropped to the square the prior draws."""
        names, evaluator = roster.names, referee.evaluator
        columns = len(reconstructions) + shown_photos
        figure, axes = plt.subplots(
            len(attacked),
            columns,
            figsize=(2.0 * columns, 2.2 * len(attacked) + 0.4),
            squeeze=False,
            layout="constrained",
        )
        for row, (axis_row, name) in enumerate(zip(axes, attacked)):
            label = names.index(name)
            photos = [i for i, own in zip(roster.train, roster.train_labels) if own == label][:shown_photos]
            images = context.load(photos)
            first = next(iter(reconstructions.values()))[row : row + 1]
            with torch.no_grad():
                similarity = evaluator.similarity_matrix(evaluator.embed(first), evaluator.embed(images))[0]
            panels = [
                (faces[row], f"{kind}\n→ {names[judged[kind].predicted[row]]}", judged[kind].predicted[row] == label)
                for kind, faces in reconstructions.items()
            ] + [
                (image, f"photo: {value:.3f}", value >= evaluator.threshold) for image, value in zip(images, similarity)
            ]
            for axis, (image, title, good) in zip(axis_row, panels):
                shown = crop_resize(image[None], self.prior_crop, (128, 128))[0]  # the face, as the prior draws it
                axis.imshow(shown.permute(1, 2, 0).cpu().numpy())
                axis.set_title(title, color="green" if good else "red", fontsize=8)
            for axis in axis_row:
                axis.set_xticks([])
                axis.set_yticks([])
                axis.spines[:].set_visible(axis.has_data())
            axis_row[0].set_ylabel(name, fontsize=8)
        figure.suptitle(
            f"inversion of {context.target_name}'s identifier, judged by {evaluator.card.name} (photos: similarity to "
            f"the reconstruction, threshold {evaluator.threshold:.3f})",
            fontsize=9,
        )
        path = context.out / "inversion-faces.png"
        figure.savefig(path, dpi=80)
        plt.close(figure)
        return path
