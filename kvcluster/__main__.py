"""`python -m kvcluster`: see kvcluster.cli.main."""

import sys

from kvcluster.cli.main import main

sys.exit(main())
