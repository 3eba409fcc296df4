"""Streaming least-squares init of stitching layers.

    solver = esta_kernels.StreamingLstsq(in_features, out_features, bias=True, device=None, backend="auto")
    solver.update(h_in, h_out)            # any number of batches, (..., in) and (..., out), any float dtype
    weight, bias = solver.solve()         # (out, in) and (out,), float32
    weight, bias = esta_kernels.lstsq_init(h_in, h_out)                   # one shot
    multi = esta_kernels.StreamingLstsq.multi(in_features, [out_1, out_2])  # one Gram, several targets
    multi.update(h_in, [h_out_1, h_out_2]); multi.solve(1); multi.solve_all()

They solve min ||[H_in, 1] [W, b]^T - H_out|| over every token seen (without the ones column for
bias=False). The state is O(in * (in + out)) float64, whatever the number of tokens.

What is accumulated. The first update fixes a shift (s, t) = that batch's column means (float32). Each
batch goes through the fused op esta::lstsq_accumulate (backends torch / cpu / triton / cuda), which with
u = h_in - s, v = h_out - t, ua = [u, 1] returns G = ua^T ua and C = ua^T v in float64. The sums over all
batches are the state. The solve turns them into the centred scatter matrices
    Cxx = G_uu - su su^T / n,    Cxy = C_uv - su sv^T / n     (su, sv: column sums of u and v)
solves Cxx W^T = Cxy and gets b = mean(h_out) - W mean(h_in).

Error analysis (why float32 centred block products, float64 merge, float64 solve):
  1. Centring. u = fl(h - s) is exact when h lies within a factor 2 of s (Sterbenz) and otherwise off by at
     most 2^-24 |u|: the perturbation is relative to the spread of the data, not to its mean. Without the
     shift, the float32 products carry errors ~2^-24 n mean^2 and the later subtraction n mean mean^T
     cancels them only to that absolute level, losing log10(mean^2 / var) digits: with activations at
     mean 100 and variance 1, every digit a float32 accumulator has. Float16/bfloat16 inputs convert to
     float32 exactly.
  2. Block products. Each entry is a float32 dot product over at most 1024 rows: a worst-case relative
     error of 1024 * 2^-24 = 6e-5 of sum |u_i u_j|, typically sqrt(1024) * 2^-24 = 2e-6 (rounding errors
     of random sign). The block results are added in float64 (error ~2^-53 per addition), so streaming
     over millions of tokens adds nothing: independent block errors stay at that relative level. So the
     stats are those of data perturbed by a relative delta ~ 2e-6 (6e-5 at worst). Never TF32 (2^-11 would
     give delta ~ 1e-3). float64 products would halve the CPU's speed and cost ~60x on GPUs without fast
     FP64, for digits the normal equations (below) cannot use at the conditioning where they are accurate.
  3. Float64 centring and solve. Forming Cxx from the shifted stats loses only eps64 (drift / std)^2 when
     later batches drift from the first batch's mean: negligible below drift / std ~ 1e4. The Cholesky
     solve in float64 adds ~kappa * 1e-16.
  So the relative error of W is about kappa(Cxx) * delta: <= 1e-4 for kappa(Cxx) up to ~50 on worst-case
  bounds and ~1e3 typically (the tests and the benchmark meet 1e-4 against numpy's float64 lstsq). The
  normal equations square the data's condition number, so a pinv/QR of the data would be more accurate on
  ill-conditioned data, at ~10x the cost and O(tokens) memory. Float64 inputs (or the torch backend)
  accumulate in float64: delta ~ 1e-15.

The solve (all float64):
  - Ridge. `ridge=None` adds eps_acc * trace(Cxx) / d_in to Cxx's diagonal in the Cholesky, eps_acc being the
    stats' working precision (2^-24 after float32 products, 2^-53 when every batch was accumulated in
    float64): a ridge at the rounding level of the stats, so it moves the solution no more than their
    rounding already does (relative kappa * eps_acc) while letting the Cholesky of a positive semidefinite
    matrix with rounding noise succeed. `ridge=r` (a float >= 0) is RELATIVE: lambda = r * trace(Cxx) / d_in
    (the mean eigenvalue of the scatter matrix, itself a sum over tokens), i.e. ridge regression
    min ||[H, 1][W, b]^T - Y||^2 + lambda ||W||^2 with the bias not penalized; r = 0 is plain least squares.
  - Numerical rank. Eigenvalues of Cxx below rcond * lambda_max, rcond = (d_in + 1) * eps_acc by default
    (numpy's eps * max(shape) rule, at the stats' precision and on the Gram's eigenvalues), are noise.
  - Cholesky first (torch.linalg.cholesky_ex). It is kept when it succeeds and its smallest eigenvalue,
    estimated from the Cholesky pivots and three steps of inverse iteration, is above 10 * rcond * max diag.
  - Otherwise the eigendecomposition of Cxx: W^T = V_k diag(1 / mu_k) V_k^T Cxy over the eigenvalues kept,
    then the MINIMUM-NORM least-squares solution of the original problem (numpy.linalg.lstsq's answer for
    [H_in, 1], the norm taken over [W, b] jointly): every least-squares solution is W^T = W0 + Z z with
    Z spanning the dropped eigenvectors and b = ybar - xbar^T W^T, and ||W||^2 + ||b||^2 is smallest at
    z = a c^T / (1 + a^T a), a = Z^T xbar, c = ybar - W0^T xbar. It is the pinv of the original-coordinate
    Gram [H, 1]^T [H, 1] = P^T G P (P the unit-triangular shift matrix) in exact arithmetic, but decides
    the rank in centred coordinates, where the noise of the stats lives: in original coordinates a large
    mean makes the data's variance look like rounding next to the mean's eigenvalue.
  - bias=False uses the sub-blocks without the ones column, shifted back: H^T H = G_uu + s su^T + su s^T +
    n s s^T (its rank threshold measured against G_uu), and the same Cholesky / eigen pseudo-inverse.
Finite input never gives NaN or inf (eigenvalues are inverted only above a positive floor). Non-finite
activations raise ValueError naming the update ("update 3: h_in contains NaN or inf"); the check reads
the batch's float64 stats (O(d^2)), and the activations only to name the culprit; a failed update leaves
the state untouched.
"""
from __future__ import annotations

