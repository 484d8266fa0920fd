"""``python -m micromae`` (and ``torchrun -m micromae pretrain ...``)."""

import sys

from micromae.cli import main

sys.exit(main())
