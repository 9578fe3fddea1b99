"""redteam: adversarial robustness evaluation for face recognition and detection systems."""

__version__ = "0.1.0"
