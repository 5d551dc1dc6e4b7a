#!/usr/bin/env python
"""The head generator (D2NWG) side by side with imprinting, retrieval and the trained head, on
its checkpoint's meta-test classes. The evaluation is ``bench.weightspace.generator.evaluation``;
``--help`` lists its options.

    python scripts/generator_eval.py --ckpt runs/generator/d2nwg                 # 100 tasks per shot count
    python scripts/generator_eval.py --ckpt runs/generator/d2nwg --tasks 10 --out runs/generator_eval/quick
"""

from __future__ import annotations

import sys

from bench.errors import BenchError
from bench.weightspace.generator.evaluation import main

if __name__ == "__main__":
    try:
        main()
    except BenchError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
