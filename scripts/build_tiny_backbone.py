#!/usr/bin/env python
"""Rebuild the embedded default backbone, bench/assets/tiny_digits.safetensors.
The code is ``bench.backbones.tiny_build``; ``--help`` describes it and lists its options.

    python scripts/build_tiny_backbone.py                 # overwrite the shipped asset
    python scripts/build_tiny_backbone.py --out /tmp/t.safetensors
"""

from bench.backbones.tiny_build import main

if __name__ == "__main__":
    main()
