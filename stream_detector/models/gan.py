"""Adversarially trained autoencoder in the spirit of TadGAN (Geiger et al., 2020).

- encoder ``E``: LSTM, window -> latent ``z``;
- generator ``G``: the LSTM autoencoder's newest-first decoder, ``z`` -> window;
- critic ``C_x``: 1-D convolutions over the window -> a realness score (Wasserstein critic);
- critic ``C_z``: a small MLP on latents, pushing ``E(x)`` towards the standard normal prior.

Training alternates, on every batch, one critic step (WGAN-GP: Wasserstein losses plus gradient
penalties; ``C_x`` sees real windows against ``G(z ~ N(0, I))``, ``C_z`` prior draws against
``E(x)``) and one encoder/generator step (fool both critics, plus ``rec_weight`` x the denoising
reconstruction loss; TadGAN's cycle-consistency term). The critic is convolutional rather than
recurrent so the gradient penalty's double backward works on every device.

Score: ``(1 - critic_weight) x reconstruction + critic_weight x max(0, critic z-score)``. The
reconstruction part is the newest ``score_steps`` events' squared error, each feature in units of
its typical training error (mean 1 on normal data, as for the other autoencoders). The critic part
is how far below its typical value on normal training windows ``C_x`` rates the window, in
standard deviations (``critic_mean``/``critic_std``, fitted by :meth:`calibrate`), floored at 0.
Per-feature contributions (alerts) come from the reconstruction part only; the critic judges the
window as a whole and has no per-feature attribution.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .base import GRAD_CLIP, AnomalyModel, newest_steps_error, register


@register
class GANAutoencoder(AnomalyModel):
    kind = "gan_ae"

    def __init__(self, n_features: int, window: int, hidden: int = 64, latent: int = 16, score_steps: int = 1,
                 critic_hidden: int = 32, critic_weight: float = 0.3, rec_weight: float = 10.0,
                 gp_weight: float = 10.0):
        super().__init__(n_features, window)
        if not 1 <= score_steps <= window:
            raise ValueError("score_steps must be within 1..window")
        if not 0.0 <= critic_weight <= 1.0:
            raise ValueError("critic_weight must be within 0..1")
        self.hidden, self.latent, self.score_steps = hidden, latent, score_steps
        self.critic_hidden, self.critic_weight = critic_hidden, float(critic_weight)
        self.rec_weight, self.gp_weight = float(rec_weight), float(gp_weight)
        self.encoder = nn.LSTM(n_features, hidden, batch_first=True)
        self.to_latent = nn.Linear(hidden, latent)
        self.from_latent = nn.Linear(latent, hidden)
        self.init_state = nn.Linear(latent, 2 * hidden)
        self.generator = nn.LSTM(hidden, hidden, batch_first=True)
        self.output = nn.Linear(hidden, n_features)
        self.critic_x = nn.Sequential(
            nn.Conv1d(n_features, critic_hidden, 5, padding=2), nn.LeakyReLU(0.2),
            nn.Conv1d(critic_hidden, critic_hidden, 5, stride=2, padding=2), nn.LeakyReLU(0.2),
            nn.AdaptiveAvgPool1d(1), nn.Flatten(), nn.Linear(critic_hidden, 1),
        )
        self.critic_z = nn.Sequential(
            nn.Linear(latent, critic_hidden), nn.LeakyReLU(0.2), nn.Linear(critic_hidden, critic_hidden),
            nn.LeakyReLU(0.2), nn.Linear(critic_hidden, 1),
        )
        self.register_buffer("critic_mean", torch.zeros(()))
        self.register_buffer("critic_std", torch.ones(()))

    def config(self) -> dict[str, Any]:
        return {"n_features": self.n_features, "window": self.window, "hidden": self.hidden, "latent": self.latent,
                "score_steps": self.score_steps, "critic_hidden": self.critic_hidden,
                "critic_weight": self.critic_weight, "rec_weight": self.rec_weight, "gp_weight": self.gp_weight}

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        _, (h, _) = self.encoder(x)
        return self.to_latent(h[-1])

    def generate(self, z: torch.Tensor) -> torch.Tensor:
        steps = self.from_latent(z).unsqueeze(1).expand(-1, self.window, -1)
        h0, c0 = torch.tanh(self.init_state(z)).unsqueeze(0).chunk(2, dim=-1)
        decoded, _ = self.generator(steps, (h0.contiguous(), c0.contiguous()))
        return self.output(decoded).flip(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.generate(self.encode(x))

    def critic(self, x: torch.Tensor) -> torch.Tensor:
        return self.critic_x(x.transpose(1, 2)).squeeze(1)

    def training_loss(self, x: torch.Tensor, target: torch.Tensor | None = None) -> torch.Tensor:
        """The reconstruction part alone (validation and early stopping watch it)."""
        target = x if target is None else target
        return torch.mean((self(x) - target) ** 2)

    def raw_feature_errors(self, x: torch.Tensor) -> torch.Tensor:
        return newest_steps_error(self(x), x, self.score_steps)

    def anomaly_scores(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        per_feature = self.raw_feature_errors(x) / self.error_scale
        critic = ((self.critic_mean - self.critic(x)) / self.critic_std).clamp_min(0.0)
        score = (1.0 - self.critic_weight) * per_feature.mean(dim=1) + self.critic_weight * critic
        return score, per_feature

    # --- adversarial training ---

    def _generator_parameters(self) -> list[nn.Parameter]:
        parts = (self.encoder, self.to_latent, self.from_latent, self.init_state, self.generator, self.output)
        return [p for part in parts for p in part.parameters()]

    def _critic_parameters(self) -> list[nn.Parameter]:
        return list(self.critic_x.parameters()) + list(self.critic_z.parameters())

    def configure_optimizers(self, learning_rate: float) -> list[torch.optim.Optimizer]:
        return [torch.optim.Adam(self._generator_parameters(), lr=learning_rate, betas=(0.5, 0.9)),
                torch.optim.Adam(self._critic_parameters(), lr=learning_rate, betas=(0.5, 0.9))]

    @staticmethod
    def _gradient_penalty(critic, real: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
        shape = (real.shape[0],) + (1,) * (real.dim() - 1)
        alpha = torch.rand(shape, device=real.device)
        mixed = (alpha * real + (1 - alpha) * fake).requires_grad_(True)
        (grad,) = torch.autograd.grad(critic(mixed).sum(), mixed, create_graph=True)
        return ((grad.flatten(1).norm(dim=1) - 1.0) ** 2).mean()

    def training_step(self, x: torch.Tensor, target: torch.Tensor, labels: torch.Tensor | None,
                      optimizers: list[torch.optim.Optimizer]) -> dict[str, float]:
        gen_opt, critic_opt = optimizers
        batch = x.shape[0]
        # 1. critics
        with torch.no_grad():
            prior = torch.randn(batch, self.latent, device=x.device)
            fake_x = self.generate(prior)
            fake_z = self.encode(x)
        critic_x = lambda w: self.critic(w)  # noqa: E731
        loss_cx = self.critic(fake_x).mean() - self.critic(target).mean() \
            + self.gp_weight * self._gradient_penalty(critic_x, target, fake_x)
        loss_cz = self.critic_z(fake_z).mean() - self.critic_z(prior).mean() \
            + self.gp_weight * self._gradient_penalty(self.critic_z, prior, fake_z)
        critic_opt.zero_grad(set_to_none=True)
        (loss_cx + loss_cz).backward()
        torch.nn.utils.clip_grad_norm_(self._critic_parameters(), GRAD_CLIP)
        critic_opt.step()
        # 2. encoder and generator
        prior = torch.randn(batch, self.latent, device=x.device)
        z = self.encode(x)
        rec = torch.mean((self.generate(z) - target) ** 2)
        adv = -self.critic(self.generate(prior)).mean() - self.critic_z(z).mean()
        loss = self.rec_weight * rec + adv
        gen_opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self._generator_parameters(), GRAD_CLIP)
        gen_opt.step()
        return {"loss": float(rec.detach()), "critic_x": float(loss_cx.detach()), "critic_z": float(loss_cz.detach())}

    @torch.no_grad()
    def calibrate(self, batches) -> dict[str, Any]:
        errors, critics = [], []
        for x in batches:
            errors.append(self.raw_feature_errors(x))
            critics.append(self.critic(x))
        self.error_scale.copy_(torch.cat(errors).mean(dim=0).clamp_min(1e-6))
        c = torch.cat(critics)
        self.critic_mean.copy_(c.mean())
        self.critic_std.copy_(c.std().clamp_min(1e-6) if c.numel() > 1 else torch.ones(()))
        return {"error_scale": [round(float(v), 6) for v in self.error_scale],
                "critic_mean": float(self.critic_mean), "critic_std": float(self.critic_std)}
