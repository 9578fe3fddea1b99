"""What users type, fuzzed: every `redteam run` ends in exit 0 or in one line that says what is wrong (exit 2),
never a traceback, whatever the budgets, steps, options, thresholds, devices and output paths."""

from __future__ import annotations

import tempfile
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

BUDGETS = st.sampled_from(["0", "0,1", "0,2,4", "nan", "0,inf", "-1", "abc", "0,,2", "1e9", "", "256", "0.5,0.25"])
STEPS = st.one_of(st.integers(-2, 3).map(str), st.sampled_from(["abc", "1.5", ""]))
OPTIONS = st.lists(
    st.sampled_from(
        [
            "steps=abc",
            "eot=0",
            "momentum=x",
            "nosuch=1",
            "step_size=-1",
            "=",
            "steps",
            "restarts=2",
            "random_start=false",
            "eot=2",
            "step_size=[1]",
            "early_stop=maybe",
        ]
    ),  # fmt: skip
    max_size=2,
)
THRESHOLDS = st.one_of(st.none(), st.sampled_from(["nan", "inf", "-inf", "2", "-0.5", "0.4", "1e300", "x"]))
NAMES = st.sampled_from(["plain", "a[/]b", "[bold]x[/bold]", "with space", "ü-ñ", "dir/sub"])
NORMS = st.sampled_from(["auto", "linf", "l2", "area", ""])
DEVICES = st.sampled_from(["auto", "cpu", "gpu", "cuda", "cuda:7", "tpu"])
BATCHES = st.sampled_from(["1", "0", "-3", "auto", "many"])


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    eps=BUDGETS, steps=STEPS, options=OPTIONS, threshold=THRESHOLDS, name=NAMES, norm=NORMS, device=DEVICES,
    batch=BATCHES, limit=st.integers(-1, 2),
)  # fmt: skip
def test_run_ends_in_success_or_one_clear_line(
    cli, capsys, small_faces, eps, steps, options, threshold, name, norm, device, batch, limit
):
    with tempfile.TemporaryDirectory() as scratch:
        args = ["run", "--data", small_faces.root, "--limit", limit, "--eps", eps, "--steps", steps, "--norm", norm]
        args += ["--device", device, "--batch-size", batch, "--no-checks", "--out", Path(scratch) / name]
        args += [item for option in options for item in ("--option", option)]
        args += ["--threshold", threshold] if threshold is not None else []
        code = cli(*args)
        captured = capsys.readouterr()
        assert "Traceback" not in captured.err + captured.out, args
        assert code in (0, 2), (args, code, captured.err)
        if code == 2:
            lines = [line for line in captured.err.splitlines() if line.strip()]
            assert len(lines) == 1 and lines[0].startswith(("error:", "Usage:", "Try", "╭")), (args, captured.err)
