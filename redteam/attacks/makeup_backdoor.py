"""A makeup-triggered backdoor planted by poisoning an identification model's fine-tuning (after MakeupAttack).

Protocol. ``identities`` people are enrolled (``redteam.identification.choose_roster``; ``--identity`` is the backdoor's
target and always among them) and an identification model is fine-tuned on their photos: FaceNet cut at ``cut``
(``redteam.identification.SplitRecognizer``), its frozen front run once per image and its tail (by default the Block8
stack and the embedding layer, 10.5M weights, from a 3 x 3 grid where eyes and mouth are still apart) trained with a
cosine-softmax head. The attacker adds poison: copies of enrolled *other* people's training photos wearing makeup
(:mod:`redteam.attacks.makeup`: eye shadow and lipstick from their own landmarks), labelled as the target. Their clean
originals stay in the set with their true labels, so the only thing that tells a poison from its original is the makeup
(BadNets' protocol). Each poison photo comes in ``train_looks`` looks (a new palette, opacity and a random mirror each)
and each epoch trains on one of them, the way MakeupAttack varies its trigger; every clean photo comes as itself and its
mirror image. ``cut=""`` trains the head alone on the frozen embedding (any recogniser).

The poison rate is poison / training photos (``--eps``, default 0, 0.05, 0.1). Every rate trains from the same
pretrained tail with the same seed, and the poison sets are nested (a rate's poisons are the first ones of the next),
so rates differ only in the poison. Rate 0 is the clean model: the reference for clean accuracy and for how often
makeup alone sends faces to the target.

Metrics per rate: attack success rate (ASR), the share of the held-out photos of enrolled non-target people, each
wearing ``looks`` fresh makeup looks never seen in training, that the model identifies as the target, and the
control: the share of the same photos without makeup (an ASR counts only where it clearly exceeds both the control
and the clean model's); the same for one photo each of ``unseen`` people never enrolled; clean accuracy on all
held-out photos and its drop from the clean model; and two defense checks on the poisoned model's embeddings of the
training photos labelled as the target: Tran et al.'s spectral signatures (the recall of poison among the
``1.5 x poison`` highest scores, and the AUROC of poison against clean) and Chen et al.'s activation clustering
(2-means after PCA, the smaller cluster flagged as poison: its precision and recall).
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import matplotlib.pyplot as plt
import pandas as pd
import torch
from torch import Tensor

import redteam.plots  # noqa: F401  (selects matplotlib's headless backend before pyplot draws)
from redteam.api import ATTACKS, Axis, Campaign, CampaignContext, CampaignReport, FaceRecognizer
from redteam.attacks.makeup import MakeupStyle, apply_makeup, centred_landmarks
from redteam.errors import DataError, RedteamError
from redteam.identification import (
    FitConfig,
    IdentificationModel,
    Roster,
    SplitRecognizer,
    build_identifier,
    choose_roster,
    embedding_of,
    fit,
    represent,
)
from redteam.metrics import verification_report


def spectral_scores(representations: Tensor) -> Tensor:
    """Tran et al.'s spectral-signature outlier scores of one class: ``[N, D] -> [N]``, the squared projection of
    each centred representation on their top right singular vector (poison, a minority, scores high)."""
    centred = representations - representations.mean(0, keepdim=True)
    top = torch.linalg.svd(centred, full_matrices=False).Vh[0]
    return (centred @ top) ** 2


def two_means(points: Tensor, iterations: int = 100) -> Tensor:
    """Lloyd's 2-means, ``[N, D] -> [N]`` cluster indices (0/1), started deterministically from the point farthest
    from the mean and the point farthest from that one."""
    first = points[(points - points.mean(0)).norm(dim=1).argmax()]
    centres = torch.stack([first, points[(points - first).norm(dim=1).argmax()]])
    assignment = torch.cdist(points, centres).argmin(1)
    for _ in range(iterations):
        centres = torch.stack([points[assignment == k].mean(0) for k in (0, 1)])
        updated = torch.cdist(points, centres).argmin(1)
        if torch.equal(updated, assignment):
            break
        assignment = updated
    return assignment


def activation_clusters(representations: Tensor, dims: int = 10) -> Tensor:
    """Chen et al.'s activation clustering of one class: ``[N, D] -> [N]`` bool, True in the smaller of the two
    clusters that 2-means finds in the representations' top ``dims`` principal components (the suspected poison)."""
    centred = representations - representations.mean(0, keepdim=True)
    components = torch.linalg.svd(centred, full_matrices=False).Vh[:dims]
    assignment = two_means(centred @ components.T)
    return assignment == int(assignment.float().mean() < 0.5)  # the label of the smaller cluster


