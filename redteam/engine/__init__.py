"""The engine: a config (:mod:`~redteam.engine.config`) is resolved and its pieces built
(:mod:`~redteam.engine.assembly`); a planner decides what is left to compute (:mod:`~redteam.engine.plan`), an
executor computes it (:mod:`~redteam.engine.execute`), and :class:`Evaluation` ties the two in one process. Campaigns
run whole (:mod:`~redteam.engine.campaigns`); sanity checks follow every evaluation (:mod:`~redteam.engine.checks`).

The engine imports the plugins' interfaces and the leaf modules; the front ends (cli, sweep, distributed, report,
gate, training) import the engine. Plugins never do.
"""

from redteam.engine.assembly import TRANSFER_ATTACK, build_attack, build_defense, load_target, parse_options
from redteam.engine.campaigns import CampaignRun, finish_campaign, prepare_campaign, run_campaign
from redteam.engine.checks import Check, check_rows, checks_of, run_checks
from redteam.engine.config import EvaluationConfig
from redteam.engine.evaluation import Evaluation
from redteam.engine.execute import Executor
from redteam.engine.plan import Cell, Planner, Shard, prepare

__all__ = [
    "TRANSFER_ATTACK",
    "CampaignRun",
    "Cell",
    "Check",
    "Evaluation",
    "EvaluationConfig",
    "Executor",
    "Planner",
    "Shard",
    "build_attack",
    "build_defense",
    "check_rows",
    "checks_of",
    "finish_campaign",
    "load_target",
    "parse_options",
    "prepare",
    "prepare_campaign",
    "run_campaign",
    "run_checks",
]
