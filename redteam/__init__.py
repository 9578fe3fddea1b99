"""redteam: adversarial robustness evaluation for face recognition and detection systems."""

import os

__version__ = "0.1.0"

# OpenMP threads that wait actively (torch's default) spin on cores other work needs: on a machine busy with anything
# else (a CI runner, a laptop, a second redteam process) every pass becomes several times slower. Passive waiting
# costs nothing measurable on an idle machine. It only takes effect if set before torch is first imported, which is
# why it sits here, the first module any entry point loads; a value the user set is kept.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
