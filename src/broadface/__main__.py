"""``python -m broadface`` (also what ``torchrun -m broadface train ...`` runs)."""
import sys

from broadface.cli.main import entry

sys.exit(entry())
