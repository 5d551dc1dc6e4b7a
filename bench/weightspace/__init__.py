"""Weight space: zoos of trained networks and heads, a set-based weight encoder (SNE) that
predicts accuracy from weights, and a support-conditioned diffusion generator of heads (D2NWG)."""
