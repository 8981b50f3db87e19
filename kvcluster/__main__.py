"""`python -m kvcluster`: see kvcluster.cli."""

import sys

from kvcluster.cli import main

sys.exit(main())
