"""``python -m pylandmark.training``: the ``pylandmark train`` options, e.g. under torchrun."""
import sys

from .cli import main

sys.exit(main())
