"""Learned input defenses: a denoising autoencoder, the high-level-representation guided denoiser,
and projection onto a generator's range (Defense-GAN's principle with a VAE decoder).

* ``dae`` — a convolutional denoising autoencoder (Vincent et al., ICML 2008; as a defense, Gu &
  Rigazio, ICLR workshop 2015 and MagNet, Meng & Chen, CCS 2017) trained to map noisy (and,
  optionally, adversarial) inputs to clean ones with a pixel loss.
* ``hgd`` — the high-level-representation guided denoiser (Liao et al., "Defense against
  Adversarial Attacks Using High-Level Representation Guided Denoiser", CVPR 2018): the denoiser
  predicts the adversarial noise (``x_hat = x - D(x)``) and is trained so that the *model's*
  outputs on ``x_hat`` match those on the clean image (``|f(x_hat) - f(x)|_1``; logits by default:
  the paper's LGD variant, or a named layer's features: FGD).
* ``defensegan`` — Samangouei, Kabkab & Chellappa, "Defense-GAN: Protecting Classifiers Against
  Adversarial Attacks Using Generative Models", ICLR 2018: a generator ``G`` trained on clean
  images (here the decoder of a small VAE, Kingma & Welling 2014, which trains reliably on a CPU)
  and each input replaced by ``G(z*)``, ``z*`` minimizing ``|G(z) - x|^2`` by gradient descent from
  ``restarts`` random starts (``steps`` steps each). The projection is an inner optimization: a
  naive attack gets no gradient through it; BPDA uses the identity. Randomized (the restarts).

All three work on the ``[0, 1]`` view of the bounds; their weights are saved in the model folder
(``defense.safetensors``).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from medrobust.defenses.base import Bounds, Defense, DefenseError, from_unit, to_unit


def _conv(rank: int) -> tuple[type[nn.Module], type[nn.Module]]:
    if rank == 2:
        return nn.Conv2d, nn.ConvTranspose2d
    if rank == 3:
        return nn.Conv3d, nn.ConvTranspose3d
    raise DefenseError(f"spatial_dims must be 2 or 3; got {rank!r}")


class _DenoiserNet(nn.Module):
    """Conv encoder (a stride-2 stage) and decoder with a skip connection; the last layer starts
    small, so that the residual denoisers start close to the identity."""

    def __init__(self, channels: int, width: int, rank: int) -> None:
        super().__init__()
        conv, up = _conv(rank)
        w = width
        self.enc1 = nn.Sequential(conv(channels, w, 3, padding=1), nn.ReLU(),
                                  conv(w, w, 3, padding=1), nn.ReLU())
        self.enc2 = nn.Sequential(conv(w, 2 * w, 3, stride=2, padding=1), nn.ReLU(),
                                  conv(2 * w, 2 * w, 3, padding=1), nn.ReLU())
        self.up = up(2 * w, w, 2, stride=2)
        self.dec = nn.Sequential(conv(2 * w, w, 3, padding=1), nn.ReLU(),
                                 conv(w, channels, 3, padding=1))
        # a residual denoiser starts close to the identity (a small last layer)
        last = self.dec[-1]
        assert isinstance(last, nn.modules.conv._ConvNd) and last.bias is not None
        with torch.no_grad():
            last.weight.mul_(0.1)
            last.bias.zero_()

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        a = self.enc1(u)
        b = self.up(self.enc2(a))
        b = b[(..., *[slice(0, s) for s in a.shape[2:]])]
        return self.dec(torch.cat([a, b], 1))


class _LearnedDefense(Defense):
    def __init__(self, channels: int, width: int, spatial_dims: int,
                 seed: int | None = None) -> None:
        super().__init__(seed)
        for name, v in (("channels", channels), ("width", width)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise DefenseError(f"{self.name}: {name} must be a positive integer; got {v!r}")
        self.channels, self.width, self.spatial_dims = channels, width, spatial_dims
        self.options = {"channels": channels, "width": width, "spatial_dims": spatial_dims}

    def _check(self, x: torch.Tensor) -> None:
        if x.dim() != self.spatial_dims + 2 or x.shape[1] != self.channels:
            raise DefenseError(
                f"{self.name}: built for {self.channels}-channel {self.spatial_dims}D inputs; "
                f"got shape {tuple(x.shape)}"
            )


class DenoisingAutoencoder(_LearnedDefense):
    """A convolutional denoising autoencoder on the ``[0, 1]`` view (see the module docstring).
    Differentiable: autograd gives the attack its gradient. Train it with :meth:`fit`."""

    name = "dae"

    def __init__(self, channels: int = 1, width: int = 16, spatial_dims: int = 2) -> None:
        super().__init__(channels, width, spatial_dims)
        self.net = _DenoiserNet(channels, width, spatial_dims)

    def transform(self, x: torch.Tensor, bounds: Bounds) -> torch.Tensor:
        self._check(x)
        u = to_unit(x, bounds)
        return from_unit(torch.sigmoid(self.net(u) + _logit(u)), bounds)

    def fit(self, images: torch.Tensor, bounds: Bounds = (0.0, 1.0), *, sigma: float = 0.1,
            adversarial: torch.Tensor | None = None, epochs: int = 5, batch_size: int = 64,
            lr: float = 3e-3, seed: int = 0) -> list[float]:
        """Train on ``images`` (clean, in the model's units) corrupted by Gaussian noise of
        ``sigma`` (on the [0, 1] view), plus pairs ``(adversarial[i], images[i])`` when given.
        Returns the mean loss per epoch."""
        clean_u = to_unit(images.float(), bounds)
        adv_u = None if adversarial is None else to_unit(adversarial.float(), bounds)
        g = torch.Generator().manual_seed(int(seed))

        def batch(idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            c = clean_u[idx]
            noisy = (c + sigma * torch.randn(c.shape, generator=g)).clamp(0, 1)
            if adv_u is not None:
                pick = torch.rand(len(idx), generator=g) < 0.5
                noisy = torch.where(pick.view(-1, *[1] * (c.dim() - 1)), adv_u[idx], noisy)
            return noisy, c

        def loss_fn(noisy: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
            return F.mse_loss(to_unit(self.transform(from_unit(noisy, bounds), bounds), bounds), c)

        return _train_loop(self, clean_u.shape[0], batch, loss_fn, epochs, batch_size, lr, g)


class HighLevelGuidedDenoiser(_LearnedDefense):
    """HGD (Liao et al., CVPR 2018): ``x_hat = x - D(x)``, ``D`` trained with the model's
    representation loss (see the module docstring). Differentiable. Train it with :meth:`fit`."""

    name = "hgd"

    def __init__(self, channels: int = 1, width: int = 16, spatial_dims: int = 2) -> None:
        super().__init__(channels, width, spatial_dims)
        self.net = _DenoiserNet(channels, width, spatial_dims)

    def transform(self, x: torch.Tensor, bounds: Bounds) -> torch.Tensor:
        self._check(x)
        u = to_unit(x, bounds)
        return from_unit((u - self.net(u)).clamp(0, 1), bounds)

    def fit(self, model: Any, clean: torch.Tensor, adversarial: torch.Tensor, *,
            layer: str | None = None, epochs: int = 5, batch_size: int = 64, lr: float = 1e-3,
            seed: int = 0) -> list[float]:
        """Train on pairs ``(adversarial[i], clean[i])`` (model units) so that the model's logits
        (or the output of its submodule named ``layer``) on the denoised adversarial input match
        those on the clean input, L1 distance. The model's weights are not changed."""
        if adversarial.shape != clean.shape:
            raise DefenseError("hgd: adversarial and clean must have the same shape")
        bounds = model.bounds
        feats: dict[str, torch.Tensor] = {}
        handle = None
        if layer is not None:
            sub = dict(model.module.named_modules()).get(layer)
            if sub is None:
                raise DefenseError(f"hgd: the model has no submodule {layer!r}")
            handle = sub.register_forward_hook(lambda m, i, o: feats.__setitem__("f", o))

        def rep(x: torch.Tensor) -> torch.Tensor:
            out = model.forward(x)
            return feats["f"] if layer is not None else out

        g = torch.Generator().manual_seed(int(seed))
        mode = [(p, p.requires_grad) for p in model.module.parameters()]
        try:
            for p, _ in mode:
                p.requires_grad_(False)
            with model.attack_mode():
                with torch.no_grad():
                    target = torch.cat([rep(clean[i : i + 256]).detach()
                                        for i in range(0, len(clean), 256)])

                def batch(idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
                    return adversarial[idx], idx

                def loss_fn(xa: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
                    return (rep(self.transform(xa, bounds)) - target[idx]).abs().mean()

                return _train_loop(self, len(clean), batch, loss_fn, epochs, batch_size, lr, g)
        finally:
            for p, r in mode:
                p.requires_grad_(r)
            if handle is not None:
                handle.remove()


class _VAE(nn.Module):
    def __init__(self, channels: int, size: int, latent: int, width: int) -> None:
        super().__init__()
        if size % 4:
            raise DefenseError(f"defensegan: size must be a multiple of 4; got {size!r}")
        self.size, self.latent, self.width = size, latent, width
        s = size // 4
        self.encoder = nn.Sequential(
            nn.Conv2d(channels, width, 4, 2, 1), nn.ReLU(),
            nn.Conv2d(width, 2 * width, 4, 2, 1), nn.ReLU(), nn.Flatten(),
            nn.Linear(2 * width * s * s, 2 * latent))
        self.decoder_fc = nn.Linear(latent, 2 * width * s * s)
        self.decoder = nn.Sequential(
            nn.ReLU(), nn.ConvTranspose2d(2 * width, width, 4, 2, 1), nn.ReLU(),
            nn.ConvTranspose2d(width, channels, 4, 2, 1))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        s = self.size // 4
        h = self.decoder_fc(z).view(z.shape[0], 2 * self.width, s, s)
        return torch.sigmoid(self.decoder(h))


class GeneratorProjection(Defense):
    """Defense-GAN's projection onto a generator's range (see the module docstring).

    Args:
        channels, size: the images' channels and (square) size, a multiple of 4.
        latent: the latent dimension.
        width: the VAE's convolution width.
        restarts, steps, lr: the projection: random starts ``z ~ N(0, I)``, gradient steps
            (Adam) per start, step size (Samangouei et al.: R = 10, L = 200 on MNIST).
        seed: the random starts.
    """

    name = "defensegan"
    differentiable = False
    randomized = True

    def __init__(self, channels: int = 1, size: int = 28, latent: int = 16, width: int = 16,
                 restarts: int = 4, steps: int = 50, lr: float = 0.1,
                 seed: int | None = None) -> None:
        super().__init__(seed)
        for name, v in (("restarts", restarts), ("steps", steps), ("latent", latent)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise DefenseError(f"{self.name}: {name} must be a positive integer; got {v!r}")
        self.vae = _VAE(channels, size, latent, width)
        self.channels, self.size = channels, size
        self.restarts, self.steps, self.lr = restarts, steps, float(lr)
        self.options = {"channels": channels, "size": size, "latent": latent, "width": width,
                        "restarts": restarts, "steps": steps, "lr": self.lr}
        if seed is not None:
            self.options["seed"] = seed

    def fit(self, images: torch.Tensor, bounds: Bounds = (0.0, 1.0), *, epochs: int = 10,
            batch_size: int = 64, lr: float = 1e-3, seed: int = 0) -> list[float]:
        """Train the VAE on clean ``images`` (the ELBO with a Bernoulli likelihood)."""
        u = to_unit(images.float(), bounds).clamp(0, 1)
        g = torch.Generator().manual_seed(int(seed))
        vae = self.vae

        def batch(idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            return u[idx], torch.randn((len(idx), vae.latent), generator=g)

        def loss_fn(x: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
            mu, logvar = vae.encoder(x).chunk(2, dim=1)
            z = mu + eps * (0.5 * logvar).exp()
            rec = F.binary_cross_entropy(vae.decode(z), x, reduction="sum")
            kl = -0.5 * (1 + logvar - mu**2 - logvar.exp()).sum()
            return (rec + kl) / x.shape[0]

        return _train_loop(self, u.shape[0], batch, loss_fn, epochs, batch_size, lr, g)

    def transform(self, x: torch.Tensor, bounds: Bounds) -> torch.Tensor:
        if x.dim() != 4 or tuple(x.shape[1:]) != (self.channels, self.size, self.size):
            raise DefenseError(f"{self.name}: built for ({self.channels}, {self.size}, "
                               f"{self.size}) images; got shape {tuple(x.shape)}")
        u = to_unit(x.detach(), bounds).float()
        n = u.shape[0]
        target = u.repeat(self.restarts, 1, 1, 1)
        z = self.randn(self.restarts * n, self.vae.latent, like=u).requires_grad_(True)
        opt = torch.optim.Adam([z], lr=self.lr)
        params = [(p, p.requires_grad) for p in self.vae.parameters()]
        try:
            for p, _ in params:
                p.requires_grad_(False)
            with torch.enable_grad():
                for _ in range(self.steps):
                    loss = ((self.vae.decode(z) - target) ** 2).flatten(1).sum(1)
                    opt.zero_grad()
                    loss.sum().backward()
                    opt.step()
        finally:
            for p, r in params:
                p.requires_grad_(r)
        with torch.no_grad():
            rec = self.vae.decode(z)
            err = ((rec - target) ** 2).flatten(1).sum(1).view(self.restarts, n)
            best = err.argmin(0)
            out = rec.view(self.restarts, n, *u.shape[1:])[best, torch.arange(n)]
        return from_unit(out.to(x.dtype), bounds)


def _logit(u: torch.Tensor) -> torch.Tensor:
    u = u.clamp(1e-4, 1 - 1e-4)
    return torch.log(u) - torch.log1p(-u)


def _train_loop(defense: Defense, n: int, batch: Any, loss_fn: Any, epochs: int,
                batch_size: int, lr: float, g: torch.Generator) -> list[float]:
    if n < 1:
        raise DefenseError(f"{defense.name}: no training images")
    params = [p for p in defense.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=lr)
    was = defense.training
    defense.train()
    history = []
    try:
        for _ in range(int(epochs)):
            perm = torch.randperm(n, generator=g)
            total, seen = 0.0, 0
            for s in range(0, n, int(batch_size)):
                idx = perm[s : s + int(batch_size)]
                with torch.enable_grad():
                    loss = loss_fn(*batch(idx))
                    if not math.isfinite(float(loss.detach())):
                        raise FloatingPointError(f"{defense.name}: the training loss became "
                                                 f"{float(loss)}; lower lr")
                    opt.zero_grad()
                    loss.backward()
                    opt.step()
                total += float(loss.detach()) * len(idx)
                seen += len(idx)
            history.append(total / seen)
    finally:
        defense.train(was)
    return history


__all__ = ["DenoisingAutoencoder", "GeneratorProjection", "HighLevelGuidedDenoiser"]
