"""Closed-form group decompositions (method.md §3): covariances and weights in, narrower weights out.

Conventions: row-token activations X (n x d_in) and a layer computes X W, so every weight here is
(d_in x d_out), the transpose of ``nn.Linear.weight``. A bias is handled by the caller as an extra
input row (augmented activation [x, 1]). All math runs in float64; no I/O, no diffusers.

Predicted errors are "whitened" errors under the regularised covariance: the mean over tokens of
the squared error of the module's output (QK: the per-head logits before the 1/sqrt(d) scale,
summed over heads; VO and FFN: the output features). With ``reg=0`` and full-rank statistics they
equal the error measured on the calibration activations exactly.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Mapping, Sequence

import torch
from torch import Tensor

DEFAULT_REG = 1e-3


def regularize(cov: Tensor, reg: float) -> Tensor:
    """C + reg * (trace(C)/d) * I, in float64.

    An all-zero C (an input never active) has trace 0 and stays zero: the formula adds nothing, and
    ``whitening`` reports it as a zero covariance. A negative or non-finite trace is not a second moment.
    """
    if reg < 0 or reg != reg:
        raise ValueError(f"regularisation must be a number >= 0, got {reg}")
    cov = cov.to(torch.float64)
    d = cov.shape[-1]
    trace = torch.diagonal(cov).sum()
    if not bool(torch.isfinite(trace)) or trace < 0:
        raise ValueError(f"covariance of width {d} has trace {float(trace)}; a second moment has a finite trace >= 0 "
                         "(the statistics are corrupt: re-run the capture)")
    if reg == 0:
        return cov.clone()
    return cov + reg * (trace / d) * torch.eye(d, dtype=torch.float64, device=cov.device)


@dataclass(frozen=True)
class Whitening:
    """A factor S with S S^T = C, its inverse transpose S^-T, and how it was obtained.

    ``method`` is "cholesky"; "eigh" (Cholesky failed: eigendecomposition, ``clamped`` eigenvalues raised
    to the floor, exact for a semi-definite C on its range); or "zero" (C = 0, an input never active: no
    invertible S exists, S = S^-T = I, and every truncation is exact on the data).
    """

    factor: Tensor
    inv_t: Tensor
    method: str
    clamped: int = 0

    @property
    def description(self) -> str:
        """How the factor was obtained, for the record: "cholesky", "eigh (k of d eigenvalues clamped)", "zero covariance"."""
        if self.method == "eigh":
            return f"eigh ({self.clamped} of {self.factor.shape[-1]} eigenvalues clamped)"
        if self.method == "zero":
            return "zero covariance (input never active: identity whitening, every width exact)"
        return self.method


def whitening(cov: Tensor) -> Whitening:
    """Cholesky factor of ``cov``; if Cholesky fails, an eigendecomposition with clamped eigenvalues.

    Any valid S gives the same truncated product (method.md §2). An all-zero ``cov`` has no invertible
    factor: the identity is returned with method "zero" (its callers predict error 0 at every width).
    """
    cov = cov.to(torch.float64)
    d = cov.shape[-1]
    if not bool(cov.any()):
        # the input is zero on every calibration token, so every truncation reproduces the data exactly; the
        # identity keeps the plain SVD's weights, the best choice for inputs the calibration never saw
        eye = torch.eye(d, dtype=cov.dtype, device=cov.device)
        return Whitening(eye, eye, "zero")
    factor, info = torch.linalg.cholesky_ex(cov)
    # CUDA can report success on a singular matrix, with NaNs; the CPU (some LAPACK builds) with a pivot at round-off
    # level, whose inverse would blow the whitened weights up: both go to the eigendecomposition
    if int(info) == 0 and bool(torch.isfinite(factor).all()) and _pivots_above_round_off(factor, cov):
        eye = torch.eye(d, dtype=cov.dtype, device=cov.device)
        inv_t = torch.linalg.solve_triangular(factor.T, eye, upper=True)
        return Whitening(factor, inv_t, "cholesky")
    # sound fallback for a semi-definite C (e.g. LayerNorm outputs have an exact null vector): S = V diag(sqrt(l)),
    # eigenvalues below round-off raised to a floor; the count is recorded in the decomposition's method
    eigenvalues, eigenvectors = torch.linalg.eigh((cov + cov.T) / 2)
    floor = eigenvalues.abs().max().clamp_min(1e-300) * d * torch.finfo(torch.float64).eps
    clamped = int((eigenvalues < floor).sum())
    eigenvalues = eigenvalues.clamp_min(floor)
    root = eigenvalues.sqrt()
    return Whitening(eigenvectors * root, eigenvectors / root, "eigh", clamped)


def _spd_solver(matrix: Tensor) -> tuple[Callable[[Tensor], Tensor], str]:
    """(solve, how): ``solve(rhs)`` solves matrix @ x = rhs for symmetric PSD ``matrix``, factorised once: Cholesky
    ("cholesky"), else the minimum-norm least-squares solution by a pseudo-inverse on the eigenvalues above round-off
    ("pinv (k of n eigenvalues dropped)"), which still satisfies the Nyström normal equations. A Cholesky that
    "succeeds" with a pivot at round-off level (a singular matrix) goes to the pseudo-inverse too."""
    chol, info = torch.linalg.cholesky_ex(matrix)
    # CUDA can report success on a singular matrix, with NaNs; the CPU with a round-off pivot
    if int(info) == 0 and bool(torch.isfinite(chol).all()) and _pivots_above_round_off(chol, matrix):
        return (lambda rhs: torch.cholesky_solve(rhs, chol)), "cholesky"
    eigenvalues, eigenvectors = torch.linalg.eigh((matrix + matrix.T) / 2)
    keep = eigenvalues > eigenvalues.abs().max() * matrix.shape[-1] * torch.finfo(torch.float64).eps
    inv = torch.where(keep, 1.0 / eigenvalues.where(keep, torch.ones_like(eigenvalues)), torch.zeros_like(eigenvalues))
    how = f"pinv ({matrix.shape[-1] - int(keep.sum())} of {matrix.shape[-1]} eigenvalues dropped)"
    return (lambda rhs: eigenvectors @ (inv[:, None] * (eigenvectors.T @ rhs))), how


def _spd_solve(matrix: Tensor, rhs: Tensor) -> tuple[Tensor, str]:
    """(x, how) solving matrix @ x = rhs (``_spd_solver``)."""
    solve, how = _spd_solver(matrix)
    return solve(rhs), how


def _pivots_above_round_off(chol: Tensor, matrix: Tensor) -> bool:
    """Whether every squared pivot of the Cholesky factor ``chol`` of ``matrix`` lies above round-off level: a
    factorisation of a singular matrix can "succeed" with pivots of order eps * max diagonal."""
    pivots = torch.diagonal(chol) ** 2
    return bool(pivots.min() > _round_off(torch.diagonal(matrix).max(), matrix.shape[-1]))


def _split_heads(weight: Tensor, heads: int) -> Tensor:
    """(d_in, heads*dh) -> (heads, d_in, dh)."""
    d_in, total = weight.shape
    return weight.reshape(d_in, heads, total // heads).permute(1, 0, 2)


def _merge_heads(factors: Tensor) -> Tensor:
    """(heads, d_in, k) -> (d_in, heads*k)."""
    heads, d_in, k = factors.shape
    return factors.permute(1, 0, 2).reshape(d_in, heads * k)


def _pad_last(t: Tensor, size: int) -> Tensor:
    if t.shape[-1] == size:
        return t
    pad = torch.zeros(*t.shape[:-1], size - t.shape[-1], dtype=t.dtype, device=t.device)
    return torch.cat([t, pad], dim=-1)


def _tail_from_singular_values(singular_values: Tensor) -> Tensor:
    """tail[k] = sum over heads of sum_{i >= k} s_i^2, for k = 0..head_dim."""
    energy = (singular_values**2).sum(dim=0)
    rev = torch.flip(torch.cumsum(torch.flip(energy, [0]), 0), [0])
    return torch.cat([rev, energy.new_zeros(1)])


class _PerHeadSpectrum:
    """Shared by the per-head SVDs: singular values (heads, head_dim), their tail energy, and how the
    inputs were whitened (``method``). ``exact`` marks a group whose input was never active (zero
    covariance): every width reproduces the calibration outputs, so the predicted error is 0."""

    singular_values: Tensor
    method: str
    exact: bool

    @property
    def head_dim(self) -> int:
        return self.singular_values.shape[1]

    @property
    def tail(self) -> Tensor:
        """Predicted whitened error at every rank 0..head_dim (summed over heads)."""
        tail = _tail_from_singular_values(self.singular_values)
        return torch.zeros_like(tail) if self.exact else tail

    def method_at(self, rank: int) -> str:
        """How the decomposition was obtained, for the record (the same at every rank)."""
        _check_rank(rank, self.head_dim)
        return self.method


@dataclass(frozen=True)
class QKDecomposition(_PerHeadSpectrum):
    """Per-head whitening-SVD of the query-key product, all ranks at once.

    ``q_factors[h] = S_x^-T U diag(s)^1/2`` and ``k_factors[h] = S_y^-T V diag(s)^1/2``, columns in
    decreasing singular value order, so keeping the first ``rank`` columns is the optimal truncation.
    """

    q_factors: Tensor  # (heads, d_x, head_dim)
    k_factors: Tensor  # (heads, d_y, head_dim)
    singular_values: Tensor  # (heads, head_dim)
    method: str  # e.g. "cholesky", or "query input cholesky; key input eigh (3 of 768 eigenvalues clamped)"
    exact: bool = False

    def weights(self, rank: int) -> tuple[Tensor, Tensor]:
        """(W_q', W_k') with ``rank`` columns per head: (d_x, heads*rank), (d_y, heads*rank)."""
        _check_rank(rank, self.head_dim)
        return _merge_heads(self.q_factors[:, :, :rank]), _merge_heads(self.k_factors[:, :, :rank])


@dataclass(frozen=True)
class VODecomposition(_PerHeadSpectrum):
    """Per-head whitening-SVD of the value-output product, all ranks at once.

    ``v_factors[h] = S_y^-T U`` and ``o_factors[h] = diag(s) V^T``.
    """

    v_factors: Tensor  # (heads, d_y, head_dim)
    o_factors: Tensor  # (heads, head_dim, d_out)
    singular_values: Tensor  # (heads, head_dim)
    method: str  # the value input's whitening, e.g. "cholesky"
    exact: bool = False

    def weights(self, rank: int) -> tuple[Tensor, Tensor]:
        """(W_v', W_o') with ``rank`` per head: (d_y, heads*rank), (heads*rank, d_out)."""
        _check_rank(rank, self.head_dim)
        heads = self.o_factors.shape[0]
        w_v = _merge_heads(self.v_factors[:, :, :rank])
        w_o = self.o_factors[:, :rank, :].reshape(heads * rank, -1)
        return w_v, w_o


def _check_rank(rank: int, head_dim: int) -> None:
    if not 1 <= rank <= head_dim:
        raise ValueError(f"rank must be in 1..{head_dim}, got {rank}")


def decompose_qk(w_q: Tensor, w_k: Tensor, cov_x: Tensor, cov_y: Tensor, heads: int, reg: float = DEFAULT_REG) -> QKDecomposition:
    """Whitening-SVD of A_h = S_x^T W_q^h (W_k^h)^T S_y for every head (cheap form: thin QRs + small SVD).

    ``w_q`` (d_x, heads*dh) and ``w_k`` (d_y, heads*dh) in X W layout; ``cov_x``/``cov_y`` are the
    second moments of the query input and key input.
    """
    if w_q.shape[1] != w_k.shape[1] or w_q.shape[1] % heads:
        raise ValueError(f"query/key widths {w_q.shape[1]}/{w_k.shape[1]} do not split into {heads} equal heads")
    head_dim = w_q.shape[1] // heads
    white_x = whitening(regularize(cov_x, reg))
    white_y = white_x if cov_y is cov_x else whitening(regularize(cov_y, reg))
    wq_heads = _split_heads(w_q.to(torch.float64), heads)
    wk_heads = _split_heads(w_k.to(torch.float64), heads)
    q_white = white_x.factor.T @ wq_heads  # (heads, d_x, dh)
    k_white = white_y.factor.T @ wk_heads
    basis_q, r_q = torch.linalg.qr(q_white)  # (heads, d_x, m), (heads, m, dh)
    basis_k, r_k = torch.linalg.qr(k_white)
    core = r_q @ r_k.transpose(1, 2)
    u_core, singular_values, vh_core = torch.linalg.svd(core, full_matrices=False)
    root = singular_values.sqrt()
    q_factors = white_x.inv_t @ (basis_q @ u_core) * root[:, None, :]
    k_factors = white_y.inv_t @ (basis_k @ vh_core.transpose(1, 2)) * root[:, None, :]
    if white_y is white_x or white_x.description == white_y.description:
        method = white_x.description
    else:
        method = f"query input {white_x.description}; key input {white_y.description}"
    exact = "zero" in (white_x.method, white_y.method)  # logits are 0 on every calibration token whatever the weights
    return QKDecomposition(_pad_last(q_factors, head_dim), _pad_last(k_factors, head_dim), _pad_last(singular_values, head_dim),
                           method, exact)


def decompose_vo(w_v: Tensor, w_o: Tensor, cov_y: Tensor, heads: int, reg: float = DEFAULT_REG) -> VODecomposition:
    """Whitening-SVD of B_h = S_y^T W_v^h W_o^h for every head.

    ``w_v`` (d_y, heads*dh), ``w_o`` (heads*dh, d_out) in X W layout; ``cov_y`` is the value input's
    second moment.
    """
    if w_v.shape[1] != w_o.shape[0] or w_v.shape[1] % heads:
        raise ValueError(f"value width {w_v.shape[1]} and output rows {w_o.shape[0]} do not split into {heads} equal heads")
    head_dim = w_v.shape[1] // heads
    white_y = whitening(regularize(cov_y, reg))
    wv_heads = _split_heads(w_v.to(torch.float64), heads)
    wo_heads = w_o.to(torch.float64).reshape(heads, head_dim, -1)
    basis, r_v = torch.linalg.qr(white_y.factor.T @ wv_heads)  # (heads, d_y, m), (heads, m, dh)
    u_core, singular_values, vh = torch.linalg.svd(r_v @ wo_heads, full_matrices=False)
    v_factors = white_y.inv_t @ (basis @ u_core)
    o_factors = singular_values[:, :, None] * vh
    m = singular_values.shape[1]
    if m < head_dim:
        o_factors = torch.cat([o_factors, o_factors.new_zeros(heads, head_dim - m, o_factors.shape[2])], dim=1)
    return VODecomposition(_pad_last(v_factors, head_dim), o_factors, _pad_last(singular_values, head_dim),
                           white_y.description, white_y.method == "zero")


def decompose_lowrank(w: Tensor, cov_x: Tensor, reg: float = DEFAULT_REG) -> VODecomposition:
    """Whitening-SVD of one linear, B = S_x^T W (method.md §6, adaLN modulation): rank-k factors
    ``W ~ (S_x^-T U_k)(diag(s_k) V_k^T)``, all ranks at once, as a one-head ``VODecomposition`` whose value factor
    is the first linear (d_in x k) and output factor the second (k x d_out). ``w`` (d_in, d_out) in X W layout
    without its bias (the bias stays on the second linear: it does not change the error)."""
    if w.dim() != 2 or cov_x.shape != (w.shape[0], w.shape[0]):
        raise ValueError(f"weight {tuple(w.shape)} and input covariance {tuple(cov_x.shape)} do not match")
    white = whitening(regularize(cov_x, reg))
    u, singular_values, vh = torch.linalg.svd(white.factor.T @ w.to(torch.float64), full_matrices=False)
    first = white.inv_t @ u  # (d_in, m)
    second = singular_values[:, None] * vh  # (m, d_out)
    return VODecomposition(first[None], second[None], singular_values[None], white.description, white.method == "zero")


@dataclass(frozen=True)
class FFNDecomposition:
    """Nyström channel selection of an FFN hidden layer by ridge leverage (method.md §3).

    ``cov_hidden`` is the regularised second moment of the down projection's input, ``w_down``
    (f, d_out) in X W layout, ``rank`` the number of its eigenvalues above round-off. Below that rank
    channels are chosen by ridge leverage; from it on (only a rank-deficient covariance, e.g. ``reg=0``)
    the ridge is 0 and the leverage undefined, and a pivoted Cholesky picks channels whose columns span
    the covariance's range, an exact selection (Nyström residual 0).
    """

    cov_hidden: Tensor
    w_down: Tensor
    eigenvalues: Tensor | None  # descending (None: the channel sets were chosen beforehand, ``chosen``)
    eigenvectors_sq: Tensor | None  # (f, f): squared eigenvector entries, rows = channels
    rank: int
    # width -> kept channels, chosen by an earlier decomposition of the same statistics (the score stage's, read back
    # from a ``slimdiff.decomposition.factorisations.FactorisationStore``): no eigendecomposition needed to apply one of these widths
    chosen: Mapping[int, Tensor] | None = None
    _solves: dict = field(default_factory=dict, init=False, compare=False, repr=False)  # the last width's solve

    @property
    def full_width(self) -> int:
        return self.cov_hidden.shape[0]

    @property
    def method(self) -> str:
        """How channels are selected, for the record."""
        if self.rank == 0:
            return "zero covariance (input never active: any selection is exact)"
        if self.rank == self.full_width:
            return "ridge leverage"
        return f"ridge leverage below width {self.rank}, pivoted Cholesky (exact) from width {self.rank} = the covariance's rank"

    def method_at(self, width: int) -> str:
        """How the selection and the down-projection solve at ``width`` were obtained, e.g. "ridge leverage, cholesky solve"."""
        _check_width(width, self.full_width)
        if width == self.full_width:
            selection = "all channels"
        elif self.rank == 0:
            selection = "zero covariance (input never active: any selection is exact)"
        elif width >= self.rank:
            selection = f"pivoted Cholesky (covariance rank {self.rank} <= width: exact)"
        else:
            selection = "ridge leverage"
        return f"{selection}, {self._solve(width)[2]} solve"

    def _positive_eigenvalues(self) -> Tensor:
        """The eigenvalues with those at round-off level (beyond ``rank``) set to 0."""
        if self.eigenvalues is None:
            raise ValueError("this decomposition holds recorded channel sets, not the eigendecomposition")
        values = self.eigenvalues.clone()
        values[self.rank:] = 0
        return values

    def ridge_leverage(self, width: int) -> Tensor:
        """l_j = [C (C + lam I)^-1]_jj with lam = (sum of eigenvalues beyond ``width``) / ``width``.

        For ``width`` >= rank, lam = 0: the limit lam -> 0+, the leverage of C's range, [V_r V_r^T]_jj.
        """
        _check_width(width, self.full_width)
        values = self._positive_eigenvalues()
        lam = values[width:].sum() / width
        if lam <= 0:
            return self.eigenvectors_sq @ (values > 0).to(values.dtype)
        return self.eigenvectors_sq @ (values / (values + lam))

    def channels(self, width: int) -> Tensor:
        """Indices of the ``width`` kept channels, ascending."""
        _check_width(width, self.full_width)
        if width == self.full_width:
            return torch.arange(width, device=self.cov_hidden.device)
        if self.chosen is not None:
            if width not in self.chosen:
                raise ValueError(f"no channel set was recorded for width {width} (recorded: {len(self.chosen)} widths); "
                                 "re-run the score stage")
            return self.chosen[width].to(self.cov_hidden.device)
        if width >= self.rank:
            return _spanning_channels(self.cov_hidden, width, self.rank)
        leverage = self.ridge_leverage(width)
        # stable tie-break by channel index keeps the choice deterministic
        order = torch.argsort(-leverage, stable=True)
        return torch.sort(order[:width]).values

    def channel_sets(self, widths: Sequence[int]) -> dict[int, Tensor]:
        """The kept channels at each of ``widths`` (what ``channels`` gives), the ridge leverages of all of them from
        one matrix product: what a later process needs to apply any of these widths without the eigendecomposition."""
        widths = [int(w) for w in widths]
        for width in widths:
            _check_width(width, self.full_width)
        if self.chosen is not None:
            return {w: self.channels(w) for w in widths}
        sets: dict[int, Tensor] = {}
        by_leverage = [w for w in widths if w < min(self.rank, self.full_width)]
        if by_leverage:
            values = self._positive_eigenvalues()
            tails = torch.flip(torch.cumsum(torch.flip(values, [0]), 0), [0])  # tails[k] = sum of eigenvalues from k
            lam = torch.stack([tails[w] / w for w in by_leverage])
            weights = values[:, None] / (values[:, None] + lam[None, :])  # (f, widths): lam > 0 below the rank
            leverage = self.eigenvectors_sq @ weights
            for column, width in enumerate(by_leverage):
                order = torch.argsort(-leverage[:, column], stable=True)
                sets[width] = torch.sort(order[:width]).values
        for width in widths:
            if width not in sets:
                sets[width] = self.channels(width)
        return {w: sets[w] for w in widths}

    def _solve(self, width: int) -> tuple[Tensor, Tensor, str, Callable[[Tensor], Tensor]]:
        """(kept channels, corrected down projection, how it was solved, the factorised solve) at ``width``; factorised
        once per width."""
        if width not in self._solves:
            keep = self.channels(width)
            cov_kept = self.cov_hidden[keep][:, keep]
            rhs = self.cov_hidden[keep] @ self.w_down
            # the last width only: applying one width asks for it four times (weights, error, method, the LoRA map's
            # correction); a curve of many widths would otherwise keep a (width x d_out) solution per width
            self._solves.clear()
            solve, how = _spd_solver(cov_kept)
            self._solves[width] = (keep, solve(rhs), how, solve)
        return self._solves[width]

    def weights(self, width: int) -> tuple[Tensor, Tensor]:
        """(kept channel indices, W_d' = C[S,S]^-1 C[S,:] W_d of shape (width, d_out))."""
        keep, w_new, _, _ = self._solve(width)
        return keep, w_new

    def correction(self, width: int) -> tuple[Tensor, Tensor]:
        """(kept channels, ``T = C_SS^-1 C_S,removed`` (width x removed, removed ascending)): the corrected down
        projection is ``W_d[S] + T W_d[removed]``, the same map applied to any delta of ``W_d`` (a LoRA's)."""
        keep, _, _, solve = self._solve(width)  # the factorisation the weights used
        mask = torch.ones(self.full_width, dtype=torch.bool, device=self.cov_hidden.device)
        mask[keep] = False
        removed = torch.nonzero(mask).flatten()
        return keep, solve(self.cov_hidden[keep][:, removed])

    @property
    def output_energy(self) -> float:
        """trace(W_d^T C W_d): the down projection's output energy, what ``error`` is relative to."""
        return float(torch.einsum("ic,ij,jc->", self.w_down, self.cov_hidden, self.w_down))

    def error(self, width: int) -> float:
        """Nyström residual trace(W_d^T (C - C[:,S] C[S,S]^-1 C[S,:]) W_d) for the selection at ``width``."""
        keep, w_new = self.weights(width)
        total = torch.einsum("ic,ij,jc->", self.w_down, self.cov_hidden, self.w_down)
        explained = torch.einsum("kc,kc->", self.cov_hidden[keep] @ self.w_down, w_new)
        return float((total - explained).clamp_min(0))

    def tail(self, widths: Sequence[int]) -> Tensor:
        """Predicted output error at each of ``widths``."""
        return torch.tensor([self.error(int(w)) for w in widths], dtype=torch.float64, device="cpu")


def _round_off(matrix_max: Tensor, size: int) -> Tensor:
    """The level below which an eigenvalue (or a residual variance) of a size x size PSD matrix is round-off."""
    return matrix_max * size * torch.finfo(torch.float64).eps


def _spanning_channels(cov: Tensor, width: int, rank: int) -> Tensor:
    """``width`` channels, ascending, whose columns span the range of ``cov`` (rank <= width): greedy pivoted
    Cholesky, the channel of largest residual variance first, for up to ``rank`` pivots; the rest by variance
    (they add nothing). C[:,S] C[S,S]^+ C[S,:] = C for such S, so the Nyström residual is 0."""
    size = cov.shape[0]
    variance = torch.diagonal(cov)
    residual = variance.clone()
    tolerance = _round_off(residual.max(), size)
    columns = cov.new_zeros(size, rank)
    chosen: list[int] = []
    for i in range(rank):
        pivot = int(torch.argmax(residual))  # the first of equal maxima: deterministic
        if not residual[pivot] > tolerance:
            break
        column = (cov[:, pivot] - columns[:, :i] @ columns[pivot, :i]) / residual[pivot].sqrt()
        columns[:, i] = column
        residual = residual - column**2
        residual[pivot] = -torch.inf
        chosen.append(pivot)
    rest = torch.ones(size, dtype=torch.bool, device=cov.device)
    rest[chosen] = False
    rest = torch.nonzero(rest).flatten()
    fill = rest[torch.argsort(-variance[rest], stable=True)][: width - len(chosen)]
    keep = torch.cat([torch.tensor(chosen, dtype=torch.long, device=cov.device), fill])
    return torch.sort(keep).values


def _check_width(width: int, full_width: int) -> None:
    if not 1 <= width <= full_width:
        raise ValueError(f"FFN width must be in 1..{full_width}, got {width}")


def decompose_ffn(w_down: Tensor, cov_hidden: Tensor, reg: float = DEFAULT_REG) -> FFNDecomposition:
    """Prepare Nyström channel selection for an FFN: one eigendecomposition serves every width."""
    if w_down.shape[0] != cov_hidden.shape[0]:
        raise ValueError(f"down projection has {w_down.shape[0]} input channels but the covariance is {tuple(cov_hidden.shape)}")
    cov = regularize(cov_hidden, reg)
    eigenvalues, eigenvectors = torch.linalg.eigh((cov + cov.T) / 2)
    eigenvalues, eigenvectors = torch.flip(eigenvalues, [0]), torch.flip(eigenvectors, [1])
    rank = int((eigenvalues > _round_off(eigenvalues.abs().max(), eigenvalues.shape[0])).sum())
    return FFNDecomposition(cov, w_down.to(torch.float64), eigenvalues, eigenvectors**2, rank)
