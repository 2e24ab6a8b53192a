"""`python -m MedDiffFMLib TASK INPUT -o OUTPUT [options]`."""
from __future__ import annotations

import sys

from .cli import main

sys.exit(main())
