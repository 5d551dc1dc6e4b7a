#!/usr/bin/env python
"""Make a head zoo offline: heads saved by `bench run ... save_heads=true` on digits.
The code is ``bench.weightspace.zoo.build_heads``; ``--help`` describes it and lists its options.

    python scripts/build_head_zoo.py                      # runs/headzoo/runs/<backbone>/...
    python scripts/build_head_zoo.py --out runs/headzoo --backbones 3 --seeds 0 1 2
"""

from bench.weightspace.zoo.build_heads import main

if __name__ == "__main__":
    main()
