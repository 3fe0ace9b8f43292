"""``python -m torch_sparsecpu.bench``: the ``sparsecpu-bench`` command."""

import sys

from .cli import main

sys.exit(main())
