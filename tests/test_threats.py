"""Probe selection for each threat model, and the objectives' verdicts."""

from __future__ import annotations

import torch

from redteam.datasets import ImageFolderDataset
from redteam.threats import Dodging, Identification, IdentificationObjective, Impersonation, VerificationObjective


def test_dodging_pairs_same_identity_distinct_images(faces):
    probes = Dodging(faces, seed=3).probes(limit=100)
    assert len(probes) == 100 and len({p.key for p in probes}) == 100
    for probe in probes:
        assert probe.image != probe.reference
        assert faces.records[probe.image].identity == faces.records[probe.reference].identity
    # any prefix spreads over many people
    assert len({faces.records[p.image].identity for p in probes[:50]}) == 50


def test_probe_choice_is_fixed_by_seed(faces):
    assert Dodging(faces, seed=1).probes(30) == Dodging(faces, seed=1).probes(30)
    assert Dodging(faces, seed=1).probes(30) != Dodging(faces, seed=2).probes(30)


def test_impersonation_targets_another_identity(faces):
    for probe in Impersonation(faces, seed=0).probes(limit=60):
        assert faces.records[probe.image].identity != faces.records[probe.reference].identity


def test_identification_gallery_excludes_probes(faces):
    threat = Identification(faces, seed=0)
    probes = threat.probes(limit=80)
    gallery = set(threat.enrolment_images(probes))
    assert not gallery & {p.image for p in probes}
    gallery_identities = {faces.records[i].identity for i in gallery}
    assert len(gallery) == len(gallery_identities)
    assert all(faces.records[p.image].identity in gallery_identities for p in probes)


def test_lfw_pairs_file_drives_verification(faces_root, tmp_path):
    lines = ["1\t2", "Aaron_Peirsol\t1\t2", "Al_Gore\t1\t3", "Aaron_Peirsol\t3\tAl_Gore\t2"]
    (tmp_path / "pairs.txt").write_text("\n".join(lines) + "\n")
    dataset = ImageFolderDataset(faces_root, pairs_file=tmp_path / "pairs.txt")
    dodging, impersonation = Dodging(dataset).probes(), Impersonation(dataset).probes()
    assert [dataset.records[p.image].source.rsplit("/", 1)[1] for p in dodging] == [
        "Aaron_Peirsol_0002.jpg",
        "Al_Gore_0003.jpg",
    ]
    assert len(impersonation) == 1
    assert dataset.records[impersonation[0].reference].identity == "Al_Gore"


def test_verification_objective_verdicts():
    embed = lambda x: x  # noqa: E731  (images are already "embeddings" here)
    cosine = torch.nn.functional.cosine_similarity
    reference = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    probes = torch.tensor([[1.0, 0.1], [0.0, 1.0]])  # a match and a non-match at threshold 0.5
    dodge = VerificationObjective(embed, lambda a, b: cosine(a, b, dim=-1), 0.5, False, reference)(probes)
    assert dodge.success.tolist() == [False, True]
    impersonate = VerificationObjective(embed, lambda a, b: cosine(a, b, dim=-1), 0.5, True, reference)(probes)
    assert impersonate.success.tolist() == [True, False]
    assert torch.allclose(dodge.loss, -impersonate.loss)


def test_identification_objective_margin():
    gallery = torch.eye(3)
    objective = IdentificationObjective(lambda x: x, lambda a, b: a @ b.T, gallery, torch.tensor([0, 1]))
    result = objective(torch.tensor([[0.9, 0.2, 0.0], [0.0, 0.3, 0.8]]))
    assert result.success.tolist() == [False, True]
    assert torch.allclose(result.loss, torch.tensor([0.2 - 0.9, 0.8 - 0.3]))
    narrowed = objective.select(torch.tensor([1]))
    assert narrowed(torch.tensor([[0.0, 0.3, 0.8]])).success.tolist() == [True]
