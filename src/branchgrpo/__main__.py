"""``python -m branchgrpo`` (also what ``torchrun -m branchgrpo`` runs)."""

import sys

from .cli import main

sys.exit(main())