import math
from typing import List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from esta_kernels import _lstsq_ops
from esta_kernels._lstsq_ops import ACCUMULATE_OPS, check_accumulate_args
from esta_kernels.backends import BACKENDS, resolve_backend
from esta_kernels.reference import torch_lstsq_accumulate

EPS_FLOAT32 = 2.0 ** -24
EPS_FLOAT64 = 2.0 ** -53
# Eigenvalues are inverted only above this (times the scale): keeps 1 / mu finite for finite stats.
_TINY = torch.finfo(torch.float64).tiny / EPS_FLOAT64


# ------------------------------------------------------------------------------------- the fused op
def _resolve_lstsq_backend(backend: str, h_in: Tensor, h_out: Tensor) -> str:
    requested = backend
    name = resolve_backend(backend, h_in.device)
    auto = requested == "auto"
    wide = h_in.dtype == torch.float64 or h_out.dtype == torch.float64
    if name == "cpu" and not _lstsq_ops.has_cpu_kernel():
        if auto:
            return "torch"
        raise RuntimeError(
            "backend 'cpu': esta_kernels._C was built without esta::lstsq_accumulate; rebuild it "
            "(pip install --no-build-isolation -e .)"
        )
    if name == "cuda" and not _lstsq_ops.has_cuda_kernel():
        if auto:
            return "torch"
        raise RuntimeError("backend 'cuda': esta_kernels._C has no CUDA kernel of esta::lstsq_accumulate")
    if auto and wide and name in ("triton", "cuda"):
        return "torch"  # the GPU kernels take float32/16-bit activations; float64 stays exact on torch
    return name


def lstsq_accumulate(h_in: Tensor, h_out: Tensor, shift_in: Tensor, shift_out: Tensor, *,
                     backend: str = "auto") -> Tuple[Tensor, Tensor]:
    """One fused pass over one batch: (gram, cross) = ([u, 1]^T [u, 1], [u, 1]^T v) in float64, with
    u = h_in - shift_in and v = h_out - shift_out (see esta::lstsq_accumulate in DESIGN.md)."""
    for name, t in (("h_in", h_in), ("h_out", h_out)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"lstsq_accumulate: {name} must be a torch.Tensor, got {type(t).__name__}")
    name = _resolve_lstsq_backend(backend, h_in, h_out)
    check_accumulate_args(h_in, h_out, shift_in, shift_out, name)
    if name == "torch":
        return torch_lstsq_accumulate(h_in, h_out, shift_in, shift_out)
    return ACCUMULATE_OPS[name](h_in, h_out, shift_in, shift_out)


