"""``python -m routines.devhost``: see ``routines.devhost``."""

import sys

from routines.devhost.host import main

sys.exit(main())
