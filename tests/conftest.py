"""Shared test setup: tiers by what the machine must provide (drgn's habit).

Unmarked tests in tests/ need nothing but Python and the package. Every other tier lives in its
own folder whose conftest marks and gates it (tests/tiers.py has the table and the one function
that skips, or fails under KDUMPLING_REQUIRE_ALL=1, when a tier's requirement is missing).
"""

from __future__ import annotations

import os
import sys

# Debian's python3-libkdumpfile installs its module here; it loads in any CPython 3.11.
DEBIAN_DIST_PACKAGES = "/usr/lib/python3/dist-packages"
if os.path.isdir(DEBIAN_DIST_PACKAGES) and DEBIAN_DIST_PACKAGES not in sys.path:
    sys.path.append(DEBIAN_DIST_PACKAGES)
