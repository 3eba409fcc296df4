"""Streaming least-squares init of stitching layers.

    solver = esta_kernels.StreamingLstsq(in_features, out_features, bias=True, device=None, backend="auto")
    solver.update(h_in, h_out)            # any number of batches, (..., in) and (..., out), any float dtype
    weight, bias = solver.solve()         # (out, in) and (out,), float32
    weight, bias = esta_kernels.lstsq_init(h_in, h_out)                   # one shot
    multi = esta_kernels.StreamingLstsq.multi(in_features, [out_1, out_2])  # one Gram, several targets
    multi.update(h_in, [h_out_1, h_out_2]); multi.solve(1); multi.solve_all()

They solve min ||[H_in, 1] [W, b]^T - H_out|| over every token seen (without the ones column for
bias=False). The state is O(in * (in + out)) float64, whatever the number of tokens.

What is accumulated. The state is the merged centred statistics of every token seen, in float64:
    n, mean_in, mean_out, Sxx = sum (x - mean_in)(x - mean_in)^T, Sxy = sum (x - mean_in)(y - mean_out)^T.
Each batch is cut into blocks of 1024 rows (SHIFT_BLOCK_ROWS). A pre-pass takes each block's column sums in
float64; the block's shift is its mean rounded to float32. The fused op esta::lstsq_accumulate (backends
torch / cpu / triton / cuda) then reads the batch once and, with each row centred by its own block's shift
(u = h_in - s_b, v = h_out - t_b, ua = [u, 1]), returns the float64 sums of the block products ua^T ua and
ua^T v. From those and the exact float64 block sums the batch's centred statistics follow, and batches
merge into the state by Chan et al.'s pairwise update:
    Sxx = sum over blocks of (U_b^T U_b - su_b su_b^T / n_b) + sum over blocks of n_b (m_b - m)(m_b - m)^T
    merge (n1, m1, S1) + (n2, m2, S2): S = S1 + S2 + n1 n2 / (n1 + n2) (m2 - m1)(m2 - m1)^T
(su_b = n_b (m_b - s_b), the block sum of u). Every term is a sum of positive semidefinite parts computed
from centred numbers: nothing cancels, so the accuracy does not depend on where later batches lie
relative to earlier ones (a batch 10^4 standard deviations away from the first is as accurate as the first).

Error analysis (why float32 centred block products, float64 merge, float64 solve):
  1. Centring. u = fl(h - s_b) is exact when h lies within a factor 2 of s_b (Sterbenz) and otherwise off
     by at most 2^-24 |u|: the perturbation is relative to the spread of the block's rows, not to their
     mean. Without the shift, the float32 products carry errors ~2^-24 n mean^2 and the later subtraction
     n mean mean^T cancels them only to that absolute level, losing log10(mean^2 / var) digits. Each
     block's own shift keeps that true wherever the block lies; rows of one block that lie far apart from
     one another (a block mixing two distant clusters) are a limit: their products are relative to the
     block's spread. Float16/bfloat16 inputs convert to float32 exactly.
  2. Block products. Each entry is a float32 dot product over at most 1024 rows: a worst-case relative
     error of 1024 * 2^-24 = 6e-5 of sum |u_i u_j|, typically sqrt(1024) * 2^-24 = 2e-6 (rounding errors
     of random sign). The block results and the merge are float64 (error ~2^-53 per addition), so
     streaming over millions of tokens adds nothing: independent block errors stay at that relative level.
     So the stats are those of data perturbed by a relative delta ~ 2e-6 (6e-5 at worst). Never TF32
     (2^-11 would give delta ~ 1e-3). float64 products would halve the CPU's speed and cost ~60x on GPUs
     without fast FP64, for digits the normal equations (below) cannot use at the conditioning where they
     are accurate.
  3. The solve in float64 (Cholesky) adds ~kappa * 1e-16.
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
  - bias=False solves the uncentred normal equations H^T H W^T = H^T Y, H^T H = Sxx + n mean mean^T (its
    rank threshold measured against Sxx), by the same Cholesky / eigen pseudo-inverse.
Finite input never gives NaN (eigenvalues are inverted only above a positive floor). A solution too large
for float32 (inputs near 1e-25 with targets near 1e25, say) raises OverflowError from `solve()`;
`solve_float64()` returns it in float64. Non-finite activations raise ValueError naming the update
("update 3: h_in contains NaN or inf"); the check reads the batch's float64 stats (O(d^2)), and the
activations only to name the culprit; a failed update leaves the state untouched.
"""
from __future__ import annotations

