#!/usr/bin/env python
"""Extraction throughput: the model alone against the full pipeline, and peak memory.
The benchmark is ``bench.benchmarks.extraction``; ``--help`` describes it and lists its options.

    python scripts/bench_extract.py                                   # CPU: resnet18 at 112 px
    python scripts/bench_extract.py --arch resnet50 --size 224 --precision bf16-mixed --channels-last
    python scripts/bench_extract.py --arch vit_b_16 --size 224 --precision bf16-mixed
    python scripts/bench_extract.py --memory                          # peak RSS at N and 10 N images
    python scripts/bench_extract.py --hashing                         # content hashing against decoding
"""

from bench.benchmarks.extraction import main

if __name__ == "__main__":
    main()
