"""The learned flow models: ``fpi_gd`` (:class:`VariationalFlow`) and ``fpi_nn`` (:class:`RefinedFlow`).

**fpi_gd.** A learned variational flow model whose output, per warp, is a fixed point of a descent map.

Per pyramid level and warp (linearisation point ``u0``), the flow ``z = (u, v)`` minimises the
learned energy (Classic-C / Brox style, every weight learned)

    E(z) = sum_p rho_D(r_p) + gamma [rho_D(r^x_p) + rho_D(r^y_p)]
           + lambda sum_{p~q} w_pq [rho_S(u_p - u_q) + rho_S(v_p - v_q)],

    r   = I_t + I_x du + I_y dv                (brightness constancy, linearised at u0)
    r^x = I_xt + I_xx du + I_xy dv,  r^y = I_yt + I_xy du + I_yy dv   (gradient constancy)
    rho(s) = (s^2 + eps^2)^a                   (generalised Charbonnier, learned eps and a)
    w_pq = 1 - beta + beta exp(-|grad I1|^2 / sigma^2)   (learned image-adaptive weight)

with ``du = u - u0``. The fixed-point map is one red-black block-SOR sweep on the lagged
(IRLS) normal equations ``(A(z) + S(z)) z = A(z) u0 - b(z) + N(z) z``: a gradient step on
``E`` preconditioned by the per-pixel 2x2 block of the lagged Hessian, so its fixed points are
exactly the stationary points ``grad E(z*) = 0``. Its output is differentiated by the implicit
(backward-FPI) gradient. Between warps the flow is median filtered (5x5, as in Classic-C).

**fpi_nn.** an FPI_NN refinement of the variational flow, in the spirit of recurrent refinement.

Given the variational flow ``z_gd`` (the ``fpi_gd`` model) and the frames, the refined flow is
the fixed point of a small convolutional update (``torchfpi.FPINN``):

    z* = f(z*, x),   f(z, x) = z_gd + h_theta(z - z_gd, I2(. + z) - I1, I1)

``h_theta`` sees the brightness residual of the current flow, so its fixed point is a flow that
the network judges consistent with the frames. Its last layer starts at zero (``z* = z_gd`` before
training) and the forward solve is damped; training uses the implicit gradient plus a small
Jacobian penalty (Hutchinson) that keeps ``f`` contractive.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Dict, List, Optional, Tuple, cast

import torch
import torch.nn as nn

import torchfpi
from torchfpi.apps.flow import _ops


@dataclass
class FlowConfig:
    """Solver settings of :class:`VariationalFlow` (not learned)."""

    warps: int = 3
    max_iter: int = 40
    tol: float = 1e-3
    omega: float = 1.6
    median: int = 5
    min_size: int = 16
    pre_sigma: float = 0.8
    backward_max_iter: int = 40
    backward_tol: float = 1e-3


def _softplus_inv(x: float) -> float:
    return math.log(math.expm1(x))


class VariationalFlow(nn.Module):
    """Coarse-to-fine learned variational flow; each warp's flow is a fixed point (see module doc).

    Learned parameters (all scalars, kept in their valid ranges by log / sigmoid maps):
    ``lambda`` (smoothness), ``gamma`` (gradient constancy), ``eps_d, a_d`` (data penalty),
    ``eps_s, a_s`` (smoothness penalty), ``beta, sigma`` (image-adaptive smoothness weight).

    Example:
        >>> model = VariationalFlow()
        >>> f1 = torch.rand(1, 1, 32, 32) * 255
        >>> with torch.no_grad():
        ...     flow, info = model(f1, f1)
        >>> tuple(flow.shape)
        (1, 2, 32, 32)
    """

    def __init__(self, config: FlowConfig | None = None, lam: float = 10.0, gamma: float = 5.0,
                 eps_d: float = 1.0, a_d: float = 0.5, eps_s: float = 0.05, a_s: float = 0.5,
                 beta: float = 0.05, sigma: float = 10.0) -> None:
        super().__init__()
        self.config = config or FlowConfig()
        self.log_lam = nn.Parameter(torch.tensor(math.log(lam)))
        self.log_gamma = nn.Parameter(torch.tensor(math.log(gamma)))
        self.log_eps_d = nn.Parameter(torch.tensor(math.log(eps_d)))
        self.log_eps_s = nn.Parameter(torch.tensor(math.log(eps_s)))
        # exponents a in (0.25, 0.75): a sigmoid map keeps the penalties robust but well behaved
        self.a_d_raw = nn.Parameter(torch.tensor(math.log((a_d - 0.25) / (0.75 - a_d))))
        self.a_s_raw = nn.Parameter(torch.tensor(math.log((a_s - 0.25) / (0.75 - a_s))))
        self.beta_raw = nn.Parameter(torch.tensor(math.log(beta / (1 - beta))))
        self.log_sigma = nn.Parameter(torch.tensor(math.log(sigma)))

    # -- parameters in their natural ranges ---------------------------------------------------
    def params(self) -> Dict[str, torch.Tensor]:
        """The learned scalars in their natural units."""
        return {
            "lambda": self.log_lam.exp(), "gamma": self.log_gamma.exp(),
            "eps_d": self.log_eps_d.exp(), "a_d": 0.25 + 0.5 * torch.sigmoid(self.a_d_raw),
            "eps_s": self.log_eps_s.exp(), "a_s": 0.25 + 0.5 * torch.sigmoid(self.a_s_raw),
            "beta": torch.sigmoid(self.beta_raw), "sigma": self.log_sigma.exp(),
        }  # fmt: skip

    def describe(self) -> Dict[str, float]:
        """Learned scalars as plain floats (for logs and results)."""
        return {k: round(float(v.detach()), 5) for k, v in self.params().items()}

    # -- the fixed-point map -------------------------------------------------------------------
    @staticmethod
    def _psi(r: torch.Tensor, eps: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        """rho'(r) / r for rho(r) = (r^2 + eps^2)^a."""
        return 2 * a * (r * r + eps * eps) ** (a - 1)

    def step(self, z: torch.Tensor, u0: torch.Tensor, d: torch.Tensor, wx: torch.Tensor,
             wy: torch.Tensor, red: torch.Tensor) -> torch.Tensor:
        """One red-black block-SOR sweep on the lagged normal equations: the map ``f(z)``.

        Args:
            z: flow ``(B, 2, H, W)``. u0: linearisation point ``(B, 2, H, W)``.
            d: data terms ``(B, 8, H, W)``: I_x, I_y, I_t, I_xx, I_xy, I_yy, I_xt, I_yt (masked).
            wx, wy: image-adaptive weights of horizontal ``(B, 1, H, W-1)`` / vertical edges.
            red: ``(1, 1, H, W)`` bool checkerboard.
        """
        p = self.params()
        ix, iy, it, ixx, ixy, iyy, ixt, iyt = d.unbind(1)
        du, dv = z[:, 0] - u0[:, 0], z[:, 1] - u0[:, 1]
        g = p["gamma"]
        p1 = self._psi(it + ix * du + iy * dv, p["eps_d"], p["a_d"])
        px = g * self._psi(ixt + ixx * du + ixy * dv, p["eps_d"], p["a_d"])
        py = g * self._psi(iyt + ixy * du + iyy * dv, p["eps_d"], p["a_d"])
        a11 = p1 * ix * ix + px * ixx * ixx + py * ixy * ixy
        a12 = p1 * ix * iy + px * ixx * ixy + py * ixy * iyy
        a22 = p1 * iy * iy + px * ixy * ixy + py * iyy * iyy
        b1 = p1 * ix * it + px * ixx * ixt + py * ixy * iyt
        b2 = p1 * iy * it + px * ixy * ixt + py * iyy * iyt
        rhs1 = a11 * u0[:, 0] + a12 * u0[:, 1] - b1
        rhs2 = a12 * u0[:, 0] + a22 * u0[:, 1] - b2
        # lagged smoothness weights per edge and component: (B, 2, H, W-1) and (B, 2, H-1, W)
        lam = p["lambda"]
        cx = lam * wx * self._psi(z[..., :, 1:] - z[..., :, :-1], p["eps_s"], p["a_s"])
        cy = lam * wy * self._psi(z[..., 1:, :] - z[..., :-1, :], p["eps_s"], p["a_s"])
        zero_x = torch.zeros_like(cx[..., :, :1])
        zero_y = torch.zeros_like(cy[..., :1, :])
        cl = torch.cat([zero_x, cx], dim=-1)  # weight to the left neighbour
        cr = torch.cat([cx, zero_x], dim=-1)
        cu = torch.cat([zero_y, cy], dim=-2)
        cd = torch.cat([cy, zero_y], dim=-2)
        s = cl + cr + cu + cd  # (B, 2, H, W)
        m11, m22 = a11 + s[:, 0], a22 + s[:, 1]
        det = m11 * m22 - a12 * a12
        omega = self.config.omega
        for colour in (red, ~red):
            zp = torch.nn.functional.pad(z, (1, 1, 1, 1))
            n = cl * zp[..., 1:-1, :-2] + cr * zp[..., 1:-1, 2:] + cu * zp[..., :-2, 1:-1] + cd * zp[..., 2:, 1:-1]
            r1, r2 = rhs1 + n[:, 0], rhs2 + n[:, 1]
            new = torch.stack([(m22 * r1 - a12 * r2) / det, (m11 * r2 - a12 * r1) / det], dim=1)
            z = torch.where(colour, (1 - omega) * z + omega * new, z)
        return z

    def energy(self, z: torch.Tensor, u0: torch.Tensor, d: torch.Tensor, wx: torch.Tensor,
               wy: torch.Tensor, red: torch.Tensor | None = None) -> torch.Tensor:
        """The learned energy ``E(z)`` of one warp, per sample ``(B,)`` (see the module docstring).

        :meth:`step` is a preconditioned descent step on it: ``grad_z E(z*) = 0`` at its fixed
        points (tested with ``torchfpi.energy_grad``). Same arguments as :meth:`step`.
        """
        p = self.params()
        ix, iy, it, ixx, ixy, iyy, ixt, iyt = d.unbind(1)
        du, dv = z[:, 0] - u0[:, 0], z[:, 1] - u0[:, 1]

        def rho(s: torch.Tensor, eps: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
            return (s * s + eps * eps) ** a

        data = rho(it + ix * du + iy * dv, p["eps_d"], p["a_d"]) + p["gamma"] * (
            rho(ixt + ixx * du + ixy * dv, p["eps_d"], p["a_d"]) + rho(iyt + ixy * du + iyy * dv, p["eps_d"], p["a_d"]))
        smooth = (wx * rho(z[..., :, 1:] - z[..., :, :-1], p["eps_s"], p["a_s"])).flatten(1).sum(1) + (
            wy * rho(z[..., 1:, :] - z[..., :-1, :], p["eps_s"], p["a_s"])).flatten(1).sum(1)
        return data.flatten(1).sum(1) + p["lambda"] * smooth

    # -- the coarse-to-fine scheme -------------------------------------------------------------
    def _data_terms(self, a: torch.Tensor, b: torch.Tensor, flow: torch.Tensor) -> torch.Tensor:
        bw, inside = _ops.warp(b, flow, mode="bicubic")
        ax, ay = _ops.gradient(a)
        bx, by = _ops.gradient(bw)
        axx, axy = _ops.gradient(ax)
        _, ayy = _ops.gradient(ay)
        bxx, bxy = _ops.gradient(bx)
        _, byy = _ops.gradient(by)
        m = inside.to(a.dtype)
        terms = [0.5 * (ax + bx), 0.5 * (ay + by), bw - a, 0.5 * (axx + bxx), 0.5 * (axy + bxy),
                 0.5 * (ayy + byy), bx - ax, by - ay]
        return torch.cat(terms, dim=1) * m

    def _edge_weights(self, a: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        p = self.params()
        ax, ay = _ops.gradient(a)
        w = (1 - p["beta"]) + p["beta"] * torch.exp(-(ax * ax + ay * ay) / p["sigma"] ** 2)
        return 0.5 * (w[..., :, 1:] + w[..., :, :-1]), 0.5 * (w[..., 1:, :] + w[..., :-1, :])

    def forward(self, frame1: torch.Tensor, frame2: torch.Tensor,
                track_last: bool = True) -> Tuple[torch.Tensor, Dict[str, Any]]:
        """Flow from ``frame1`` to ``frame2``.

        Args:
            frame1, frame2: grey ``(B, 1, H, W)`` on the [0, 255] scale.
            track_last: when gradients are enabled, differentiate only the last fixed point
                (finest level, last warp) and treat the earlier levels as its initialisation;
                ``False`` differentiates every warp's fixed point (costlier).

        Returns:
            ``(flow (B, 2, H, W), info)`` with ``info["iterations"]`` (total sweeps, sample 0),
            ``info["solves"]`` and ``info["per_solve"]`` (sweeps per solve).

        Raises:
            UsageError: if the frames are not grey ``(B, 1, H, W)`` of one size.
        """
        _ops.check_pair(frame1, frame2)
        cfg = self.config
        f1 = _ops.gaussian_blur(frame1, cfg.pre_sigma)
        f2 = _ops.gaussian_blur(frame2, cfg.pre_sigma)
        sizes = _ops.pyramid_sizes(f1.shape[-2], f1.shape[-1], min_size=cfg.min_size)
        flow = torch.zeros(f1.shape[0], 2, *sizes[-1], dtype=f1.dtype, device=f1.device)
        per_solve: List[int] = []
        grad_on = torch.is_grad_enabled()
        for li, size in enumerate(reversed(sizes)):
            a, b = _ops.resize_image(f1, size), _ops.resize_image(f2, size)
            flow = _ops.resize_flow(flow, size)
            red = (torch.arange(size[0])[:, None] + torch.arange(size[1])[None, :]) % 2 == 0
            red = red.to(flow.device)[None, None]
            for k in range(cfg.warps):
                last = li == len(sizes) - 1 and k == cfg.warps - 1
                track = grad_on and (last or not track_last)
                with torch.set_grad_enabled(track):
                    u0 = flow if track else flow.detach()
                    d = self._data_terms(a, b, u0)
                    wx, wy = self._edge_weights(a)
                    # plain forward and backward FPI; the iterations are capped on purpose (a
                    # coarse-to-fine scheme needs no warp converged): reported, not warned about
                    sol = torchfpi.fixed_point(self.step, u0.detach(), u0, d, wx, wy, red, solver="fpi",
                                               backward="fpi", tol=cfg.tol, max_iter=cfg.max_iter,
                                               backward_tol=cfg.backward_tol,
                                               backward_max_iter=cfg.backward_max_iter, on_failure="ignore")
                    flow = _ops.median_filter(sol.value, cfg.median)
                per_solve.append(int(sol.iterations[0]))
        info = {"iterations": sum(per_solve), "solves": len(per_solve), "per_solve": per_solve}
        return flow, info

    def extra_state(self) -> Dict[str, Any]:
        """Config as a dict (saved beside the weights)."""
        return asdict(self.config)


class RefineUpdate(nn.Module):
    """``f(z, x) = z_gd + h(z - z_gd, residual, image)``; ``x = [z_gd, I1, I2]`` ``(B, 4, H, W)``, frames / 255."""

    def __init__(self, hidden: int = 24) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(6, hidden, 3, padding=1), nn.GELU(),
            nn.Conv2d(hidden, hidden, 3, padding=2, dilation=2), nn.GELU(),
            nn.Conv2d(hidden, hidden, 3, padding=1), nn.GELU(),
            nn.Conv2d(hidden, 2, 3, padding=1),
        )  # fmt: skip
        last = self.net[-1]
        if isinstance(last, nn.Conv2d):  # h starts at zero: z* = z_gd before training
            nn.init.zeros_(last.weight)
            nn.init.zeros_(last.bias)  # type: ignore[arg-type]  # bias=True: a tensor

    def forward(self, z: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        zgd, i1, i2 = x[:, :2], x[:, 2:3], x[:, 3:4]
        i2w, inside = _ops.warp(i2, z)
        res = (i2w - i1) * inside
        gx, gy = _ops.gradient(i1)
        feats = torch.cat([z - zgd, 10 * res, i1 - 0.5, 4 * gx, 4 * gy], dim=1)
        return zgd + self.net(feats)


@dataclass
class RefineConfig:
    """Solver settings of the refinement (not learned)."""

    hidden: int = 24
    damping: float = 0.5
    max_iter: int = 30
    tol: float = 1e-4


class RefinedFlow(nn.Module):
    """``fpi_nn``: the variational flow (frozen) refined by an FPI_NN layer (see module doc)."""

    def __init__(self, base: VariationalFlow, config: Optional[RefineConfig] = None) -> None:
        super().__init__()
        self.config = config or RefineConfig()
        self.base = base
        for p in self.base.parameters():
            p.requires_grad_(False)
        self.update = RefineUpdate(self.config.hidden)
        self.last_iterations = 0
        self.layer = torchfpi.FPINN(self.update, solver=torchfpi.FPI(damping=self.config.damping),
                                    tol=self.config.tol, max_iter=self.config.max_iter,
                                    backward_tol=self.config.tol, backward_max_iter=self.config.max_iter,
                                    on_failure="ignore")

    def refine(self, zgd: torch.Tensor, frame1: torch.Tensor, frame2: torch.Tensor) -> torch.Tensor:
        """Refined flow ``(B, 2, H, W)`` from the variational flow ``zgd`` and frames in [0, 255]."""
        x = torch.cat([zgd.detach(), frame1 / 255.0, frame2 / 255.0], dim=1)
        sol = self.layer.solve(x, z0=zgd.detach())
        self.last_iterations = int(sol.iterations[0])
        return cast(torch.Tensor, sol.value)  # a tensor z0 gives a tensor value

    def forward(self, frame1: torch.Tensor, frame2: torch.Tensor) -> Tuple[torch.Tensor, Dict[str, Any]]:
        """Flow from ``frame1`` to ``frame2`` (grey ``(B, 1, H, W)``, [0, 255]) and solve info."""
        with torch.no_grad():
            zgd, info = self.base(frame1, frame2)
        flow = self.refine(zgd, frame1, frame2)
        info = dict(info)
        info["refine_iterations"] = self.last_iterations
        return flow, info
