"""Universal adversarial perturbation (Moosavi-Dezfooli et al. 2017) against face verification: dodging.

One perturbation ``δ [1, 3, S, S]`` (ℓ∞ or ℓ2 bounded) is added to every face. The dataset's identities are split
by the seed into two disjoint halves: δ is learned on photos of the first and judged on genuine pairs of the
second, so its fooling rate says how well it breaks people it has never seen.

Learning: stochastic projected gradient ascent over minibatches of learning faces for ``epochs`` passes, from δ = 0;
each step is the sign (ℓ∞) or the normalised (ℓ2) gradient of the minibatch's summed dodging loss, projected back
onto the budget; the step lengths decay linearly and add up to ``step_size`` x ε, whatever the number of steps. The
loss is the dodging threat model's own, ``threshold - similarity(f(x + δ), f(enrolment))``, with an enrolment photo
of the same person (the learning identities' dodging pairs), not the self-referenced ``similarity(f(x + δ), f(x))``:
it is the decision that is judged, its gradient does not vanish at δ = 0 (the self-referenced similarity is at its
maximum there, so it needs a random start, whose noise stays in the perturbation), and it measured better: at
8/255 on FaceNet (256 learning faces, 10 epochs), 91.1% of 128 held-out pairs unmatched against 77.4%
self-referenced (random noise: 0.8-1.6%). It needs people with two photos to learn on.

Judging: the dodging threat model's genuine pairs of held-out identities (a probe photo and an enrolment photo of
the same person): δ is added to the probe, the enrolment stays clean. The fooling rate is the share of pairs that
match clean and no longer match with δ, at the target's calibrated threshold. The baseline is one random
perturbation on the same budget's boundary (every pixel ±ε for ℓ∞; a Gaussian direction ε long for ℓ2), added
to every probe in the same way. One δ is learned per budget; the curve is the share of held-out pairs still matched.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import matplotlib.pyplot as plt
import pandas as pd
import torch
from torch import Tensor

from redteam.api import (
    ATTACKS,
    TARGETS,
    Axis,
    Budget,
    Campaign,
    CampaignContext,
    CampaignReport,
    Enrolment,
    FaceRecognizer,
    objective_gradient,
)
from redteam.budgets import image_units, perturbation_size
from redteam.errors import DataError
from redteam.evidence import as_saved
from redteam.plots import AXIS_LABELS, face_grid  # also selects matplotlib's headless backend before pyplot draws
from redteam.results import SYSTEM_STAGES, stage_shares, tally
from redteam.runtime import chunks
from redteam.threats import Dodging, Probe

#: The budget whose UAP is reported (metrics, transfer, images) when it is among the budgets; else the largest.
HEADLINE = {"linf": 8.0, "l2": 8.0}
#: Held-out pairs judged when ``--limit`` is not given.
DEFAULT_PAIRS = 400


@dataclass
class Split:
    """Dodging pairs of two disjoint sets of identities: ``learning`` (their probe photos are the faces δ is learned
    on) and ``held_out`` (judged)."""

    learning: list[Probe]
    held_out: list[Probe]
    learning_identities: set[str]
    held_out_identities: set[str]


@dataclass
class Judged:
    """Each probe's similarity to its enrolment, ``[K, N]`` for K perturbations of N pairs, whether the face
    system decided wrongly (no match), ``[K, N]`` bool, and for a face system where it stopped each probe
    (``SYSTEM_STAGES``, K lists of N; ``None`` for a single recogniser)."""

    similarity: Tensor
    fooled: Tensor
    stages: list[list[str]] | None = None

    def fooling_rate(self, row: int) -> float:
        """Share of the pairs matched without a perturbation (row 0) that perturbation ``row`` unmatches."""
        matched = ~self.fooled[0]
        return (self.fooled[row] & matched).sum().item() / max(1, matched.sum().item())

    def accuracy(self, row: int) -> float:
        return 1 - self.fooled[row].float().mean().item()


@ATTACKS.register("uap", "universal adversarial perturbation for dodging, learned and judged on disjoint identities")
@dataclass
class UAP(Campaign):
    """The settings, for ``--option key=value``:

    ``epochs``: passes over the learning faces; ``learn_faces``: how many (photos of the learning half of the
    identities, spread over people); ``batch``: faces per gradient step (and per judging pass); ``step_size``: the
    length of all steps together, in units of ε (each step shorter than the one before, linearly); ``eot``: gradient
    samples per step (randomised defenses); ``transfer``: comma-separated recognisers the reported UAP is also
    judged on (empty: none). ``--limit`` caps the held-out pairs (default :data:`DEFAULT_PAIRS`).
    """

    name = "uap"
    axes = {
        "linf": Axis("linf", AXIS_LABELS["linf"], "budget", (0.0, 2.0, 4.0, 8.0, 16.0), high=255.0),
        "l2": Axis("l2", AXIS_LABELS["l2"], "budget", (0.0, 2.0, 4.0, 8.0, 16.0)),
    }
    threats = ("dodging",)
    supports_eot = True

    epochs: int = 5
    learn_faces: int = 256
    batch: int = 16
    step_size: float = 10.0
    eot: int = 1
    transfer: str = "facenet,arcface,dlib-resnet"

    def __post_init__(self) -> None:
        if min(self.epochs, self.learn_faces, self.batch, self.eot) < 1:
            raise ValueError("epochs, learn_faces, batch and eot must be at least 1")
        if self.step_size <= 0:
            raise ValueError("step_size must be positive")
        for name in self.transfer_targets:
            if TARGETS.get(name).card.task != "recognition":
                raise ValueError(f"transfer lists recognisers; {name} is a {TARGETS.get(name).card.task} model")

    @property
    def transfer_targets(self) -> list[str]:
        return [name.strip() for name in self.transfer.split(",") if name.strip()]

    def run(self, context: CampaignContext) -> CampaignReport:
        target, norm = context.target, context.norm
        assert isinstance(target, FaceRecognizer)  # the engine checked the threat's task against the target
        budgets = list(context.budgets)
        headline = HEADLINE[norm] if HEADLINE[norm] in budgets else budgets[-1]
        split = self.split(context)
        learning = self.enrolled(context, target, split.learning)
        uaps, noises, seconds = {}, {}, {}
        for eps in budgets[1:]:
            budget = self.budget(norm, eps)
            stage = context.stage(f"uap {norm} {eps:g}", partial(self._timed_learn, context, learning, split, budget))
            uaps[eps], seconds[eps] = stage["uap"], stage["seconds"]
            noise = torch.randn(
                uaps[eps].shape, generator=context.generator("uap-noise", norm, eps), device=context.device
            )
            noises[eps] = budget.ascent(noise, budget.eps)
        clean = torch.zeros_like(uaps[headline])
        shown = [clean, *uaps.values(), *noises.values()]
        held_out = self.enrolled(context, target, split.held_out)
        held = self.judge(context, target, held_out, split.held_out, torch.cat(shown), "held-out pairs", True)
        learned = self.judge(
            context, target, learning, split.learning, torch.cat([clean, uaps[headline]]), "learning pairs"
        )
        last = len(uaps)
        table = pd.DataFrame(
            [
                {
                    "eps": eps,
                    "accuracy": held.accuracy(k),
                    "noise_accuracy": held.accuracy(k + last if k else 0),
                    "fooling_rate": held.fooling_rate(k),
                    "noise_fooling_rate": held.fooling_rate(k + last if k else 0),
                    "similarity": held.similarity[k].mean().item(),
                    "noise_similarity": held.similarity[k + last if k else 0].mean().item(),
                    "linf": shown[k].abs().max().item() * 255,
                    "l2": shown[k].norm().item(),
                    "learn_seconds": seconds.get(eps, 0.0),
                }
                for k, eps in enumerate(budgets)
            ]
        )
        at = budgets.index(headline)
        row = table.iloc[at]
        per_pair = self._per_pair(context, split.held_out, held, at, at + last)
        self._record_evidence(context, held_out, split.held_out, held, at, uaps[headline], headline)
        transfer, skipped = self._transfer(context, split.held_out, uaps[headline], noises[headline])
        torch.save({"norm": norm, "eps": headline, "uap": uaps[headline].cpu()}, context.out / "uap.pt")
        metrics = {
            "eps": headline,
            "threshold": target.threshold,
            "fooling_rate": row["fooling_rate"],
            "noise_fooling_rate": row["noise_fooling_rate"],
            "learning_fooling_rate": learned.fooling_rate(1),
            "clean_accuracy": held.accuracy(0),
            "accuracy": row["accuracy"],
            "noise_accuracy": row["noise_accuracy"],
            "clean_similarity": held.similarity[0].mean().item(),
            "noise_similarity": row["noise_similarity"],
            "uap_similarity": row["similarity"],
            "uap_linf": row["linf"],
            "uap_l2": row["l2"],
            "held_out_pairs": len(split.held_out),
            "held_out_identities": len({context.dataset.records[p.image].identity for p in split.held_out}),
            "learning_faces": len(split.learning),
            "learning_identities": len({context.dataset.records[p.image].identity for p in split.learning}),
            "learn_seconds": row["learn_seconds"],
        }
        stage_metrics, stage_lines = self._stages(context, held, at, at + last)
        metrics.update(stage_metrics)
        unit = "/255" if norm == "linf" else f" ({norm})"
        lines = [
            f"held-out identities ({metrics['held_out_identities']} people, {len(split.held_out)} genuine pairs, "
            f"none learned on): the {headline:g}{unit} UAP unmatches {row['fooling_rate']:.1%} of the pairs matched "
            f"clean (random noise of the same norm: {row['noise_fooling_rate']:.1%}); mean similarity to the "
            f"enrolment {metrics['clean_similarity']:.3f} clean, {row['noise_similarity']:.3f} with noise, "
            f"{row['similarity']:.3f} with the UAP (threshold {target.threshold:.4f})",
            f"learned on {len(split.learning)} faces of {metrics['learning_identities']} other people ({self.epochs} "
            f"epochs of {self.batch}-face steps, {row['learn_seconds']:.0f} s); on their own pairs it unmatches "
            f"{metrics['learning_fooling_rate']:.1%}",
            *stage_lines,
            *skipped,
        ]
        return CampaignReport(
            metrics=metrics,
            tables={"budgets": table, "held_out": per_pair, "transfer": transfer},
            curve=table[["eps", "accuracy"]].assign(n=len(split.held_out)),
            images=[
                self._save_uaps(context.out, uaps, norm),
                self._save_faces(
                    context,
                    split.held_out,
                    held,
                    [
                        ("clean", clean, 0),
                        (f"noise {headline:g}{unit}", noises[headline], at + last),
                        (f"UAP {headline:g}{unit}", uaps[headline], at),
                    ],
                ),
                context.out / "uap.pt",
            ],
            lines=lines,
        )

    @staticmethod
    def budget(norm: str, eps: float) -> Budget:
        """``eps`` as the user gives it (/255 for ℓ∞) -> the budget in image units."""
        return Budget(norm, image_units(eps, norm))  # type: ignore[arg-type]

    def split(self, context: CampaignContext) -> Split:
        """Identities shuffled by the seed, halved: the first half's dodging pairs (at most ``learn_faces``) are
        learned on, the second's (at most ``--limit``) judged. Pairs interleave people: a prefix spreads over many."""
        dataset = context.dataset
        identities = context.shuffled(sorted(dataset.by_identity), "uap", context.seed)
        learning = set(identities[: len(identities) // 2])
        probes = Dodging(dataset, seed=context.seed).probes()
        learn = [p for p in probes if dataset.records[p.image].identity in learning]
        held = [p for p in probes if dataset.records[p.image].identity not in learning]
        if not learn or not held:
            raise DataError(
                f"uap needs identities with two or more photos on both sides of its split; {dataset.name} has "
                f"{len({dataset.records[p.image].identity for p in probes})} such identities."
            )
        return Split(
            learning=learn[: self.learn_faces],
            held_out=held[: context.limit or DEFAULT_PAIRS],
            learning_identities=learning,
            held_out_identities=set(identities) - learning,
        )

    def learn(self, context: CampaignContext, enrolment: Enrolment, probes: list[Probe], budget: Budget) -> Tensor:
        """One perturbation ``[1, 3, S, S]`` within ``budget`` that unmatches the ``probes`` (dodging pairs, their
        enrolment photos in ``enrolment``) when added to their probe photos."""
        target = context.target
        assert isinstance(target, FaceRecognizer)  # the engine checked the threat's task against the target
        generator = context.generator("uap", budget.norm, budget.eps)
        delta = torch.zeros_like(context.load([probes[0].image]))
        threat = Dodging(context.dataset, seed=context.seed)
        steps, step = self.epochs * len(self._chunks(probes)), 0
        label = f"{budget.eps * 255:g}/255" if budget.norm == "linf" else f"{budget.eps:g} (l2)"
        advance = context.progress(f"uap: learning at {label}", steps)
        for _ in range(self.epochs):
            for chunk in self._chunks(torch.randperm(len(probes), generator=generator, device=context.device).tolist()):
                batch = [probes[i] for i in chunk]
                images = context.load([p.image for p in batch])
                goal = threat.objective(target, enrolment, batch)
                _, gradient = objective_gradient(goal, (images + delta).clamp(0, 1), self.eot)
                length = 2 * self.step_size * budget.eps * (steps - step) / steps**2  # sums to step_size x ε
                delta = budget.project(delta + budget.ascent(gradient.sum(0, keepdim=True), length))
                step += 1
                advance(1)
        return delta

    def _timed_learn(self, context: CampaignContext, enrolment: Enrolment, split: Split, budget: Budget) -> dict:
        started = time.perf_counter()
        uap = self.learn(context, enrolment, split.learning, budget)
        return {"uap": uap, "seconds": time.perf_counter() - started}

    def enrolled(self, context: CampaignContext, model: FaceRecognizer, probes: list[Probe]) -> Enrolment:
        """The probes' enrolment photos embedded by ``model``."""
        with torch.no_grad():
            return Dodging(context.dataset, seed=context.seed).enrol(lambda i: model.embed(context.load(i)), probes)

    def judge(
        self,
        context: CampaignContext,
        model: FaceRecognizer,
        enrolment: Enrolment,
        probes: list[Probe],
        perturbations: Tensor,
        what: str,
        where_stopped: bool = False,
    ) -> Judged:
        """Every perturbation ``[K, 3, S, S]`` added to every probe photo, judged by ``model`` against the probe's
        clean enrolment photo (``enrolment``, by ``model``: the dodging objective and decision); with
        ``where_stopped``, a face system also says where it stopped each (one more detection pass)."""
        advance = context.progress(f"uap: judging {what} ({model.card.name})", len(probes))
        threat, similarity, fooled = Dodging(context.dataset, seed=context.seed), [], []
        stages: list[list[str]] | None = [[] for _ in perturbations] if where_stopped and model.pipeline else None
        for chunk in self._chunks(probes):
            images = context.load([p.image for p in chunk])
            objective = threat.objective(model, enrolment, chunk)
            with torch.no_grad():
                shown = [(images + delta).clamp(0, 1) for delta in perturbations]
                verdicts = [objective(perturbed) for perturbed in shown]
                for row, perturbed, verdict in zip(stages or [], shown, verdicts):
                    row += model.verdicts(perturbed, verdict.score, model.threshold) or []
            similarity.append(torch.stack([v.score for v in verdicts]))
            fooled.append(torch.stack([v.success for v in verdicts]))
            advance(len(chunk))
        return Judged(torch.cat(similarity, dim=1), torch.cat(fooled, dim=1), stages)

    @staticmethod
    def _stages(context: CampaignContext, held: Judged, uap: int, noise: int) -> tuple[dict[str, float], list[str]]:
        """For a face system, where it stopped the held-out pairs' probes clean, with noise and with the reported
        UAP: ``*_face_found`` and ``*_matched`` shares, and a line. Nothing for a single model."""
        if held.stages is None:
            return {}, []
        shown = {"clean": held.stages[0], "noise": held.stages[noise], "uap": held.stages[uap]}
        tallies = {condition: tally(pd.Series(stages), SYSTEM_STAGES) for condition, stages in shown.items()}
        line = (
            f"where {context.target_name} stopped the held-out probes with the UAP: {tallies['uap']} (with noise: "
            f"{tallies['noise']}; clean: {tallies['clean']}); a face no longer found is detector evasion, not dodging"
        )
        return stage_shares(shown), [line]

    def _chunks(self, items: list) -> list[list]:
        return list(chunks(items, self.batch))

    def _per_pair(self, context: CampaignContext, probes: list[Probe], held: Judged, uap: int, noise: int):
        """The reported UAP's effect on every held-out pair."""
        records = context.dataset.records
        return pd.DataFrame(
            {
                "identity": [records[p.image].identity for p in probes],
                "probe": [Path(records[p.image].source).name for p in probes],
                "enrolment": [Path(records[p.reference].source).name for p in probes],
                "clean": held.similarity[0].tolist(),
                "noise": held.similarity[noise].tolist(),
                "uap": held.similarity[uap].tolist(),
                "fooled": (held.fooled[uap] & ~held.fooled[0]).tolist(),
                **({"stage": held.stages[uap]} if held.stages else {}),
            }
        )

    def _record_evidence(
        self, context: CampaignContext, enrolment: Enrolment, probes: list[Probe], held: Judged, row: int, uap: Tensor,
        eps: float,
    ) -> None:  # fmt: skip
        """The held-out probes that ``uap`` (row ``row`` of ``held``, at ``eps``) unmatched and that matched clean, with
        the UAP added, into the run's evidence log, each with the verdict on it as an 8-bit file holds it."""
        target, records = context.target, context.dataset.records
        assert isinstance(target, FaceRecognizer)  # the engine checked the threat's task against the target
        fooled = torch.nonzero(held.fooled[row] & ~held.fooled[0]).squeeze(1).tolist()
        threat = Dodging(context.dataset, seed=context.seed)
        size = {norm: perturbation_size(uap, norm).item() for norm in ("linf", "l2")}
        for chunk in self._chunks(fooled):
            pairs = [probes[k] for k in chunk]
            images = (context.load([p.image for p in pairs]) + uap).clamp(0, 1)
            with torch.no_grad():
                saved = threat.objective(target, enrolment, pairs)(as_saved(images))
            entries = [
                {"probe": pair.key, "eps": eps, "identity": records[pair.image].identity,
                 "reference": records[pair.reference].identity, "score": float(held.similarity[row, k]),
                 "threshold": float(target.threshold), **size, "saved_fooled": bool(saved.success[i]),
                 "saved_score": float(saved.score[i])}
                for i, (k, pair) in enumerate(zip(chunk, pairs))
            ]  # fmt: skip
            context.record_evidence(entries, list(images))

    def _transfer(
        self, context: CampaignContext, probes: list[Probe], uap: Tensor, noise: Tensor
    ) -> tuple[pd.DataFrame, list[str]]:
        """The reported UAP (and its noise baseline) judged by each ``transfer`` recogniser on the held-out pairs."""
        rows = []
        models, skipped = context.recognizers(self.transfer_targets)
        for name, model in models:
            perturbations = torch.cat([torch.zeros_like(uap), noise, uap])
            judged = self.judge(
                context, model, self.enrolled(context, model, probes), probes, perturbations, "transfer"
            )
            rows.append(
                {
                    "target": name,
                    "threshold": model.threshold,
                    "clean_accuracy": judged.accuracy(0),
                    "noise_accuracy": judged.accuracy(1),
                    "uap_accuracy": judged.accuracy(2),
                    "noise_fooling_rate": judged.fooling_rate(1),
                    "fooling_rate": judged.fooling_rate(2),
                    "clean_similarity": judged.similarity[0].mean().item(),
                    "uap_similarity": judged.similarity[2].mean().item(),
                }
            )
        return pd.DataFrame(rows), skipped

    @staticmethod
    def _save_uaps(out: Path, uaps: dict[float, Tensor], norm: str) -> Path:
        """Each budget's UAP, centred on grey and amplified to the full range (the scale is in each title)."""
        figure, axes = plt.subplots(1, len(uaps), figsize=(3.2 * len(uaps), 3.6), squeeze=False)
        for axis, (eps, delta) in zip(axes[0], uaps.items()):
            largest = delta.abs().max().clamp_min(1e-12)
            axis.imshow((0.5 + delta[0] / (2 * largest)).permute(1, 2, 0).cpu().numpy())
            budget = f"ε = {eps:g}/255" if norm == "linf" else f"ℓ2 = {eps:g}"
            axis.set_title(f"{budget}: ±{largest * 255:.1f}/255 = black/white (x{0.5 / largest:.0f})", fontsize=9)
            axis.set_xticks([])
            axis.set_yticks([])
        figure.suptitle("universal perturbations (grey = 0)", fontsize=10)
        figure.tight_layout()
        path = out / "uap.png"
        figure.savefig(path, dpi=100)
        plt.close(figure)
        return path

    @staticmethod
    def _save_faces(
        context: CampaignContext, probes: list[Probe], held: Judged, rows: list[tuple[str, Tensor, int]]
    ) -> Path:
        """Held-out probe photos, one row per ``(label, perturbation [1, 3, S, S], row of held)``; each photo's
        similarity to its enrolment above it, red where the face system no longer matches the pair."""
        shown = min(len(probes), 6)
        faces = context.load([p.image for p in probes[:shown]])
        grid = [
            (
                label,
                (faces + delta).clamp(0, 1),
                [f"{s:.3f}" for s in held.similarity[row, :shown].tolist()],
                held.fooled[row, :shown].tolist(),
            )
            for label, delta, row in rows
        ]
        title = f"held-out people: similarity to their enrolment photo (threshold {context.target.threshold:.3f})"
        return face_grid(grid, title, context.out / "uap-faces.png")
