"""The attack engine. Importing this package registers every attack in ``ATTACKS``."""

from redteam.attacks import advhat, cw, external, inversion, makeup_backdoor, minnorm, pgd, uap  # noqa: F401
from redteam.attacks.base import (
    ATTACKS,
    Attack,
    AttackResult,
    Budget,
    Campaign,
    CampaignContext,
    CampaignReport,
    MinimalAttack,
    MinimalResult,
)

__all__ = [
    "ATTACKS",
    "Attack",
    "AttackResult",
    "Budget",
    "Campaign",
    "CampaignContext",
    "CampaignReport",
    "MinimalAttack",
    "MinimalResult",
]
