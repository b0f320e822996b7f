"""`python -m fastdae ...`: see fastdae.cli."""

import sys

from fastdae.cli import main

sys.exit(main())
