from __future__ import annotations

import sys

from ._process import main

sys.exit(main())
