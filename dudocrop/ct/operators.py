"""The fan-beam CT operator: forward projection (paper: Y = FP(X)), its adjoint BP, and FBP
(paper: X = FBP(Y)), on batched tensors (N, 1, H, W) <-> (N, 1, V, C), on CPU or CUDA.

One API whatever the backend:

* ``numba``  (CPU default): multi-threaded Joseph projector and pixel-driven FBP.
* ``torch``  (CUDA default; also runs on CPU): the same algorithms vectorised in torch.
* ``astra``  (flat detectors only): astra-toolbox FP/BP on CPU and CUDA, FBP_CUDA on CUDA; on CPU its FBP
  uses the project's filtered backprojection, since astra has no CPU fan-beam FBP.

Images are linear attenuation in 1/mm (see ``units``), sinograms are line integrals (dimensionless).
The output lives on the input's device and has its dtype (float32 or float64).
"""

from __future__ import annotations

import math
from typing import Literal

import numba
import numpy as np
import torch

from dudocrop.checks import check_tensor
from dudocrop.ct import kernels_numba as knb
from dudocrop.ct import kernels_torch as kt
from dudocrop.ct.filters import filter_sinogram
from dudocrop.ct.geometry import FanBeamGeometry, get_geometry

Backend = Literal["auto", "numba", "torch", "astra"]
BACKENDS = ("auto", "numba", "torch", "astra")


