"""``python -m kalm_fast.cli`` (what torchrun runs): the ``kalm-fast`` command."""
import sys

from . import main

sys.exit(main())
