#!/usr/bin/env python
"""The product's imprint stage against the grid engine called directly, on the same cached
embeddings and episodes.
The benchmark is ``bench.benchmarks.imprint_stage``; ``--help`` describes it and lists its options.

    python scripts/bench_imprint_stage.py                       # both workloads
    python scripts/bench_imprint_stage.py --workload synthetic --repeats 3
"""

from bench.benchmarks.imprint_stage import main

if __name__ == "__main__":
    main()
