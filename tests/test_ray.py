"""Sweeps on Ray: a sweep on a local Ray cluster with two workers stores exactly what the one-process sweep stores
(results, checks, curves, sweep.json); a Ray sweep whose driver is killed with -9 resumes from the store and ends
equal; and the mistakes (no Ray, an address where no cluster answers, --workers without --ray) are one line.

Exact equality needs the same torch threads per process: CPU kernels sum in an order that depends on the thread
count (one thread per Ray worker against two in a plain process moves scores by ~1e-4 here; verdicts agreed), so the
one-process reference runs on one thread, like each worker.
"""

from __future__ import annotations

import json
import os
import re
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch

from redteam.results import ResultStore

#: Single-probe batches: two workers share each budget's four, and a kill lands between batches.
SWEEP = """data: {data}
targets: [facenet]
attacks: {{pgd: {{steps: 4}}}}
eps: [0, 1]
limit: 4
batch_size: 1
"""
BATCHES = 8  # 4 clean + 4 attacked at 1/255 (every probe is clean-correct)


#: A local Ray cluster of 2 CPUs, in a process of its own that prints its address and ends it when stdin closes.
CLUSTER = """import sys, ray
ray.init(num_cpus=2, include_dashboard=False, object_store_memory=100 * 2**20, logging_level="ERROR")
print(ray.get_runtime_context().gcs_address, flush=True)
sys.stdin.read()
ray.shutdown()
"""
#: Ray enables token authentication on the clusters it starts; a driver given an address sends the token (from
#: ~/.ray/auth_token) only when told to.
TOKEN = {"RAY_AUTH_MODE": "token"}


@pytest.fixture(scope="module")
def cluster() -> str:
    """The address of a running Ray cluster (2 CPUs) that sweeps connect to from their own processes, as to any
    cluster's head; it is shut down after the module."""
    pytest.importorskip("ray", reason="Ray is not installed (pip install 'redteam[distributed]')")
    head = subprocess.Popen([sys.executable, "-c", CLUSTER], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        address = head.stdout.readline().strip()
        assert address, "the Ray cluster did not start"
        yield address
    finally:
        head.stdin.close()
        head.wait(timeout=120)
        head.stdout.close()


@pytest.fixture(scope="module")
def config(faces_root, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("ray") / "tiny.yaml"
    path.write_text(SWEEP.format(data=faces_root))
    return path


@pytest.fixture(scope="module")
def one_process(config) -> Path:
    """The plain sweep, in this process on one thread (as each Ray worker runs)."""
    from redteam.cli import main

    out, threads = config.parent / "one-process", torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(sys, "argv", ["redteam", "sweep", str(config), "--out", str(out)])
            with pytest.raises(SystemExit) as done:
                main()
        assert done.value.code in (0, None)
    finally:
        torch.set_num_threads(threads)
    return out


def _ray_sweep(config: Path, out: Path, address: str) -> subprocess.Popen:
    command = [sys.executable, "-c", "from redteam.cli import main; main()", "sweep", str(config), "--out", str(out),
               "--ray", address, "--workers", "2"]  # fmt: skip
    environment = {**os.environ, **TOKEN}
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=environment)


def _finish(config: Path, out: Path, address: str) -> int:
    """Run the Ray sweep to the end; the number of batches it computed."""
    process = _ray_sweep(config, out, address)
    output, _ = process.communicate(timeout=600)
    assert process.returncode == 0, output
    return int(re.search(r"(\d+) batches computed", output).group(1))


def _results(out: Path) -> pd.DataFrame:
    frame = ResultStore(out / "results.sqlite").frame()
    return frame.sort_values(["cell", "eps", "probe"]).reset_index(drop=True)


def _checks(out: Path) -> pd.DataFrame:
    return ResultStore(out / "results.sqlite").checks().sort_values(["cell", "name"]).reset_index(drop=True)


def _rows(out: Path) -> int:
    try:
        with sqlite3.connect(out / "results.sqlite", timeout=60) as db:
            return db.execute("SELECT COUNT(*) FROM results").fetchone()[0]
    except sqlite3.OperationalError:  # not created yet
        return 0


def test_ray_sweep_with_two_workers_equals_the_one_process_sweep(cluster, config, one_process):
    out = config.parent / "ray"
    assert _finish(config, out, cluster) == BATCHES
    expected = _results(one_process)
    assert len(expected) == BATCHES and (expected["steps"] > 0).any()  # something was attacked
    pd.testing.assert_frame_equal(_results(out), expected, check_exact=True)
    checks = _checks(out)
    assert len(checks) >= 4  # monotone, gradients, unbounded, beats noise: computed on a worker
    pd.testing.assert_frame_equal(checks, _checks(one_process), check_exact=True)
    assert (out / "curve.csv").read_text() == (one_process / "curve.csv").read_text()
    ours, theirs = (json.loads((folder / "sweep.json").read_text()) for folder in (out, one_process))
    where = ours.pop("ray")
    assert where["workers"] == 2 and where["address"] == cluster
    assert len(where["batches per worker"]) == 2 and sum(where["batches per worker"].values()) == BATCHES
    for summary in (ours, theirs):
        summary.pop("seconds")
        summary["command"] = summary["command"].split(" --out ")[0]
    assert ours == theirs


def test_kill_9_the_ray_driver_then_resume_equals_the_one_process_sweep(cluster, config, one_process):
    out = config.parent / "killed"
    process = _ray_sweep(config, out, cluster)
    deadline = time.monotonic() + 300
    # Die while the attacked budget is under way: the clean batches and at least one attacked batch are stored.
    while _rows(out) < 5 and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert process.poll() is None, "the sweep ended before it could be killed"
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    process.stdout.close()
    before = _results(out)
    assert 5 <= len(before) < BATCHES and _checks(out).empty

    resumed = _finish(config, out, cluster)
    assert resumed == BATCHES - len(before)  # every stored batch was skipped, nothing else
    pd.testing.assert_frame_equal(_results(out), _results(one_process), check_exact=True)
    pd.testing.assert_frame_equal(_checks(out), _checks(one_process), check_exact=True)


def test_bad_address_is_one_line(cli, capsys, config, tmp_path):
    pytest.importorskip("ray", reason="Ray is not installed (pip install 'redteam[distributed]')")
    started = time.monotonic()
    assert cli("sweep", config, "--out", tmp_path / "out", "--ray", "127.0.0.1:1") == 2
    err = capsys.readouterr().err
    assert "--ray 127.0.0.1:1: no Ray cluster answers there (connection refused)" in err, err
    assert "Traceback" not in err and time.monotonic() - started < 30
    assert cli("sweep", config, "--ray", "somewhere") == 2
    assert "expected auto, local or HOST:PORT" in capsys.readouterr().err


def test_without_ray_or_without_ray_flag_is_one_line(cli, capsys, monkeypatch, config, tmp_path):
    monkeypatch.setitem(sys.modules, "ray", None)  # what `import ray` meets where Ray is not installed
    assert cli("sweep", config, "--out", tmp_path / "out", "--ray", "auto") == 2
    assert "--ray needs Ray: pip install 'ray>=2.9' (redteam's distributed extra)." in capsys.readouterr().err
    assert cli("sweep", config, "--workers", 2) == 2
    assert "--workers is for Ray sweeps" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
