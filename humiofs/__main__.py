"""python -m humiofs -> cli.main()."""
from __future__ import annotations

import sys

from humiofs.cli import main

sys.exit(main())
