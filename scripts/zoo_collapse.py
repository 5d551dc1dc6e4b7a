#!/usr/bin/env python
"""Does geometric complexity / neural collapse predict few-shot transfer? A zoo on digits.
The study is ``bench.diagnostics.studies.zoo_collapse``; ``--help`` describes it and lists its options.

    python scripts/zoo_collapse.py                 # 12 models, a few minutes on 2 cores
    python scripts/zoo_collapse.py --epochs 10 --out runs/zoo
"""

from bench.diagnostics.studies.zoo_collapse import main

if __name__ == "__main__":
    main()
