from __future__ import annotations

import sys

from autosearch.cli import main

sys.exit(main())
