"""``python -m wsvd_passes.cli``: the ``wsvd`` command."""

import sys

from . import main

sys.exit(main())
