"""Process settings for speed: the thread count follows the batch (one thread for a single image) unless the user
chose one, and glibc keeps freed memory for the next pass."""

from __future__ import annotations

import platform
import resource

import pytest
import torch

from redteam.runtime import choose_threads, keep_freed_memory, threads_for
from redteam.threats import VerificationObjective


@pytest.fixture
def restore_threads():
    before = torch.get_num_threads()
    yield
    choose_threads(None)
    torch.set_num_threads(before)


def batch_count() -> int:
    """The count the policy gives a batch (torch's, as it was when redteam started)."""
    threads_for(8)
    return torch.get_num_threads()


def test_a_single_image_runs_on_one_thread_and_a_batch_on_torchs_count(restore_threads):
    batch_threads = batch_count()
    threads_for(1)
    assert torch.get_num_threads() == 1
    threads_for(8)
    assert torch.get_num_threads() == batch_threads


def test_the_users_count_holds_for_every_batch(restore_threads):
    choose_threads(3)
    for batch in (1, 8):
        threads_for(batch)
        assert torch.get_num_threads() == 3


def test_an_objective_sets_the_count_for_its_pass_and_the_backward_after_it(restore_threads):
    """Every pass of an attack comes through its objective: one whose batch shrank to one probe goes on with one
    thread, and the count stays set for the backward pass."""
    batch_threads, seen = batch_count(), []

    def embed(images):
        seen.append(torch.get_num_threads())
        return images.flatten(1)

    for count in (4, 1):
        objective = VerificationObjective(embed, torch.cosine_similarity, 0.5, False, torch.ones(count, 12))
        objective(torch.rand(count, 3, 2, 2))
    assert seen == [batch_threads, 1]
    assert torch.get_num_threads() == 1


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc's mallopt")
def test_a_large_activation_freed_and_allocated_again_is_not_faulted_in_again():
    """Blocks of 64 MiB (over glibc's 32 MiB ceiling on its mmap threshold), allocated and freed pass after pass,
    settle in the heap instead of being mapped fresh and faulted in page by page every time. (Aligned allocations
    take a few passes to settle: each asks for a little more than the block just freed.)"""
    assert keep_freed_memory()
    pages = 64 * 2**20 // resource.getpagesize()
    faults = []
    for _ in range(12):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        torch.zeros(pages, resource.getpagesize() // 4)
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    assert max(faults[-3:]) < pages / 100, faults
