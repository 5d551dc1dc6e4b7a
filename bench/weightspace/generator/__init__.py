"""The support-conditioned head generator (D2NWG): meta-tasks and their trained target heads,
the row VAE and latent denoiser (``diffusion``), the checkpoint (``model``), the Lightning fit
(``training``), the ``d2nwg`` GEN and the evaluation; ``bench generator`` fits and shows it."""