import math
from typing import List, NamedTuple, Optional, Sequence, Tuple

import torch
from torch import Tensor

from esta_kernels import _lstsq_ops
from esta_kernels._lstsq_ops import ACCUMULATE_OPS
from esta_kernels.backends import BACKENDS, resolve_backend
from esta_kernels._validate import FLOAT_DTYPES, SHIFT_BLOCK_ROWS, check_accumulate_args
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
    u = h_in - shift_in and v = h_out - shift_out (see esta::lstsq_accumulate in docs/architecture.md)."""
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


def _check_rcond(rcond) -> Optional[float]:
    if rcond is None:
        return None
    if isinstance(rcond, bool) or not isinstance(rcond, (int, float)):
        raise TypeError(f"solve: rcond must be a float in [0, 1) or None, got {type(rcond).__name__}")
    if not (0 <= rcond < 1):
        raise ValueError(f"solve: rcond must be a float in [0, 1) (eigenvalues below rcond * the largest are "
                         f"dropped), got {rcond}")
    return float(rcond)


class LstsqStats(NamedTuple):
    """Centred float64 statistics of the tokens seen: count n, means, the scatter matrices
    Sxx = sum (x - mean_in)(x - mean_in)^T (d_in, d_in) and Sxy = sum (x - mean_in)(y - mean_out)^T
    (d_in, d_out), and `noise_diag` (d_in,): the sum over blocks of the diagonal of the block products
    U_b^T U_b, the size the float32 rounding of the stats is relative to (the between-block part of Sxx is
    float64)."""

    n: float
    mean_in: Tensor
    mean_out: Tensor
    sxx: Tensor
    sxy: Tensor
    noise_diag: Tensor

    def merge(self, other: "LstsqStats") -> "LstsqStats":
        """The statistics of both token sets (Chan et al.'s pairwise update: no cancellation)."""
        n = self.n + other.n
        d_in, d_out = other.mean_in - self.mean_in, other.mean_out - self.mean_out
        w = self.n * other.n / n
        return LstsqStats(n, self.mean_in + (other.n / n) * d_in, self.mean_out + (other.n / n) * d_out,
                          self.sxx + other.sxx + w * torch.outer(d_in, d_in),
                          self.sxy + other.sxy + w * torch.outer(d_in, d_out), self.noise_diag + other.noise_diag)


def block_sums(x: Tensor) -> Tuple[Tensor, Tensor]:
    """(rows per block (blocks,) float64, float64 column sums per block (blocks, d)) of x (n, d), blocks of
    SHIFT_BLOCK_ROWS rows (the last one shorter)."""
    n, d = x.shape
    rows = SHIFT_BLOCK_ROWS
    full = n // rows
    parts = []
    if full:
        parts.append(x[: full * rows].reshape(full, rows, d).sum(1, dtype=torch.float64))
    if n > full * rows:
        parts.append(x[full * rows:].sum(0, keepdim=True, dtype=torch.float64))
    blocks = -(-n // rows)
    counts = torch.full((blocks,), float(rows), dtype=torch.float64, device=x.device)
    counts[-1] = n - (blocks - 1) * rows
    return counts, torch.cat(parts) if len(parts) > 1 else parts[0]


# Columns whose largest |value| lies outside [2^-40, 2^40] are scaled by a power of two into it before the
# float32 products, whose squares would otherwise underflow (|u| below ~1e-19) or overflow (above ~1e19).
_SCALE_RANGE = 40


def column_scales(x: Tensor) -> Optional[Tensor]:
    """Per-column powers of two (float64) that bring each column's largest |value| into [2^-40, 2^40]
    (1 for columns already there, or all zero), or None when no column needs one; raises ValueError for
    non-finite values (the caller names the update)."""
    lo, hi = torch.aminmax(x, dim=0)
    amax = torch.maximum(lo.abs(), hi.abs()).double()
    if not bool(torch.isfinite(amax).all()):
        raise ValueError("contains NaN or inf")
    outside = (amax > 0) & ((amax < 2.0 ** -_SCALE_RANGE) | (amax > 2.0 ** _SCALE_RANGE))
    if not bool(outside.any()):
        return None
    return torch.exp2(torch.where(outside, -torch.round(torch.log2(amax)), torch.zeros_like(amax)))


def _unscale(stats: "LstsqStats", scale_in: Optional[Tensor], scale_out: Optional[Tensor]) -> "LstsqStats":
    """The stats of the unscaled data from those of x * scale_in, y * scale_out (exact: powers of two)."""
    ci = stats.mean_in.new_ones(stats.mean_in.shape) if scale_in is None else 1.0 / scale_in
    co = stats.mean_out.new_ones(stats.mean_out.shape) if scale_out is None else 1.0 / scale_out
    return LstsqStats(stats.n, stats.mean_in * ci, stats.mean_out * co, stats.sxx * torch.outer(ci, ci),
                      stats.sxy * torch.outer(ci, co), stats.noise_diag * ci * ci)


def batch_stats(gram: Tensor, cross: Tensor, counts: Tensor, sums_in: Tensor, sums_out: Tensor,
                shift_in: Tensor, shift_out: Tensor) -> LstsqStats:
    """A batch's centred statistics from the op's block-shifted products and the exact block sums."""
    d = sums_in.shape[1]
    n = float(counts.sum())
    s_in, s_out = shift_in.to(torch.float64), shift_out.to(torch.float64)
    # block sums of u and v (float64: exact up to the rounding of the sums)
    su, sv = sums_in - counts[:, None] * s_in, sums_out - counts[:, None] * s_out
    su_w = su / counts[:, None]
    # within blocks: U^T U - su su^T / n_b (su is tiny: each block is centred by its own rounded mean)
    sxx = gram[:d, :d] - su_w.t() @ su
    sxy = cross[:d] - su_w.t() @ sv
    # between blocks: sum of n_b (m_b - m)(m_b - m)^T, from float64 means
    mean_in, mean_out = sums_in.sum(0) / n, sums_out.sum(0) / n
    dm_in = sums_in / counts[:, None] - mean_in
    dm_out = sums_out / counts[:, None] - mean_out
    weighted = dm_in * counts[:, None]
    return LstsqStats(n, mean_in, mean_out, sxx + weighted.t() @ dm_in, sxy + weighted.t() @ dm_out,
                      gram.diagonal()[:d].clone())


def solve_from_stats(stats: LstsqStats, *, bias: bool = True, ridge: Optional[float] = None,
                     rcond: Optional[float] = None, eps_acc: float = EPS_FLOAT32,
                     columns: Optional[slice] = None) -> Tuple[Tensor, Optional[Tensor]]:
    """[W, b] from centred stats (see the module docstring), optionally for a slice of the output columns.
    Returns float64 W (d_out, d_in) and b (d_out,) (None for bias=False)."""
    ridge = _check_ridge(ridge)
    rcond = _check_rcond(rcond)
    if stats.n <= 0:
        raise RuntimeError("lstsq solve: no tokens were accumulated (call update() with data first)")
    sxy, mean_y = stats.sxy, stats.mean_out
    if columns is not None:
        sxy, mean_y = sxy[:, columns], mean_y[columns]
    d = stats.sxx.shape[0]
    mean_x, n = stats.mean_in, stats.n
    if bias:
        a, b = stats.sxx, sxy
    else:
        a = stats.sxx + n * torch.outer(mean_x, mean_x)
        b = sxy + n * torch.outer(mean_x, mean_y)
    a = 0.5 * (a + a.t())
    # The rounding level of a's entries: eps_acc of the block products (within-block sizes) plus float64
    # rounding of the rest (between-block spread, the mean term of bias=False).
    noise_diag = eps_acc * stats.noise_diag.clamp_min(0) + EPS_FLOAT64 * a.diagonal().abs()
    mean_eig = float(stats.sxx.diagonal().clamp_min(0).sum()) / d
    if rcond is None:
        floor, rcond_on_self = (d + 1) * float(noise_diag.max()), 0.0
    else:
        floor, rcond_on_self = rcond * float(a.diagonal().max()), rcond
    if ridge is None:
        ridge_chol, ridge_eig = float(noise_diag.mean()), 0.0
    else:
        ridge_chol = ridge_eig = ridge * mean_eig
    x, dropped = _sym_solve(a, b, ridge_chol, ridge_eig, floor, rcond_on_self)
    if not bias:
        return x.t(), None
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


def _to_float32(name: str, t: Optional[Tensor]) -> Optional[Tensor]:
    if t is None:
        return None
    out = t.float()
    if not bool(torch.isfinite(out).all()):
        big = float(t.abs().max())
        raise OverflowError(
            f"StreamingLstsq.solve: the least-squares {name} has entries up to {big:.3g}, beyond float32's range "
            f"(3.4e38); use solve_float64() for the float64 solution, or rescale the activations"
        )
    return out.contiguous()


class StreamingLstsq:
    """Accumulates the least-squares stats of (h_in, h_out) batches and solves for a linear map.

    Args:
        in_features, out_features: widths of h_in and h_out.
        bias: solve for [W, b] (True) or W alone (False).
        device: where the float64 state lives; None: the device of the first update. Every update must be
            on that device.
        backend: of the fused accumulation op: "auto", "torch", "cpu", "triton", "cuda".

    State (`stats`, an LstsqStats): the token count, both means and the centred scatter matrices Sxx
    (in, in) and Sxy (in, out), float64; O(in * (in + out)) whatever the number of tokens.
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
        self.stats: Optional[LstsqStats] = None
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
            if t.dtype not in FLOAT_DTYPES:
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
        name = _resolve_lstsq_backend(self.backend, x, y)
        # Extreme magnitudes (float32 squares would under- or overflow): scaled by powers of two, exactly.
        scales = []
        for arg, t in (("h_in", x), ("h_out", y)):
            try:
                scales.append(column_scales(t))
            except ValueError:
                raise ValueError(f"{where}: {arg} contains NaN or inf") from None
        scale_in, scale_out = scales
        # (in float64: a factor like 2^133 for subnormal float32 columns is beyond float32 itself)
        if scale_in is not None:
            x = (x.to(torch.float64) * scale_in).to(x.dtype)
        if scale_out is not None:
            y = (y.to(torch.float64) * scale_out).to(y.dtype)
        # Each block of rows is centred by its own mean (module docstring): float64 sums, float32 shifts.
        counts, sums_in = block_sums(x)
        _, sums_out = block_sums(y)
        wide = x.dtype == torch.float64 or y.dtype == torch.float64
        shift_dtype = torch.float64 if wide and name in ("torch", "cpu") else torch.float32
        shift_in = (sums_in / counts[:, None]).to(shift_dtype)
        shift_out = (sums_out / counts[:, None]).to(shift_dtype)
        check_accumulate_args(x, y, shift_in, shift_out, name)
        if name == "torch":
            gram, cross = torch_lstsq_accumulate(x, y, shift_in, shift_out)
        else:
            gram, cross = ACCUMULATE_OPS[name](x, y, shift_in, shift_out)
        # One reduction per stat: NaN and inf propagate through a sum (a finite sum overflowing near 1e308
        # is reported too, as an overflow, after the inputs are checked).
        if not bool(torch.isfinite(gram.sum() + cross.sum())):
            self._raise_non_finite(where, x, y)
        batch = batch_stats(gram, cross, counts, sums_in, sums_out, shift_in, shift_out)
        if scale_in is not None or scale_out is not None:
            batch = _unscale(batch, scale_in, scale_out)
        # Commit only now: a failed update leaves the state as it was.
        self.device = x.device
        self.stats = batch if self.stats is None else self.stats.merge(batch)
        self.num_tokens += n
        self._exact = self._exact and (name == "torch" or wide)
        return self

    @staticmethod
    def _raise_non_finite(where: str, x: Tensor, y: Tensor) -> None:
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
        if self.stats is None:
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
        """solve() in float64 (never overflows for finite inputs), optionally for a slice of the output columns."""
        self._check_ready("StreamingLstsq.solve")
        return solve_from_stats(self.stats, bias=self.bias, ridge=ridge, rcond=rcond, eps_acc=self.eps_acc,
                                columns=columns)

    def solve(self, ridge: Optional[float] = None, *, rcond: Optional[float] = None) -> Tuple[Tensor, Optional[Tensor]]:
        """weight (out, in) and bias (out,) in float32 (bias None when bias=False).

        ridge: None (a ridge at the stats' rounding level, with the minimum-norm fallback), or a float >= 0
            relative to trace(Cxx) / in_features (0: plain least squares). rcond: the relative eigenvalue
            cutoff in [0, 1), default (in_features + 1) * eps_acc. See the module docstring. Raises
            OverflowError when the solution does not fit float32 (solve_float64 returns it).
        """
        w, b = self.solve_float64(ridge, rcond=rcond)
        return _to_float32("weight", w), _to_float32("bias", b)


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
        return _to_float32("weight", w), _to_float32("bias", b)

    def solve_all(self, ridge: Optional[float] = None, *, rcond: Optional[float] = None) -> List[tuple]:
        """[(weight, bias) per target], from one factorization of the shared Gram."""
        w, b = self._solver.solve_float64(ridge, rcond=rcond)
        out = []
        for lo, hi in zip(self.offsets[:-1], self.offsets[1:]):
            out.append((_to_float32("weight", w[lo:hi]), None if b is None else _to_float32("bias", b[lo:hi])))
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
