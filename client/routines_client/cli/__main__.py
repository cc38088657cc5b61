import sys

from routines_client.cli import main

sys.exit(main())
