"""The attack engine. Importing this package registers every attack in ``ATTACKS``."""

from redteam.attacks import pgd  # noqa: F401
from redteam.attacks.base import ATTACKS, Attack, AttackResult, Budget

__all__ = ["ATTACKS", "Attack", "AttackResult", "Budget"]
