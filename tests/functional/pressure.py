"""The memory locker, now :mod:`hv.host.pressure` (``hv bench`` uses it too).

Kept so that ``python -m tests.functional.pressure --pct 3 --hold`` and the tests'
imports still work.
"""

from __future__ import annotations

import sys

from hv.host.pressure import (  # noqa: F401  (re-exported)
    CHUNK_BYTES, SAFETY_FLOOR_PCT, Level, LockerError, MemoryLocker, available_pct, main, meminfo)

if __name__ == "__main__":
    sys.exit(main())
