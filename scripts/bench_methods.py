#!/usr/bin/env python
"""Method benchmark: the library against a plain reference written the way published code is.
The benchmark is ``bench.benchmarks.methods``; ``--help`` describes it and lists its options.

    python scripts/bench_methods.py                      # both built-in datasets (below)
    python scripts/bench_methods.py --data gmm           # 512-d Gaussian mixture, 10 classes x 500
    python scripts/bench_methods.py --data digits        # 64-d digits pixels, 10 classes x ~120
    python scripts/bench_methods.py --cache PATH --test-cache PATH   # embeddings from cache entries
    python scripts/bench_methods.py --seeds 2 --shots 1 5 all --out quick.json
"""

import sys

from bench.benchmarks.methods import main
from bench.errors import BenchError

if __name__ == "__main__":
    try:
        main()
    except BenchError as err:  # a bad option or dataset: the message, not a traceback
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
