"""LSTM variational autoencoder, scored by reconstruction probability.

Encoder LSTM -> a Gaussian posterior q(z | window); decoder LSTM (the LSTM autoencoder's
newest-first decoder) -> a Gaussian p(x | z) per event and feature, with its own mean and
standard deviation. Trained on the evidence lower bound (Gaussian negative log-likelihood of the
clean window + ``beta`` x KL to the standard normal prior).

Score (An & Cho's reconstruction probability, as a negative log-likelihood): for the newest
``score_steps`` events, the negative log-likelihood of each feature under the decoder's Gaussian,
averaged over ``samples`` latent draws ``z = mu + sigma * eps``. The ``eps`` are a fixed set of
standard normal draws made from a fixed seed when the model is built (the first one is 0, the
posterior mean), so inference is deterministic; ``samples=1`` scores at the posterior mean only.
The likelihood needs no ``error_scale``: the decoder's sigma already puts each feature's error in
its own units. To keep scores non-negative (thresholds and alert severities are ratios), the NLL is
shifted by its lowest possible value: per feature ``log(sigma / sigma_min) + ((x - mu) / sigma)^2 / 2``
(sigma >= ``sigma_min``), i.e. the Gaussian NLL minus a constant, which changes no ranking. The
per-feature contributions in an alert are those shifted NLLs.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .base import AnomalyModel, register


@register
class LSTMVAE(AnomalyModel):
    kind = "lstm_vae"

    def __init__(self, n_features: int, window: int, hidden: int = 64, latent: int = 16, score_steps: int = 1,
                 samples: int = 4, beta: float = 0.5, sigma_min: float = 0.05):
        super().__init__(n_features, window)
        if not 1 <= score_steps <= window:
            raise ValueError("score_steps must be within 1..window")
        if samples < 1:
            raise ValueError("samples must be at least 1")
        self.hidden, self.latent, self.score_steps = hidden, latent, score_steps
        self.samples, self.beta, self.sigma_min = int(samples), float(beta), float(sigma_min)
        self.encoder = nn.LSTM(n_features, hidden, batch_first=True)
        self.to_posterior = nn.Linear(hidden, 2 * latent)
        self.from_latent = nn.Linear(latent, hidden)
        self.init_state = nn.Linear(latent, 2 * hidden)
        self.decoder = nn.LSTM(hidden, hidden, batch_first=True)
        self.output = nn.Linear(hidden, 2 * n_features)
        eps = torch.randn(self.samples, latent, generator=torch.Generator().manual_seed(20240611))
        eps[0] = 0.0
        self.register_buffer("score_eps", eps, persistent=False)  # rebuilt identically from the config

    def config(self) -> dict[str, Any]:
        return {"n_features": self.n_features, "window": self.window, "hidden": self.hidden, "latent": self.latent,
                "score_steps": self.score_steps, "samples": self.samples, "beta": self.beta,
                "sigma_min": self.sigma_min}

    def posterior(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        _, (h, _) = self.encoder(x)
        mu, log_var = self.to_posterior(h[-1]).chunk(2, dim=-1)
        return mu, log_var.clamp(-12.0, 6.0)

    def decode(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and standard deviation of p(x | z), oldest-first, each (B, W, F)."""
        steps = self.from_latent(z).unsqueeze(1).expand(-1, self.window, -1)
        h0, c0 = torch.tanh(self.init_state(z)).unsqueeze(0).chunk(2, dim=-1)
        decoded, _ = self.decoder(steps, (h0.contiguous(), c0.contiguous()))
        mean, raw_sigma = self.output(decoded).flip(1).chunk(2, dim=-1)
        return mean, self.sigma_min + F.softplus(raw_sigma)

    def _shifted_nll(self, x: torch.Tensor, mean: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        return torch.log(sigma / self.sigma_min) + 0.5 * ((x - mean) / sigma) ** 2

    def training_loss(self, x: torch.Tensor, target: torch.Tensor | None = None) -> torch.Tensor:
        """Negative ELBO per value: Gaussian NLL of the clean window + beta x KL (per value)."""
        target = x if target is None else target
        mu, log_var = self.posterior(x)
        z = mu + torch.randn_like(mu) * torch.exp(0.5 * log_var) if self.training else mu
        mean, sigma = self.decode(z)
        nll = self._shifted_nll(target, mean, sigma).mean()
        kl = -0.5 * torch.mean(torch.sum(1 + log_var - mu ** 2 - log_var.exp(), dim=1))
        return nll + self.beta * kl / (self.window * self.n_features)

    def raw_feature_errors(self, x: torch.Tensor) -> torch.Tensor:
        """Shifted NLL per feature (B, F) of the newest ``score_steps`` events, averaged over latent draws."""
        mu, log_var = self.posterior(x)
        std = torch.exp(0.5 * log_var)
        batch, k = x.shape[0], self.score_steps
        z = (mu.unsqueeze(0) + std.unsqueeze(0) * self.score_eps.unsqueeze(1)).reshape(-1, self.latent)
        mean, sigma = self.decode(z)
        target = x[:, -k:, :].unsqueeze(0).expand(self.samples, -1, -1, -1).reshape(-1, k, self.n_features)
        nll = self._shifted_nll(target, mean[:, -k:, :], sigma[:, -k:, :]).mean(dim=1)
        return nll.view(self.samples, batch, self.n_features).mean(dim=0)

    def anomaly_scores(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        per_feature = self.raw_feature_errors(x)
        return per_feature.mean(dim=1), per_feature

    @torch.no_grad()
    def calibrate(self, batches) -> dict[str, Any]:
        """Nothing to fit: the likelihood is already in each feature's own units."""
        return {}