# ------------------------------------------------------------------------------------------ the solve
def _min_eig_estimate(m: Tensor, chol: Tensor) -> float:
    """An estimate (from above) of the smallest eigenvalue of m from its Cholesky factor: the smallest
    squared pivot, and the Rayleigh quotient after three steps of inverse iteration (O(d^2) each)."""
    d = m.shape[0]
    pivots = chol.diagonal().square().min()
    gen = torch.Generator(device=m.device).manual_seed(0)
    x = torch.randn(d, 1, dtype=m.dtype, device=m.device, generator=gen)
    for _ in range(3):
        x = torch.cholesky_solve(x, chol)
        x = x / x.norm().clamp_min(_TINY)
    rayleigh = (x.t() @ m @ x).squeeze()
    return float(torch.minimum(pivots, rayleigh))


def _sym_solve(a: Tensor, b: Tensor, ridge_chol: float, ridge_eig: float, floor: float,
               rcond_on_self: float) -> Tuple[Tensor, Optional[Tensor]]:
    """Solves a x = b for symmetric positive semidefinite a. Returns x and, when the eigen path dropped
    directions, an orthonormal basis of them (else None).

    Cholesky of a + ridge_chol I when it succeeds with its smallest eigenvalue above 10 * floor; else the
    eigen pseudo-inverse with eigenvalues mu > max(floor, rcond_on_self * mu_max), inverted as
    1 / (mu + ridge_eig)."""
    d = a.shape[0]
    eye = torch.eye(d, dtype=a.dtype, device=a.device)
    reg = a + ridge_chol * eye
    chol, info = torch.linalg.cholesky_ex(reg)
    if int(info) == 0 and bool(torch.isfinite(chol).all()):
        if _min_eig_estimate(reg, chol) > 10.0 * floor:
            return torch.cholesky_solve(b, chol), None
    mu, vec = torch.linalg.eigh(a)
    cut = max(floor, rcond_on_self * float(mu[-1]), _TINY)
    keep = mu > cut
    vk = vec[:, keep]
    x = vk @ ((vk.t() @ b) / (mu[keep] + ridge_eig).unsqueeze(1))
    dropped = vec[:, ~keep]
    return x, (dropped if dropped.shape[1] else None)


def _check_ridge(ridge) -> Optional[float]:
    if ridge is None:
        return None
    if isinstance(ridge, bool) or not isinstance(ridge, (int, float)):
        raise TypeError(f"solve: ridge must be a float >= 0 or None, got {type(ridge).__name__}")
    if not (ridge >= 0 and math.isfinite(ridge)):
        raise ValueError(f"solve: ridge must be a finite float >= 0 (relative to trace(Cxx) / d_in), got {ridge}")
    return float(ridge)


def solve_from_stats(gram: Tensor, cross: Tensor, shift_in: Tensor, shift_out: Tensor, *, bias: bool = True,
                     ridge: Optional[float] = None, rcond: Optional[float] = None,
                     eps_acc: float = EPS_FLOAT32) -> Tuple[Tensor, Optional[Tensor]]:
    """[W, b] from accumulated shifted stats (see the module docstring). Returns float64 W (d_out, d_in)
    and b (d_out,) (None for bias=False)."""
    ridge = _check_ridge(ridge)
    f64 = torch.float64
    g, c = gram.to(f64), cross.to(f64)
    d = g.shape[0] - 1
    n = g[d, d]
    if float(n) <= 0:
        raise RuntimeError("lstsq solve: no tokens were accumulated (call update() with data first)")
    if rcond is None:
        rcond = (d + 1) * eps_acc
    s, t = shift_in.to(f64), shift_out.to(f64)
    su, sv = g[:d, d], c[d]
    g_uu, c_uv = g[:d, :d], c[:d]
    if bias:
        mean_u, mean_v = su / n, sv / n
        a = g_uu - torch.outer(su, mean_u)
        b = c_uv - torch.outer(su, mean_v)
        noise_ref = a
    else:
        a = g_uu + torch.outer(s, su) + torch.outer(su, s) + n * torch.outer(s, s)
        b = c_uv + torch.outer(su, t) + torch.outer(s, sv) + n * torch.outer(s, t)
        noise_ref = g_uu
    a = 0.5 * (a + a.t())
    diag = noise_ref.diagonal().clamp_min(0)
    scale, mean_eig = float(diag.max()), float(diag.sum()) / d
    floor = rcond * scale
    if not bias:  # forming H^T H from the shifted stats rounds at eps64 of its own size
        floor += (d + 1) * EPS_FLOAT64 * float(a.diagonal().max())
    if ridge is None:
        ridge_chol, ridge_eig = eps_acc * mean_eig, 0.0
    else:
        ridge_chol = ridge_eig = ridge * mean_eig
    x, dropped = _sym_solve(a, b, ridge_chol, ridge_eig, floor, rcond if bias else 0.0)
    if not bias:
        return x.t(), None
    mean_x, mean_y = s + mean_u, t + mean_v
    if dropped is not None and ridge_eig == 0.0:
        # Minimum norm over [W, b] among the least-squares solutions W^T = x + Z z, b = ybar - W xbar.
        az = dropped.t() @ mean_x
        resid = mean_y - mean_x @ x
        x = x + dropped @ torch.outer(az, resid) / (1.0 + az.dot(az))
    return x.t(), mean_y - mean_x @ x


