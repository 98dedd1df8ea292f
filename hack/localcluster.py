#!/usr/bin/env python3
"""Kept for scripts that call it by path: the test bed is the ``testbed`` package.

python -m testbed up|down|status --dir DIR [--nodes N] [--real-nodes M]
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from testbed.__main__ import main

if __name__ == "__main__":
    sys.exit(main())
