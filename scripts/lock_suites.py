"""Record the shipped task suites' versions and content hashes in tasks/SUITES.lock (after
bumping the version of a suite you changed); ``--check`` only reports what disagrees.

    python scripts/lock_suites.py [--check]
"""

import sys

from bench.data.suite_lock import main

if __name__ == "__main__":
    sys.exit(main())
