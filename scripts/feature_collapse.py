#!/usr/bin/env python
"""Feature collapse of local features on the synthetic setting of Laurent et al. (2023).
The study is ``bench.diagnostics.studies.feature_collapse``; ``--help`` describes it and lists its options.

    python scripts/feature_collapse.py            # about 20 seconds on 2 cores
"""

from bench.diagnostics.studies.feature_collapse import main

if __name__ == "__main__":
    main()