# --------------------------------------------------------------------------------- the accumulators
def _check_features(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"StreamingLstsq: {name} must be an int, got {type(value).__name__}")
    if value < 1:
        raise ValueError(f"StreamingLstsq: {name} must be at least 1, got {value}")
    return value


class StreamingLstsq:
    """Accumulates the least-squares stats of (h_in, h_out) batches and solves for a linear map.

    Args:
        in_features, out_features: widths of h_in and h_out.
        bias: solve for [W, b] (True) or W alone (False).
        device: where the float64 state lives; None: the device of the first update. Every update must be
            on that device.
        backend: of the fused accumulation op: "auto", "torch", "cpu", "triton", "cuda".

    State: gram (in + 1, in + 1) and cross (in + 1, out) float64, and the float32 shift; O(in * (in + out)).
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None, *,
                 backend: str = "auto") -> None:
        self.in_features = _check_features("in_features", in_features)
        self.out_features = _check_features("out_features", out_features)
        if not isinstance(bias, bool):
            raise TypeError(f"StreamingLstsq: bias must be a bool, got {type(bias).__name__}")
        if backend not in ("auto",) + BACKENDS:
            raise ValueError(f"StreamingLstsq: backend must be one of auto, {', '.join(BACKENDS)}; got {backend!r}")
        self.bias = bias
        self.backend = backend
        self.device = None if device is None else torch.device(device)
        self.num_updates = 0  # update() calls so far, counting failed ones: errors name the call
        self.num_tokens = 0
        self.gram: Optional[Tensor] = None
        self.cross: Optional[Tensor] = None
        self.shift_in: Optional[Tensor] = None
        self.shift_out: Optional[Tensor] = None
        self._exact = True  # every batch so far accumulated in float64

    @staticmethod
    def multi(in_features: int, out_features_list: Sequence[int], bias: bool = True, device=None, *,
              backend: str = "auto") -> "MultiTargetLstsq":
        """A MultiTargetLstsq: one Gram matrix of h_in shared by several targets."""
        return MultiTargetLstsq(in_features, out_features_list, bias=bias, device=device, backend=backend)

    # ---------------------------------------------------------------------------------------- update
    @torch.no_grad()
    def update(self, h_in: Tensor, h_out: Tensor) -> "StreamingLstsq":
        """Adds one batch: h_in (..., in_features), h_out (..., out_features) with as many rows."""
        self.num_updates += 1
        where = f"update {self.num_updates}"
        for name, t, width in (("h_in", h_in, self.in_features), ("h_out", h_out, self.out_features)):
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"{where}: {name} must be a torch.Tensor, got {type(t).__name__}")
            if t.dtype not in _lstsq_ops.FLOAT_DTYPES:
                raise TypeError(f"{where}: {name} must be float32, float16, bfloat16 or float64, got {t.dtype}")
            if t.dim() < 1 or t.shape[-1] != width:
                raise ValueError(
                    f"{where}: {name} must have shape (..., {width}) ({name[2:]}_features = {width}), "
                    f"got {tuple(t.shape)}"
                )
        x = h_in.reshape(-1, self.in_features)
        y = h_out.reshape(-1, self.out_features)
        if x.shape[0] != y.shape[0]:
            raise ValueError(
                f"{where}: h_in and h_out must hold the same number of rows (tokens), got {x.shape[0]} "
                f"(shape {tuple(h_in.shape)}) and {y.shape[0]} (shape {tuple(h_out.shape)})"
            )
        if x.device != y.device:
            raise ValueError(f"{where}: h_in is on {x.device} but h_out on {y.device}")
        if self.device is not None and x.device != self.device:
            raise ValueError(f"{where}: the activations are on {x.device} but this solver's state is on {self.device}")
        n = x.shape[0]
        if n == 0:
            return self
        if self.shift_in is None:
            # The first batch's means: keeps the float32 products centred (module docstring, point 1).
            shift_in = torch.mean(x, 0, dtype=torch.float64 if x.dtype == torch.float64 else torch.float32).float()
            shift_out = torch.mean(y, 0, dtype=torch.float64 if y.dtype == torch.float64 else torch.float32).float()
        else:
            shift_in, shift_out = self.shift_in, self.shift_out
        name = _resolve_lstsq_backend(self.backend, x, y)
        check_accumulate_args(x, y, shift_in, shift_out, name)
        if name == "torch":
            gram, cross = torch_lstsq_accumulate(x, y, shift_in, shift_out)
        else:
            gram, cross = ACCUMULATE_OPS[name](x, y, shift_in, shift_out)
        # One reduction per stat: NaN and inf propagate through a sum (a finite sum overflowing near 1e308
        # is reported too, as an overflow, after the inputs are checked).
        if not bool(torch.isfinite(gram.sum() + cross.sum())):
            self._raise_non_finite(where, x, y, shift_in)
        # Commit only now: a failed update leaves the state as it was.
        if self.gram is None:
            self.device = x.device
            self.shift_in, self.shift_out = shift_in, shift_out
            self.gram, self.cross = gram, cross
        else:
            self.gram += gram
            self.cross += cross
        self.num_tokens += n
        self._exact = self._exact and (name == "torch" or (x.dtype == torch.float64 or y.dtype == torch.float64))
        return self

    @staticmethod
    def _raise_non_finite(where: str, x: Tensor, y: Tensor, shift_in: Tensor) -> None:
        if not bool(torch.isfinite(x).all()):
            raise ValueError(f"{where}: h_in contains NaN or inf")
        if not bool(torch.isfinite(y).all()):
            raise ValueError(f"{where}: h_out contains NaN or inf")
        raise ValueError(
            f"{where}: the accumulated products overflowed although h_in and h_out are finite (activations "
            f"too large for float32 products, |h - mean| near 1e19); scale them down"
        )

    # ----------------------------------------------------------------------------------------- solve
    def _check_ready(self, what: str) -> None:
        if self.gram is None:
            raise RuntimeError(
                f"{what}: no tokens accumulated yet ({self.num_updates} update(s) with data so far); call "
                f"update(h_in, h_out) before solve()"
            )

    @property
    def eps_acc(self) -> float:
        """The working precision of the accumulated stats (module docstring)."""
        return EPS_FLOAT64 if self._exact else EPS_FLOAT32

    @torch.no_grad()
    def solve_float64(self, ridge: Optional[float] = None, *, rcond: Optional[float] = None,
                      columns: Optional[slice] = None) -> Tuple[Tensor, Optional[Tensor]]:
        """solve() in float64, optionally for a slice of the output columns."""
        self._check_ready("StreamingLstsq.solve")
        cross, shift_out = self.cross, self.shift_out
        if columns is not None:
            cross, shift_out = cross[:, columns], shift_out[columns]
        return solve_from_stats(self.gram, cross, self.shift_in, shift_out, bias=self.bias, ridge=ridge,
                                rcond=rcond, eps_acc=self.eps_acc)

    def solve(self, ridge: Optional[float] = None, *, rcond: Optional[float] = None) -> Tuple[Tensor, Optional[Tensor]]:
        """weight (out, in) and bias (out,) in float32 (bias None when bias=False).

        ridge: None (a ridge at the stats' rounding level, with the minimum-norm fallback), or a float >= 0
            relative to trace(Cxx) / in_features (0: plain least squares). rcond: the relative eigenvalue
            cutoff, default (in_features + 1) * eps_acc. See the module docstring.
        """
        w, b = self.solve_float64(ridge, rcond=rcond)
        return w.float().contiguous(), (None if b is None else b.float().contiguous())


class MultiTargetLstsq:
    """Several least-squares targets sharing one input: one Gram matrix, one pass per batch.

    update(h_in, [h_out_0, h_out_1, ...]) concatenates the targets along features and accumulates one
    (gram, cross); solve(i) and solve_all() split the cross matrix (solve_all factorizes the Gram once).
    """

    def __init__(self, in_features: int, out_features_list: Sequence[int], bias: bool = True, device=None, *,
                 backend: str = "auto") -> None:
        if isinstance(out_features_list, int) or not isinstance(out_features_list, (list, tuple)):
            raise TypeError("MultiTargetLstsq: out_features_list must be a list or tuple of ints")
        if len(out_features_list) == 0:
            raise ValueError("MultiTargetLstsq: out_features_list must name at least one target")
        self.out_features_list = [_check_features(f"out_features_list[{i}]", o) for i, o in enumerate(out_features_list)]
        self.offsets = [0]
        for o in self.out_features_list:
            self.offsets.append(self.offsets[-1] + o)
        self._solver = StreamingLstsq(in_features, self.offsets[-1], bias, device, backend=backend)

    def __len__(self) -> int:
        return len(self.out_features_list)

    def __getattr__(self, name):  # in_features, bias, device, num_tokens, num_updates, ... of the shared solver
        if name.startswith("_"):
            raise AttributeError(name)
        return getattr(self._solver, name)

    @torch.no_grad()
    def update(self, h_in: Tensor, h_outs: Sequence[Tensor]) -> "MultiTargetLstsq":
        if isinstance(h_outs, torch.Tensor) or not isinstance(h_outs, (list, tuple)):
            raise TypeError("MultiTargetLstsq.update: h_outs must be a list or tuple of tensors, one per target")
        if len(h_outs) != len(self):
            raise ValueError(f"MultiTargetLstsq.update: expected {len(self)} targets, got {len(h_outs)}")
        for i, (t, o) in enumerate(zip(h_outs, self.out_features_list)):
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"MultiTargetLstsq.update: h_outs[{i}] must be a tensor, got {type(t).__name__}")
            if t.dim() < 1 or t.shape[-1] != o:
                raise ValueError(f"MultiTargetLstsq.update: h_outs[{i}] must have shape (..., {o}), got {tuple(t.shape)}")
        rows = [t.reshape(-1, t.shape[-1]) for t in h_outs]
        if len({r.shape[0] for r in rows}) != 1:
            raise ValueError(
                f"MultiTargetLstsq.update: every target must hold as many rows, got {[r.shape[0] for r in rows]}"
            )
        dtype = rows[0].dtype
        for r in rows[1:]:
            dtype = torch.promote_types(dtype, r.dtype)
        y = rows[0] if len(rows) == 1 else torch.cat([r.to(dtype) for r in rows], 1)
        self._solver.update(h_in, y)
        return self

    def _columns(self, i: int) -> slice:
        if isinstance(i, bool) or not isinstance(i, int):
            raise TypeError(f"MultiTargetLstsq.solve: the target index must be an int, got {type(i).__name__}")
        if not -len(self) <= i < len(self):
            raise IndexError(f"MultiTargetLstsq.solve: target {i} is outside [0, {len(self)})")
        i %= len(self)
        return slice(self.offsets[i], self.offsets[i + 1])

    def solve(self, i: int, ridge: Optional[float] = None, *, rcond: Optional[float] = None):
        """(weight, bias) of target i, float32."""
        w, b = self._solver.solve_float64(ridge, rcond=rcond, columns=self._columns(i))
        return w.float().contiguous(), (None if b is None else b.float().contiguous())

    def solve_all(self, ridge: Optional[float] = None, *, rcond: Optional[float] = None) -> List[tuple]:
        """[(weight, bias) per target], from one factorization of the shared Gram."""
        w, b = self._solver.solve_float64(ridge, rcond=rcond)
        out = []
        for lo, hi in zip(self.offsets[:-1], self.offsets[1:]):
            out.append((w[lo:hi].float().contiguous(), None if b is None else b[lo:hi].float().contiguous()))
        return out


def lstsq_init(h_in: Tensor, h_out: Tensor, ridge: Optional[float] = None, *, bias: bool = True,
               backend: str = "auto") -> Tuple[Tensor, Optional[Tensor]]:
    """One-shot form: the float32 (weight (out, in), bias (out,)) solving min ||[h_in, 1][W, b]^T - h_out||."""
    for name, t in (("h_in", h_in), ("h_out", h_out)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"lstsq_init: {name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() < 1:
            raise ValueError(f"lstsq_init: {name} must have at least one dimension (..., features)")
    solver = StreamingLstsq(h_in.shape[-1], h_out.shape[-1], bias, h_in.device, backend=backend)
    return solver.update(h_in, h_out).solve(ridge)
