"""An analytic test policy: the exact velocity field of a Gaussian target, in closed form.

Target (per prompt): x0 ~ N(m, diag(s^2)) with m = mu + shift(prompt), s = exp(log_s). Under
x_sigma = (1 - sigma) x0 + sigma eps every marginal is Gaussian, N((1 - sigma) m,
(1 - sigma)^2 s^2 + sigma^2), and the flow-matching velocity E[eps - x0 | x_sigma] is
v = (sigma - (1 - sigma) s^2) (x - (1 - sigma) m) / var - m. ``mu`` and ``log_s`` are
trainable, so the same model exercises the losses and the optimizer.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from .base import Cond

if TYPE_CHECKING:
    from .factory import ModelOptions


class GaussianPolicy(nn.Module):
    """Closed-form flow policy over latents [D]; ``velocity`` is elementwise per row, so its
    output does not depend on how rows are batched."""

    def __init__(self, dim: int = 2, mean: float = 0.0, std: float = 1.0,
                 prompt_scale: float = 0.0) -> None:
        super().__init__()
        self.latent_shape = (dim,)
        self.mu = nn.Parameter(torch.full((dim,), float(mean)))
        self.log_s = nn.Parameter(torch.full((dim,), float(std)).log())
        self.prompt_scale = prompt_scale

    def encode(self, prompts: Sequence[str]) -> Cond:
        """A fixed per-prompt shift [B, D] (hash-seeded, scaled by ``prompt_scale``)."""
        rows = []
        for p in prompts:
            seed = int(hashlib.sha256(p.encode()).hexdigest()[:8], 16)
            g = torch.Generator().manual_seed(seed)
            rows.append(torch.randn(self.latent_shape, generator=g) * self.prompt_scale)
        return {"shift": torch.stack(rows).to(self.mu.device)}

    def velocity(self, x: Tensor, sigma: Tensor, cond: Cond) -> Tensor:
        """Exact v [N, D] at x [N, D], sigma [N]."""
        m = self.mu + cond["shift"]
        s2 = torch.exp(2 * self.log_s)
        sig = sigma.float().reshape(-1, 1)
        var = (1 - sig) ** 2 * s2 + sig**2
        return (sig - (1 - sig) * s2) * (x.float() - (1 - sig) * m) / var - m

    def decode(self, x0: Tensor) -> Tensor:
        """The latent itself is the "media" [N, D]."""
        return x0.float()

    def trainable_parameters(self) -> Iterable[nn.Parameter]:
        return self.parameters()


def build(o: ModelOptions, device: torch.device) -> GaussianPolicy:
    """The registry's builder: the standard-normal target in 2 dimensions on ``device`` (the
    options carry nothing this family reads)."""
    return GaussianPolicy().to(device)
