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
    MinimalResult,
    objective_gradient,
)
from redteam.api.campaigns import Axis, Campaign, CampaignContext, CampaignReport
from redteam.api.defenses import DEFENSES, InputTransform, ModelWrapper
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
    ModelCard,
    Preprocessing,
    Target,
    TemplateWarp,
    crop_resize,
    grants,
)
from redteam.budgets import Budget, Norm, perturbation_size
from redteam.threats import Enrolment, Objective, Probe, Verdict

__all__ = [
    "ACCESS_LEVELS",
    "ATTACKS",
    "DEFENSES",
    "TARGETS",
    "Access",
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
    "MinimalAttack",
    "MinimalResult",
    "ModelCard",
    "ModelWrapper",
    "Norm",
    "Objective",
    "Preprocessing",
    "Probe",
    "Target",
    "TemplateWarp",
    "Verdict",
    "crop_resize",
    "grants",
    "objective_gradient",
    "perturbation_size",
]
