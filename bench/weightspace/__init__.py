"""Weight space, in three parts that read and write trained weights:

- ``zoo``: zoos of small networks trained on digits, and of the heads that ``bench run`` saves;
- ``encoder``: the set-based weight encoder (SNE) that predicts accuracy from weights, its
  baselines (StatNN, a flattened-weights MLP), scoring and evaluation;
- ``generator``: the support-conditioned diffusion generator of heads (D2NWG), its meta-tasks,
  training, the ``d2nwg`` GEN and evaluation.
"""
