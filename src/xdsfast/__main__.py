"""``python -m xdsfast``."""

import sys

from xdsfast.cli import main

sys.exit(main())