class FanBeamOperator:
    """FP / BP / FBP for one :class:`FanBeamGeometry`."""

    def __init__(self, geometry: FanBeamGeometry | str, backend: Backend = "auto"):
        self.geometry = get_geometry(geometry)
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        if backend == "astra" and self.geometry.detector != "flat":
            raise ValueError(
                f"backend='astra' supports flat detectors only; geometry {self.geometry.name!r} is "
                f"{self.geometry.detector} (use 'numba' or 'torch')"
            )
        self.backend = backend
        g = self.geometry
        src, e_c, e_u = g.view_frames
        self._np = {
            "src": knb.as_f32(src), "e_c": knb.as_f32(e_c), "e_u": knb.as_f32(e_u),
            "dirs": knb.as_f32(g.ray_directions),
        }
        self._torch_cache: dict[tuple, dict[str, torch.Tensor]] = {}

    def __repr__(self) -> str:
        return f"FanBeamOperator({self.geometry.name!r}, backend={self.backend!r})"

    # ---- public API ------------------------------------------------------------------------------
    def fp(self, image) -> torch.Tensor:
        """Forward projection: (N, 1, H, W) attenuation -> (N, 1, V, C) line integrals."""
        x = self._check_image(image, "image")
        b = self._resolve(x)
        if b == "numba":
            out = self._numba_loop(x, self.geometry.sino_shape,
                                   lambda a, o: knb.fp_joseph(a, self._np["src"], self._np["dirs"],
                                                              self.geometry.pixel_size, o,
                                                              np.asarray(knb.nonzero_box(a), np.int64)))
        elif b == "torch":
            t = self._tensors(x)
            out = kt.fp_joseph(x[:, 0].to(t["src"].dtype), t["src"], t["dirs"], self.geometry.pixel_size)
            out = out.to(x.dtype).unsqueeze(1)
        else:
            out = self._astra_loop(x, "fp")
        return out

    def bp(self, sino) -> torch.Tensor:
        """Back projection, the exact adjoint of :meth:`fp`: (N, 1, V, C) -> (N, 1, H, W)."""
        y = self._check_sino(sino, "sino")
        b = self._resolve(y)
        n = self.geometry.image_size
        if b == "numba":
            return self._numba_loop(y, (n, n),
                                    lambda a, o: knb.bp_joseph(a, self._np["src"], self._np["dirs"],
                                                               self.geometry.pixel_size, o,
                                                               numba.get_num_threads()))
        if b == "torch":
            t = self._tensors(y)
            out = kt.bp_joseph(y[:, 0].to(t["src"].dtype), t["src"], t["dirs"], self.geometry.pixel_size, n)
            return out.to(y.dtype).unsqueeze(1)
        return self._astra_loop(y, "bp")

    def fbp(self, sino, filter: str = "ram-lak", cutoff: float = 1.0) -> torch.Tensor:
        """Filtered backprojection (Kak & Slaney fan-beam formulas, see ``filters``):
        (N, 1, V, C) line integrals -> (N, 1, H, W) attenuation in 1/mm."""
        y = self._check_sino(sino, "sino")
        b = self._resolve(y)
        g = self.geometry
        if b == "astra" and y.is_cuda and filter == "ram-lak" and cutoff == 1.0:
            return self._astra_loop(y, "fbp")
        q = filter_sinogram(y, g, filter, cutoff)[:, 0]
        args = self._fbp_args()
        n = g.image_size
        if b == "torch" or (b == "astra" and y.is_cuda):
            t = self._tensors(y)
            out = kt.bp_fbp(q.to(t["src"].dtype), t["src"], t["e_c"], t["e_u"], g.pixel_size, n, **args)
            return out.to(y.dtype).unsqueeze(1)
        return self._numba_loop(q.unsqueeze(1), (n, n),
                                lambda a, o: knb.bp_fbp(a, self._np["src"], self._np["e_c"], self._np["e_u"],
                                                        g.pixel_size, args["curved"], args["step"],
                                                        args["first"], args["sid"], args["sdd"],
                                                        args["dbeta"], o))

    # ---- helpers ---------------------------------------------------------------------------------
    def _fbp_args(self) -> dict:
        g = self.geometry
        curved = g.detector == "curved"
        coords = g.channel_coords
        if not math.isclose(g.angular_range, 2 * math.pi, rel_tol=1e-9):
            raise NotImplementedError(
                f"FBP is implemented for full 360-degree scans; geometry {g.name!r} covers "
                f"{math.degrees(g.angular_range):.1f} degrees (short-scan Parker weights are not implemented)"
            )
        return {
            "curved": curved,
            "step": float(g.delta_gamma if curved else g.channel_spacing),
            "first": float(coords[0]),
            "sid": float(g.sid),
            "sdd": float(g.sdd),
            "dbeta": float(g.angular_range / g.n_views),
        }

    def _resolve(self, x: torch.Tensor) -> str:
        if self.backend == "auto":
            return "torch" if x.is_cuda else "numba"
        if self.backend == "numba" and x.device.type != "cpu":
            raise ValueError(f"backend='numba' runs on CPU tensors only, got a tensor on {x.device}")
        return self.backend

    def _tensors(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        # float64 geometry keeps ray positions exact to far below a pixel at 512^2 on CPU; float32 on GPU
        dtype = torch.float64 if x.device.type == "cpu" else torch.float32
        key = (x.device, dtype)
        if key not in self._torch_cache:
            g = self.geometry
            src, e_c, e_u = g.view_frames
            self._torch_cache[key] = {
                k: torch.as_tensor(v, dtype=dtype, device=x.device)
                for k, v in {"src": src, "e_c": e_c, "e_u": e_u, "dirs": g.ray_directions}.items()
            }
        return self._torch_cache[key]

    @staticmethod
    def _numba_loop(x: torch.Tensor, out_hw: tuple[int, int], kernel) -> torch.Tensor:
        # numba's OpenMP layer sets the process-wide OpenMP thread count, which is also torch's intra-op pool: a
        # Ray Train worker held to 1 torch thread ran on 2 after one NMAR (4x slower DDP steps on 2 cores, the
        # threads spinning against each other). So the kernels use at most torch's threads, and torch keeps them.
        threads = torch.get_num_threads()
        numba_threads = numba.get_num_threads()
        numba.set_num_threads(max(1, min(threads, numba.config.NUMBA_NUM_THREADS)))
        try:
            xs = x.detach().cpu().numpy()
            out = np.empty((xs.shape[0], 1, *out_hw), dtype=np.float32)
            for i in range(xs.shape[0]):
                kernel(knb.as_f32(xs[i, 0]), out[i, 0])
        finally:
            numba.set_num_threads(numba_threads)
            torch.set_num_threads(threads)
        return torch.from_numpy(out).to(x.dtype)

    def _astra_loop(self, x: torch.Tensor, what: str) -> torch.Tensor:
        from dudocrop.ct import kernels_astra as ka

        use_cuda = x.is_cuda
        fn = {"fp": ka.fp, "bp": ka.bp}.get(what)
        xs = x.detach().cpu().numpy()
        outs = []
        for i in range(xs.shape[0]):
            a = knb.as_f32(xs[i, 0])
            outs.append(ka.fbp_cuda(self.geometry, a) if what == "fbp" else fn(self.geometry, a, use_cuda))
        return torch.from_numpy(np.stack(outs)[:, None]).to(device=x.device, dtype=x.dtype)

    def _check_image(self, x, name: str) -> torch.Tensor:
        n = self.geometry.image_size
        return check_tensor(x, name, ndim=4, shape=(None, 1, n, n), context=f"geometry {self.geometry.name!r}")

    def _check_sino(self, y, name: str) -> torch.Tensor:
        v, c = self.geometry.sino_shape
        return check_tensor(y, name, ndim=4, shape=(None, 1, v, c), context=f"geometry {self.geometry.name!r}")