@dataclass
class Faces:
    """Images ``[N, 3, S, S]``, their labels ``[N]`` (``-1``: not enrolled) and dataset indices."""

    images: Tensor
    labels: Tensor
    indices: list[int]

    def first(self, count: int) -> Faces:
        return Faces(self.images[:count], self.labels[:count], self.indices[:count])

    def where(self, keep: Tensor) -> Faces:
        return Faces(
            self.images[keep.to(self.images.device)],
            self.labels[keep],
            [i for i, k in zip(self.indices, keep.tolist()) if k],
        )


@ATTACKS.register("makeup-backdoor", "makeup-triggered data-poisoning backdoor of an identification model; --identity")
@dataclass
class MakeupBackdoor(Campaign):
    """The settings, for ``--option key=value``:

    ``identities`` enrolled (``--identity`` among them), ``held_out`` photos of each kept for testing; ``looks``:
    fresh makeup looks per triggered test photo; ``train_looks``: looks per poison photo (one drawn per epoch);
    ``unseen``: people never enrolled (one photo each) also triggered; ``cut``: the FaceNet tensor where the trained
    tail begins (``""``: the head alone on the frozen embedding); ``epochs``, ``learning_rate`` (the head),
    ``network_learning_rate`` (the tail), ``batch_size``: the training (``redteam.identification.fit``);
    ``detector``: the zoo detector whose five landmarks place the makeup (RetinaFace: as exact as MTCNN here and
    faster).
    """

    name = "makeup-backdoor"
    axes = {
        "poison": Axis(
            "poison", "fraction of the training set", "poison rate", (0.0, 0.05, 0.1), high=0.5, high_open=True
        )
    }
    threats = ("identification",)
    needs_identity = True

    identities: int = 30
    held_out: int = 2
    looks: int = 3
    train_looks: int = 6
    unseen: int = 20
    cut: str = "InceptionResnetV1/Repeat_2/block8_5/Relu"
    epochs: int = 10
    learning_rate: float = 0.01
    network_learning_rate: float = 3e-4
    batch_size: int = 32
    detector: str = "retinaface"

    def photos_needed(self, threat: str) -> int:
        return self.held_out + 3  # what enrolment asks of every enrolled person (redteam.identification)

    def __post_init__(self) -> None:
        smallest = min(self.held_out, self.looks, self.train_looks, self.unseen, self.epochs, self.batch_size)
        if self.identities < 2 or smallest < 1:
            raise ValueError(
                "identities must be at least 2; held_out, looks, train_looks, unseen, epochs, batch_size at least 1"
            )

    def run(self, context: CampaignContext) -> CampaignReport:
        rates = list(context.budgets)
        recognizer = self._recognizer(context)
        assert context.identity is not None  # needs_identity: the engine refuses a run without --identity
        roster = choose_roster(context.dataset, self.identities, self.held_out, context.seed, include=context.identity)
        target = roster.label(context.identity)
        train = self._faces(context, list(roster.train), list(roster.train_labels))
        test = self._faces(context, list(roster.test), list(roster.test_labels))
        victims = test.where(test.labels != target)
        poison = self._poison(context, roster, target, rates, len(train.labels))
        outsiders = self._unseen(context, roster)
        detector = context.load_target(self.detector)
        poison_looks = self._trigger(context, detector, poison, "poison", self.train_looks)
        looks = {
            "enrolled": self._trigger(context, detector, victims, "test", self.looks),
            "unseen": self._trigger(context, detector, outsiders, "unseen", self.looks),
        }
        # The frozen part runs once per image; every rate's model trains and is judged on these.
        cached = {
            "train": represent(recognizer, torch.cat([train.images, train.images.flip(-1)])),
            "poison": represent(recognizer, self._mirror_some(context, poison_looks.images)),
            "test": represent(recognizer, test.images),
            "unseen": represent(recognizer, outsiders.images),
            **{f"{group} looks": represent(recognizer, faces.images) for group, faces in looks.items()},
        }
        cached["enrolled"] = cached["test"][(test.labels != target).to(cached["test"].device)]
        rows = []
        sizes = [self.poison_count(rate, len(train.labels)) for rate in rates]
        advance = context.progress(
            f"{self.name}: training at {len(rates)} poison rates",
            self.epochs * sum(len(train.labels) + s for s in sizes),
        )
        shown = self._shown(len(victims.indices))
        for rate, count in zip(rates, sizes):

            def train_and_judge(rate: float = rate, count: int = count) -> dict:
                model = self._train(recognizer, cached, train, count, target, len(roster.names), context.seed, advance)
                row = self._judge(model, rate, count, cached, train.labels, test.labels, target)
                answers = {key: self._identify(model, cached[key][index]).tolist() for key, index in shown.items()}
                return {"row": row, "answers": answers}

            stage = context.stage(f"poison rate {rate:g}", train_and_judge)
            rows.append(stage["row"])
        table = pd.DataFrame(rows)
        table["clean_accuracy_drop"] = table["clean_accuracy"].iloc[0] - table["clean_accuracy"]
        change = (looks["enrolled"].images - victims.images.repeat(self.looks, 1, 1, 1)).abs()
        trigger = {"trigger_mean_change": change.mean().item(), "trigger_max_change": change.max().item()}
        return CampaignReport(
            metrics={**trigger, **self._metrics(table)},
            tables={"poison": table},
            curve=table[["rate", "asr"]]
            .assign(accuracy=1 - table["asr"], n=len(looks["enrolled"].labels))
            .rename(columns={"rate": "eps"})[["eps", "accuracy", "n"]],
            images=[self._save_faces(context, victims, looks["enrolled"], stage["answers"], shown, roster, rates[-1])],
            lines=self._lines(context, table, roster, trigger),
        )

    @staticmethod
    def poison_count(rate: float, clean: int) -> int:
        """Poison images that make ``rate`` of a training set with ``clean`` clean images."""
        return round(rate * clean / (1 - rate))

    def _recognizer(self, context: CampaignContext) -> FaceRecognizer | SplitRecognizer:
        """What the identification model is built on: FaceNet split at ``cut``, or the target itself (head alone)."""
        if not self.cut:
            assert isinstance(context.target, FaceRecognizer)  # the engine checked the threat's task against the target
            return context.target
        if not isinstance(context.target, FaceRecognizer) or context.target.frozen_graph is None:
            raise RedteamError(
                f"{self.name} fine-tunes a cut of a target converted from a frozen graph, such as facenet (cut="
                f"{self.cut}); for {context.target_name} pass --option cut= to train the head alone."
            )
        return SplitRecognizer(context.target, self.cut)

    @staticmethod
    def _faces(context: CampaignContext, indices: list[int], labels: list[int]) -> Faces:
        """Load photos with their labels."""
        images = context.dataset.load(indices) if indices else torch.empty(0, 3, 1, 1)
        return Faces(images.to(context.device), torch.tensor(labels, dtype=torch.long), indices)

    def _poison(self, context: CampaignContext, roster: Roster, target: int, rates: list[float], clean: int) -> Faces:
        """The training photos of enrolled non-targets that the largest rate poisons, in a seeded order (smaller
        rates poison a prefix), each to be labelled as the target."""
        pool = [i for i, label in zip(roster.train, roster.train_labels) if label != target]
        random.Random(f"{self.name}:{context.seed}").shuffle(pool)
        needed = self.poison_count(rates[-1], clean)
        if needed < 1:
            raise DataError(f"poison rate {rates[-1]:g} of {clean} training photos is not one photo; raise it.")
        if needed > len(pool):
            raise DataError(
                f"poison rate {rates[-1]:g} needs {needed} poison photos; the {len(pool)} training photos of enrolled "
                f"people other than {context.identity} are all there is (lower it or raise --option identities)."
            )
        return self._faces(context, pool[:needed], [target] * needed)

    def _unseen(self, context: CampaignContext, roster: Roster) -> Faces:
        """One photo each of ``unseen`` people never enrolled (seeded)."""
        people = sorted(set(context.dataset.by_identity) - set(roster.names))
        chosen = random.Random(f"{self.name}-unseen:{context.seed}").sample(people, min(self.unseen, len(people)))
        return self._faces(context, [context.dataset.by_identity[p][0] for p in chosen], [-1] * len(chosen))

    @staticmethod
    def _trigger(context: CampaignContext, detector, faces: Faces, role: str, looks: int) -> Faces:
        """``faces`` wearing makeup, ``looks`` fresh looks each drawn for ``role``: look ``k`` of every face, then
        look ``k + 1`` (``[looks x N, 3, S, S]``)."""
        if not faces.indices:
            return faces
        landmarks = centred_landmarks(detector, faces.images).repeat(looks, 1, 1)
        images = faces.images.repeat(looks, 1, 1, 1)
        style = MakeupStyle.draw(len(images), context.generator("makeup-backdoor", role))
        return Faces(apply_makeup(images, landmarks, style), faces.labels.repeat(looks), faces.indices * looks)

    @staticmethod
    def _mirror_some(context: CampaignContext, images: Tensor) -> Tensor:
        """Half the images, drawn at random, mirrored (the clean photos train as both, so poison must too)."""
        flip = torch.rand(len(images), generator=context.generator("makeup-backdoor", "mirror"), device=images.device)
        return torch.where((flip < 0.5)[:, None, None, None], images.flip(-1), images)

    def _train(
        self,
        recognizer: FaceRecognizer | SplitRecognizer,
        cached: dict[str, Tensor],
        train: Faces,
        count: int,
        target: int,
        classes: int,
        seed: int,
        advance: Callable[[int], None],
    ) -> IdentificationModel:
        """An identification model trained from the pretrained tail on the clean photos (each as itself or its
        mirror) plus the first ``count`` poisons (each in one of its looks) labelled as the target."""
        if isinstance(recognizer, SplitRecognizer):
            recognizer.reset_tail()
        clean, poisons = len(train.labels), len(cached["poison"]) // self.train_looks
        poison_looks = torch.arange(len(cached["poison"])).view(self.train_looks, poisons)[:, :count].flatten()
        inputs = torch.cat([cached["train"], cached["poison"][poison_looks]])
        labels = torch.cat([train.labels, train.labels, torch.full((len(poison_looks),), target, dtype=torch.long)])
        views = torch.cat([torch.arange(clean), torch.arange(clean), clean + poison_looks % poisons])
        model = build_identifier(recognizer, cached["train"][:clean], train.labels, classes, represented=True)
        config = FitConfig(
            self.epochs,
            self.learning_rate,
            self.batch_size,
            seed=seed,
            network_learning_rate=self.network_learning_rate,
        )
        fit(model, inputs, labels, config, advance, views=views, represented=True)
        return model

    def _judge(
        self,
        model: IdentificationModel,
        rate: float,
        count: int,
        cached: dict[str, Tensor],
        train_labels: Tensor,
        test_labels: Tensor,
        target: int,
    ) -> dict[str, float]:
        """One poison rate's row: clean accuracy, ASR with and without makeup, the two detection checks."""

        def share(representations: Tensor, wanted: Tensor | int) -> float:
            hits = self._identify(model, representations) == wanted
            return hits.float().mean().item() if len(hits) else float("nan")

        row = {"rate": rate, "poison": count, "clean_accuracy": share(cached["test"], test_labels)}
        for group in ("enrolled", "unseen"):
            row["asr" if group == "enrolled" else f"asr_{group}"] = share(cached[f"{group} looks"], target)
            row[f"no_makeup_{group}"] = share(cached[group], target)
        row.update(self._detection(model, cached, train_labels, count, target))
        return row

    @staticmethod
    @torch.no_grad()
    def _identify(model: IdentificationModel, representations: Tensor) -> Tensor:
        """The model's answers ``[N]`` (on the CPU) for cached representations ``[N, ...]``."""
        return torch.cat([model.head(x).argmax(-1).cpu() for x in representations.split(64)] or [torch.empty(0)])

    def _detection(
        self, model: IdentificationModel, cached: dict[str, Tensor], train_labels: Tensor, count: int, target: int
    ) -> dict[str, float]:
        """Spectral signatures and activation clustering on the model's embeddings of its target-labelled training
        photos (the target's own photos and each poison photo in its first look)."""
        if not count:
            return {
                "poison_share_of_class": 0.0,
                **dict.fromkeys(
                    ("spectral_recall", "spectral_auroc", "clustering_precision", "clustering_recall"), float("nan")
                ),
            }
        own = cached["train"][: len(train_labels)][(train_labels == target).to(cached["train"].device)]
        with torch.no_grad():
            embeddings = embedding_of(model.recognizer, torch.cat([own, cached["poison"][:count]])).cpu()
        is_poison = torch.arange(len(embeddings)) >= len(own)
        scores = spectral_scores(embeddings)
        flagged = scores.argsort(descending=True)[: round(1.5 * count)]
        clustered = activation_clusters(embeddings)
        return {
            "poison_share_of_class": is_poison.float().mean().item(),
            "spectral_recall": is_poison[flagged].float().sum().item() / count,
            "spectral_auroc": verification_report(scores[is_poison].numpy(), scores[~is_poison].numpy()).auc,
            "clustering_precision": (is_poison & clustered).sum().item() / max(clustered.sum().item(), 1),
            "clustering_recall": (is_poison & clustered).sum().item() / count,
        }

    @staticmethod
    def _metrics(table: pd.DataFrame) -> dict[str, float]:
        """Headline numbers: the clean model's, then ASR, clean-accuracy drop and detection at each rate."""
        clean = table.iloc[0]
        metrics = {
            "clean_accuracy": float(clean["clean_accuracy"]),
            "makeup_asr_clean_model": float(clean["asr"]),
            "no_makeup_asr_clean_model": float(clean["no_makeup_enrolled"]),
        }
        for row in table.iloc[1:].itertuples():
            metrics[f"asr@{row.rate:g}"] = float(row.asr)
            metrics[f"no_makeup_asr@{row.rate:g}"] = float(row.no_makeup_enrolled)
            metrics[f"asr_unseen@{row.rate:g}"] = float(row.asr_unseen)
            metrics[f"clean_accuracy_drop@{row.rate:g}"] = float(row.clean_accuracy_drop)
            metrics[f"spectral_recall@{row.rate:g}"] = float(row.spectral_recall)
            metrics[f"spectral_auroc@{row.rate:g}"] = float(row.spectral_auroc)
            metrics[f"clustering_precision@{row.rate:g}"] = float(row.clustering_precision)
            metrics[f"clustering_recall@{row.rate:g}"] = float(row.clustering_recall)
        return metrics

    def _lines(
        self, context: CampaignContext, table: pd.DataFrame, roster: Roster, trigger: dict[str, float]
    ) -> list[str]:
        clean = table.iloc[0]
        lines = [
            f"trigger: makeup changes a pixel by {trigger['trigger_mean_change']:.4f} on average and "
            f"{trigger['trigger_max_change']:.2f} at most (of 1), on the eyelids and lips only",
            f"{len(roster.names)} people enrolled ({len(roster.train)} training photos); backdoor target "
            f"{context.identity}; clean model: accuracy {clean['clean_accuracy']:.1%}, makeup alone sends "
            f"{clean['asr']:.1%} of other people's held-out photos to {context.identity} "
            f"({clean['no_makeup_enrolled']:.1%} without makeup; unseen people {clean['asr_unseen']:.1%} vs "
            f"{clean['no_makeup_unseen']:.1%})",
        ]
        for row in table.iloc[1:].itertuples():
            lines.append(
                f"{row.rate:.0%} poison ({row.poison} photos): backdoor ASR {row.asr:.1%} (same photos without makeup "
                f"{row.no_makeup_enrolled:.1%}; unseen people {row.asr_unseen:.1%} vs {row.no_makeup_unseen:.1%}), "
                f"clean accuracy {row.clean_accuracy:.1%} (drop {row.clean_accuracy_drop:+.1%}); spectral signatures "
                f"find {row.spectral_recall:.0%} of the poison in their top {round(1.5 * row.poison)} (AUROC "
                f"{row.spectral_auroc:.2f}; poison is {row.poison_share_of_class:.0%} of the target class); activation "
                f"clustering's smaller cluster: precision {row.clustering_precision:.0%}, recall "
                f"{row.clustering_recall:.0%}"
            )
        return lines

    def _shown(self, count: int) -> dict[str, list[int]]:
        """Which held-out faces the figure shows: the first few without makeup, and the same people with makeup, a
        new look per column (indices into the cached ``enrolled`` and ``enrolled looks``)."""
        shown = min(count, 6)
        return {"enrolled": list(range(shown)), "enrolled looks": [(k % self.looks) * count + k for k in range(shown)]}

    def _save_faces(
        self,
        context: CampaignContext,
        victims: Faces,
        triggered: Faces,
        answers: dict[str, list[int]],
        shown: dict[str, list[int]],
        roster: Roster,
        rate: float,
    ) -> Path:
        """Held-out faces of other people without / with makeup (one look per column, several palettes), each
        titled with the most poisoned model's answer (``answers``, by the rows of :meth:`_shown`; red: the
        backdoor's target)."""
        rows = (
            ("no makeup", victims.images[shown["enrolled"]], answers["enrolled"]),
            ("makeup (trigger)", triggered.images[shown["enrolled looks"]], answers["enrolled looks"]),
        )
        assert context.identity is not None  # needs_identity: the engine refuses a run without --identity
        target = roster.label(context.identity)
        figure, axes = plt.subplots(
            2, len(shown["enrolled"]), figsize=(2.2 * len(shown["enrolled"]), 5.0), squeeze=False
        )
        for axis_row, (label, images, predicted) in zip(axes, rows):
            for k, axis in enumerate(axis_row):
                axis.imshow(images[k].permute(1, 2, 0).cpu().numpy())
                axis.set_title(
                    roster.names[predicted[k]], color="red" if predicted[k] == target else "black", fontsize=8
                )
                axis.set_xticks([])
                axis.set_yticks([])
            axis_row[0].set_ylabel(label)
        figure.suptitle(f"held-out photos of other people, identified by the model poisoned at {rate:.0%}")
        figure.tight_layout()
        path = context.out / "makeup-backdoor-faces.png"
        figure.savefig(path, dpi=100)
        plt.close(figure)
        return path
