#!/bin/bash
# Extraction on one machine with torchrun (Lightning detects torchelastic and uses its ranks).
# For several machines add --nnodes, --node_rank and --rdzv_endpoint, and trainer.num_nodes.
#
#   bash scripts/torchrun_extract.sh 4 -c configs/quickstart.yaml
set -euo pipefail
NPROC=${1:?usage: torchrun_extract.sh NPROC [bench args ...]}
shift
torchrun --standalone --nproc_per_node="$NPROC" -m bench.cli extract \
  trainer.devices="$NPROC" trainer.strategy=ddp "$@"
