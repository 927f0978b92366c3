"""``python -m sdxl_bento.cli``: the ``sdxl-bento`` command."""

import sys

from .main import main

sys.exit(main())
