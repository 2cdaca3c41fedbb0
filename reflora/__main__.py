"""``python -m reflora``: the same as the ``reflora`` command."""

import sys

from reflora.cli import main

sys.exit(main())
