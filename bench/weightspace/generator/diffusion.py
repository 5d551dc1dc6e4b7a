"""The networks of the head generator (D2NWG, Soro et al. 2024), sized for heads.

- :class:`RowVAE`: each head row [w_c, b_c] to a latent vector and back. Rows are encoded one
  at a time with shared weights, so the VAE serves any number of classes.
- :class:`SupportEncoder`: a class's support set to one vector: the mean of embedded samples
  as a pooling token, refined by set-transformer layers over the samples (masked attention),
  so the encoding does not depend on the order of samples.
- :class:`LatentDenoiser`: predicts the noise in each class's latent from (noisy latent,
  timestep, support encoding), with attention across the task's classes and no positional
  encoding, so permuting the classes permutes the output.
- :func:`sample_latents`: the reverse process with a ``diffusers`` scheduler (DDPM or DDIM),
  one random stream per class, so a class's noise follows the class, not its position.

Noise schedules and samplers come from ``diffusers``; nothing here hand-writes a schedule.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class AttentionBlock(nn.Module):
    """Pre-norm self-attention + MLP over a set (no positions), with a key mask."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width)
        self.out = nn.Linear(width, width)
        self.mlp = nn.Sequential(nn.Linear(width, 2 * width), nn.SiLU(), nn.Linear(2 * width, width))

    def forward(self, h: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        """h (B, N, W); keep (B, N) bool: which elements other elements may attend to."""
        b, n, w = h.shape
        q, k, v = self.qkv(self.norm1(h)).view(b, n, 3, self.heads, w // self.heads).permute(2, 0, 3, 1, 4)
        att = F.scaled_dot_product_attention(q, k, v, attn_mask=keep[:, None, None, :])
        h = h + self.out(att.transpose(1, 2).reshape(b, n, w))
        return h + self.mlp(self.norm2(h))


def _mlp(inp: int, hidden: int, out: int, depth: int) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Linear(inp, hidden), nn.SiLU()]
    for _ in range(depth - 1):
        layers += [nn.Linear(hidden, hidden), nn.SiLU()]
    layers.append(nn.Linear(hidden, out))
    return nn.Sequential(*layers)


class RowVAE(nn.Module):
    """A VAE over standardised head rows (dim D + 1) with a ``latent`` -dim Gaussian latent."""

    def __init__(self, row_dim: int, latent: int, hidden: int = 256, depth: int = 2) -> None:
        super().__init__()
        self.encoder = _mlp(row_dim, hidden, 2 * latent, depth)
        self.decoder = _mlp(latent, hidden, row_dim, depth)
        # Standardisation of rows, set from the training rows before fitting.
        self.register_buffer("row_mean", torch.zeros(row_dim))
        self.register_buffer("row_std", torch.ones(row_dim))

    def encode(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mu, logvar = self.encoder((rows - self.row_mean) / self.row_std).chunk(2, -1)
        return mu, logvar.clamp(-12, 6)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.decoder(z) * self.row_std + self.row_mean


class SupportEncoder(nn.Module):
    """Support set (B, S, D) with mask (B, S) -> (B, W): mean token + set-transformer layers."""

    def __init__(self, dim: int, width: int, heads: int, layers: int) -> None:
        super().__init__()
        self.embed = nn.Sequential(nn.Linear(dim, width), nn.SiLU(), nn.Linear(width, width))
        self.mean_skip = nn.Linear(dim, width)  # the class mean itself, the statistic imprinting uses
        self.pool = nn.Parameter(torch.zeros(width))
        self.count = nn.Linear(1, width)  # how many shots: a 1-shot mean is less certain than a 20-shot one
        self.blocks = nn.ModuleList(AttentionBlock(width, heads) for _ in range(layers))
        self.norm = nn.LayerNorm(width)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        w = mask.to(x.dtype)
        n = w.sum(1, keepdim=True).clamp(min=1)
        mean_x = (w[:, None, :] @ x)[:, 0] / n
        h = self.embed(x)
        token = (w[:, None, :] @ h)[:, 0] / n + self.pool + self.count(torch.log(n))
        tokens = torch.cat([token[:, None], h], 1)
        keep = torch.cat([torch.ones_like(mask[:, :1]), mask], 1)
        for block in self.blocks:
            tokens = block(tokens, keep)
        return self.norm(tokens[:, 0]) + self.mean_skip(mean_x)


class LatentDenoiser(nn.Module):
    """Denoiser of a task's class latents (its output is what the schedule's prediction type
    says: noise, clean latent or velocity), conditioned per class and across classes."""

    def __init__(self, dim: int, latent: int, width: int = 128, heads: int = 4, set_layers: int = 2,
                 class_layers: int = 3, set_width: int = 64) -> None:
        super().__init__()
        self.width = width
        # The support encoder reads every sample, so it is the costly part: it gets its own width.
        self.support = SupportEncoder(dim, set_width, heads, set_layers)
        self.z_in = nn.Linear(latent, width)
        self.cond_in = nn.Linear(set_width, width)
        self.t_mlp = nn.Sequential(nn.Linear(width, width), nn.SiLU(), nn.Linear(width, width))
        self.blocks = nn.ModuleList(AttentionBlock(width, heads) for _ in range(class_layers))
        self.norm = nn.LayerNorm(width)
        self.z_out = nn.Linear(width, latent)
        nn.init.zeros_(self.z_out.weight)  # start by predicting zero noise: a stable beginning
        nn.init.zeros_(self.z_out.bias)

    def encode_support(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """(B, C, S, D), (B, C, S) -> (B, C, W); computed once per task, reused at every step."""
        b, c, s, d = x.shape
        return self.support(x.reshape(b * c, s, d), mask.reshape(b * c, s)).view(b, c, -1)

    def time_embedding(self, t: torch.Tensor) -> torch.Tensor:
        from diffusers.models.embeddings import get_timestep_embedding

        return self.t_mlp(get_timestep_embedding(t, self.width, flip_sin_to_cos=True, downscale_freq_shift=0))

    def forward(self, z: torch.Tensor, t: torch.Tensor, cond: torch.Tensor, class_mask: torch.Tensor) -> torch.Tensor:
        """z (B, C, L) noisy latents, t (B,) timesteps, cond (B, C, W), class_mask (B, C)."""
        h = self.z_in(z) + self.cond_in(cond) + self.time_embedding(t.reshape(-1).expand(len(z)))[:, None]
        for block in self.blocks:
            h = block(h, class_mask)
        return self.z_out(self.norm(h))


def build_scheduler(kind: str, config: dict):
    """A ``diffusers`` scheduler ('ddpm' or 'ddim') from the training schedule's config."""
    from diffusers import DDIMScheduler, DDPMScheduler

    if kind == "ddpm":
        return DDPMScheduler.from_config(config)
    if kind == "ddim":
        return DDIMScheduler.from_config(config)
    from bench.errors import BenchError

    raise BenchError(f"sampler '{kind}' is not one of ddpm, ddim")


PREDICTIONS = ("epsilon", "sample", "v_prediction")


def training_schedule(timesteps: int = 1000, prediction: str = "epsilon"):
    """The forward process used in training: cosine betas; the denoiser predicts the noise
    (``epsilon``), the clean latent (``sample``) or the velocity (``v_prediction``)."""
    from diffusers import DDPMScheduler

    if prediction not in PREDICTIONS:
        from bench.errors import BenchError

        raise BenchError(f"prediction '{prediction}' is not one of {', '.join(PREDICTIONS)}")
    return DDPMScheduler(num_train_timesteps=timesteps, beta_schedule="squaredcos_cap_v2",
                         prediction_type=prediction, clip_sample=False)


@torch.no_grad()
def sample_latents(
    denoiser: LatentDenoiser,
    cond: torch.Tensor,
    generators: list[torch.Generator],
    *,
    samples: int,
    latent: int,
    scheduler,
    steps: int,
) -> torch.Tensor:
    """Reverse diffusion for one task: cond (C, W) -> latents (C, samples, L).

    Class c's starting noise and every noise draw of its reverse steps come from
    ``generators[c]``, so reordering classes (with their generators) reorders the result.
    """
    from diffusers.utils.torch_utils import randn_tensor

    c = len(cond)
    device = cond.device
    z = randn_tensor((c, samples, latent), generator=generators, device=device, dtype=cond.dtype)
    z = z * scheduler.init_noise_sigma
    scheduler.set_timesteps(steps, device=device)
    cond_s = cond[None].expand(samples, -1, -1)  # the samples are S independent copies of the task
    keep = torch.ones(samples, c, dtype=torch.bool, device=device)
    for t in scheduler.timesteps:
        inp = scheduler.scale_model_input(z, t).transpose(0, 1)  # (S, C, L)
        eps = denoiser(inp, t.reshape(1).to(device), cond_s, keep).transpose(0, 1)
        z = scheduler.step(eps, t, z, generator=generators).prev_sample
    return z


def head_log_likelihood(rows: torch.Tensor, x: torch.Tensor, y: torch.Tensor,
                        temperatures: tuple[float, ...] = tuple(2.0 ** (a / 2) for a in range(-6, 15)),
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """Support-set log-likelihood of candidate heads, each at its best temperature.

    rows (S, C, D+1) candidate heads on a common scale, x (n, D) support, y (n,) class
    positions. Heads are generated up to scale, so each is scored at the temperature (from a
    fixed grid) that suits it best: a choice among S candidates, with no gradient step.
    Returns the log-likelihoods (S,) and those temperatures (S,).
    """
    logits = torch.einsum("nd,scd->snc", x, rows[..., :-1]) + rows[:, None, :, -1]
    temps = torch.tensor(temperatures, dtype=logits.dtype, device=logits.device)
    logp = (logits[None] * temps[:, None, None, None]).log_softmax(-1)  # (T, S, n, C)
    ll = logp.gather(-1, y.view(1, 1, -1, 1).expand(len(temps), len(rows), -1, 1))[..., 0].sum(-1)
    best, which = ll.max(0)
    return best, temps[which]
