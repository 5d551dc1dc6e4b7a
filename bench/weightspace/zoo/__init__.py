"""Zoos: the small networks and their architectures (``networks``, ``architectures``), and the
heads that ``bench run ... save_heads=true`` saves (``heads``); ``bench zoo`` builds and shows them."""
