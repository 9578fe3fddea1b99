"""Everything a plugin (a target, attack or defense) builds on, in one place: ``from redteam.api import ...``.

Plugins import this layer (and the other leaf modules: budgets, threats, datasets, runtime, ...) and nothing above
it: never the engine or the front ends. See the README's "Extending".
"""

from redteam.api.attacks import (
    ATTACKS,
    Attack,
    AttackBase,
    AttackKind,
    AttackResult,
    MinimalAttack,
    MinimalQueryAttack,
    MinimalResult,
    QueryAttack,
    QueryResult,
    objective_gradient,
)
from redteam.api.campaigns import Axis, Campaign, CampaignContext, CampaignReport
from redteam.api.defenses import DEFENSES, InputTransform, ModelWrapper
from redteam.api.oracles import Answer, Oracle, QueryBudgetExceeded, bisect_boundary, blend, toward
from redteam.api.targets import (
    ACCESS_LEVELS,
    TARGETS,
    Access,
    CentralCrop,
    Detections,
    FaceDetector,
    FaceRecognizer,
    FixedWarp,
    FrozenGraph,
    LivenessDetector,
    ModelCard,
    Preprocessing,
    Target,
    TemplateWarp,
    crop_resize,
    grants,
)
from redteam.budgets import QUERY_CHECKPOINTS, Budget, Norm, perturbation_size
from redteam.threats import Enrolment, Objective, Probe, Verdict

__all__ = [
    "ACCESS_LEVELS",
    "QUERY_CHECKPOINTS",
    "ATTACKS",
    "DEFENSES",
    "TARGETS",
    "Access",
    "Answer",
    "Attack",
    "AttackBase",
    "AttackKind",
    "AttackResult",
    "Axis",
    "Budget",
    "Campaign",
    "CampaignContext",
    "CampaignReport",
    "CentralCrop",
    "Detections",
    "Enrolment",
    "FaceDetector",
    "FaceRecognizer",
    "FixedWarp",
    "FrozenGraph",
    "InputTransform",
    "LivenessDetector",
    "MinimalAttack",
    "MinimalQueryAttack",
    "MinimalResult",
    "ModelCard",
    "ModelWrapper",
    "Norm",
    "Objective",
    "Oracle",
    "bisect_boundary",
    "toward",
    "blend",
    "Preprocessing",
    "Probe",
    "QueryAttack",
    "QueryBudgetExceeded",
    "QueryResult",
    "Target",
    "TemplateWarp",
    "Verdict",
    "crop_resize",
    "grants",
    "objective_gradient",
    "perturbation_size",
]
