"""The closed-set identification model that inversion and poisoning campaigns attack."""

from __future__ import annotations

import pytest
import torch

from redteam.errors import RedteamError
from redteam.identification import FitConfig, build_identifier, choose_roster, fit


@pytest.fixture(scope="module")
def roster(faces):
    return choose_roster(faces, identities=8, held_out=2, seed=3, include="Bill_Gates")


def test_enrolment_keeps_test_photos_apart_and_includes_the_named_person(faces, roster):
    assert len(roster.names) == 8 and "Bill_Gates" in roster.names
    assert not set(roster.train) & set(roster.test)
    for index, label in zip(roster.train + roster.test, roster.train_labels + roster.test_labels):
        assert faces.records[index].identity == roster.names[label]
    assert roster.test_labels.count(roster.label("Bill_Gates")) == 2
    assert choose_roster(faces, 8, 2, seed=3, include="Bill_Gates") == roster
    assert choose_roster(faces, 8, 2, seed=4, include="Bill_Gates").names != roster.names


def test_enrolment_errors_are_one_line(faces):
    with pytest.raises(RedteamError, match="not in"):
        choose_roster(faces, 8, include="Nobody_Here")
    with pytest.raises(RedteamError, match="people with"):
        choose_roster(faces, 10_000)


def test_head_identifies_held_out_photos_and_training_lowers_the_loss(facenet, faces, roster):
    images, labels = faces.load(list(roster.train)), torch.tensor(roster.train_labels)
    held_out, held_labels = faces.load(list(roster.test)), torch.tensor(roster.test_labels)
    model = build_identifier(facenet, images, labels, len(roster.names))
    nearest_mean_accuracy = (model.predict(held_out) == held_labels).float().mean()
    losses = fit(model, images, labels, FitConfig(epochs=5, seed=0))
    assert losses[-1] < losses[0]
    assert (model.predict(held_out) == held_labels).float().mean() >= max(nearest_mean_accuracy - 0.07, 0.8)
    assert not model.directions.requires_grad
    # a shuffled head is no identifier: the test can fail
    model.directions.data = model.directions.data.roll(1, dims=0)
    assert (model.predict(held_out) == held_labels).float().mean() < 0.3
