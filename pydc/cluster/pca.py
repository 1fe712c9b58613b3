"""PCA-whitening as DeepCluster uses it, fitted on the device while the features stream out of the network.

Semantics (faiss.PCAMatrix(d, n_components, eigen_power) followed by row L2 normalization, as in
DeepCluster's clustering.py `preprocess_features`):

    mean = column mean of all rows seen; C = (1/n) sum (x - mean)(x - mean)^T (the population covariance);
    lambda_1 >= ... >= lambda_k and v_1 .. v_k = the top-k eigenpairs of C (torch.linalg.eigh in float64; above
    1024 features a float32 eigh refined in float64, see top_eigenpairs);
    y_i = (lambda_i + eps)^eigen_power * v_i . (x - mean);  out = y / (||y||_2 + 1e-10).

Differences from faiss, each deliberate:
- eps is added to the eigenvalues of C; faiss adds its `epsilon` to those of the unnormalized scatter matrix
  n * C, so pydc's eps = faiss's epsilon / n. With the default eps = 0 both are equal (the row
  normalization removes any common factor).
- Rank deficiency (fewer rows than features, constant or collinear columns, n_components beyond the rank):
  a component whose eigenvalue is at most `eigenvalue_floor` (default 1e-6) times the largest eigenvalue
  carries no variance but rounding noise; faiss would divide by ~0 and return Inf/NaN or amplified noise,
  pydc gives it scale 0, so its output column is 0, and warns once per fit with the number of such
  components. The remaining columns are whitened as usual.
- Eigenvector signs are fixed (the largest-magnitude entry of each is positive), so fits are reproducible;
  faiss's signs are arbitrary.
- Moments are accumulated robustly (pydc.ops.pca): values are centred on the first batch's mean in
  float64 before any product, each GEMM spans at most 4096 rows, float32 products are summed in float32
  over at most 2 * flush_rows rows and then in float64, so a million rows with a large common offset keep
  the covariance to ~1e-6 relative (faiss forms x^T x - n mean mean^T in float32, which loses every digit
  to an offset of 10^4; test_pca.py checks both).
- NaN/Inf: a row holding one is left out of the moments and partial_fit/fit raise ValueError naming how many
  rows were left out (the finite rows stay accumulated); transform raises ValueError naming how many rows
  hold NaN/Inf (MMSelfSup raises only above 0.1% of rows). On CUDA the count stays on the device, since
  reading it after every batch would stall the feature pass on a host sync: partial_fit does not raise, and
  the error names the rows left out since the last check when the fit is next needed (transform, the
  fitted attributes, get_covariance) or at the end of fit(). defer_nonfinite_check=True/False forces
  either behaviour on any device; n_samples_seen_ is exact whenever it is read.
- An empty batch passed to partial_fit changes nothing.
"""

from __future__ import annotations

import contextlib
import warnings

import torch

from pydc.ops.pca import NORM_EPS, check_features, pca_accumulate, pca_transform

_STATE_VERSION = 1
# Above this many features the top eigenpairs come from a float32 eigh refined in float64 (top_eigenpairs).
FULL_EIGH_MAX_DIM = 1024
_POWER_STEPS = 1
_FLUSH_PANEL = 256
_SHIFT_ROWS = 1024  # rows of the first batch whose mean is the moments' shift (_start)


@contextlib.contextmanager
def _cpu_threads(threads: int | None):
    """Runs the block with torch's CPU thread count set to `threads` (None: unchanged), then restores it."""
    previous = torch.get_num_threads()
    if threads is not None and threads != previous:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        if torch.get_num_threads() != previous:
            torch.set_num_threads(previous)


def _symmetric_from_upper(upper: torch.Tensor) -> torch.Tensor:
    """The symmetric matrix whose upper triangle (diagonal included) is upper's; upper's lower triangle is not
    read. In blocks of _FLUSH_PANEL rows, each mirrored while it is in the cache: triu(upper) + triu(upper, 1).T
    over the whole 2048 x 2048 float64 matrix took 37 ms on the 2-core EPYC (the transposed operand read with a
    stride of a row), the blocks 20 ms; the same values."""
    d = upper.shape[0]
    full = torch.empty_like(upper)
    for i in range(0, d, _FLUSH_PANEL):
        end = min(d, i + _FLUSH_PANEL)
        block = upper[i:end, i:end].triu()
        full[i:end, i:end] = block + block.triu(1).T
        full[i:end, end:] = upper[i:end, end:]
        full[end:, i:end] = upper[i:end, end:].T
    return full


def top_eigenpairs(covariance: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The k largest eigenvalues (descending) of a symmetric float64 matrix and their eigenvectors (columns).

    Up to FULL_EIGH_MAX_DIM features: torch.linalg.eigh in float64. Above, where the float64 eigh is the
    largest single cost of a CPU fit (D = 2048 on the 2-core CPU: 4.0-5.0 s in float64, 2.0-2.3 s in
    float32, one thread, under load): a float32 eigensolver (_top_vectors32) gives a basis V of the top
    m = k + max(64, k/2) eigenvectors; a float64 power step V <- orth(C V) damps whatever V holds of the
    eigenvectors past the m-th by lambda_{m+1}/lambda_k, and a float64 Rayleigh-Ritz step (eigh of the
    m x m matrix V^T C V) resolves the top k exactly within span(V). What remains is the float32 rounding of
    the covariance itself, the precision its float32-input Gram carries anyway (float64 features above
    FULL_EIGH_MAX_DIM get the same, not float64-exact, eigenvectors); test_pca.py compares the result with
    the full float64 eigh.
    """
    d = covariance.shape[0]
    if d <= FULL_EIGH_MAX_DIM:
        values, vectors = torch.linalg.eigh(covariance)
        return values.flip(0)[:k], vectors.flip(1)[:, :k]
    m = min(d, k + max(64, k // 2))
    scale = covariance.diagonal().abs().max().clamp_min(torch.finfo(torch.float64).tiny)  # float32 range
    scaled32 = torch.div(covariance, scale, out=covariance.new_empty((d, d), dtype=torch.float32))  # one pass
    basis = _top_vectors32(scaled32, m).to(torch.float64)
    for _ in range(_POWER_STEPS):
        basis, _ = torch.linalg.qr(covariance @ basis)
    projected = basis.T @ covariance @ basis
    values, rotation = torch.linalg.eigh((projected + projected.T) / 2)
    return values.flip(0)[:k], (basis @ rotation).flip(1)[:, :k]


def _top_vectors32(matrix: torch.Tensor, m: int) -> torch.Tensor:
    """Eigenvectors (columns, any order) of the m largest eigenvalues of a symmetric float32 matrix. On the
    CPU with scipy: LAPACK through scipy.linalg.lapack and torch.ormqr (_top_vectors_dc: tridiagonal
    reduction, divide and conquer, back-transformation of the m vectors only), scipy's BLAS threads held to
    torch's count (the caller's eigh_threads), its own pool otherwise taking every core; elsewhere, or where
    LAPACK reports a failure, torch.linalg.eigh."""
    d = matrix.shape[0]
    if matrix.device.type == "cpu" and m < d:
        try:
            import scipy.linalg.lapack  # noqa: F401 (_top_vectors_dc's)
            from threadpoolctl import threadpool_limits
        except ImportError:
            pass
        else:
            # The transpose is the same symmetric matrix in the column-major order LAPACK reads (ssytrd
            # reduces a copy, so that torch.linalg.eigh still has the matrix if LAPACK fails)
            with threadpool_limits(limits=torch.get_num_threads(), user_api="blas"):
                vectors = _top_vectors_dc(matrix.numpy().T, m)
            if vectors is not None:
                return torch.from_numpy(vectors)
    return torch.linalg.eigh(matrix)[1][:, d - m:]


def _top_vectors_dc(a, m: int):
    """The m top eigenvectors (an n x m column-major numpy array) of the symmetric float32 column-major numpy
    matrix `a` (its lower triangle read, a left as it was), or None where LAPACK reports a failure:
    ssytrd reduces a to tridiagonal T = Q^T a Q, sstevd (divide and conquer) gives T's eigenvectors, and
    torch.ormqr (MKL's sormqr) applies Q to the last m of them, those of the largest eigenvalues.

    D = 2048, m = 384 on 2 threads of an Intel Xeon (family 6 model 207, capped at AVX2): 0.34-0.40 s with
    scipy's sormqr (MKL's, now: 0.28-0.35 s; top_eigenpairs 429-491 ms against 455-507, six alternating runs,
    its vectors the same to 1.2e-8) against 0.48-0.49 s for scipy.linalg.eigh's ssyevr with the same subset,
    whose MRRR takes ~0.16 s for the 384 vectors of T where the divide and conquer takes ~0.05 s for all 2048
    (the reduction, ~0.19-0.3 s, is the same); the same residuals (2.1e-5 at eigenvalues up to 133).
    torch.linalg.eigh (MKL's ssyevd, every vector back-transformed) took 0.33-0.37 s. After top_eigenpairs'
    float64 steps, the largest principal angle to the float64 eigh's top 256 vectors (20k x 2048 benchmark
    features, and 8k rows of a 1/(i+1)^1.2 spectrum) is 1.7e-5 and 2.3e-5 (MRRR's basis: 7.4e-6 and 8.1e-6),
    the eigenvalues within 2.1e-10 relative (7.5e-12): the float32 basis leaves more of the top directions
    outside its span (4.1e-5 and 5.8e-5 at most, MRRR's 1.2e-5 and 1.3e-5), which the power step damps by
    lambda_{m+1}/lambda_k."""
    from scipy.linalg import lapack

    n = a.shape[0]
    lwork = int(lapack.ssytrd_lwork(n, lower=1)[0])
    reflectors, diagonal, off_diagonal, tau, info = lapack.ssytrd(a, lower=1, lwork=lwork)
    if info != 0:
        return None
    _, vectors, info = lapack.sstevd(diagonal, off_diagonal, overwrite_d=1, overwrite_e=1)
    if info != 0:
        return None
    top = vectors[:, n - m:]  # eigenvalues ascending; the last m columns, contiguous in column-major order
    # Q = H(1) ... H(n-1), H(i)'s vector 1 at row i + 1 and below it column i of the reflectors: the QR form
    # of the trailing (n-1) x (n-1) block, applied to rows 2..n (sormtr's lower case). torch.ormqr is MKL's
    # sormqr: 28-36 ms here against 59-97 ms for scipy's OpenBLAS one (D = 2048, m = 384, the same capped
    # Xeon), the same vectors to 1.2e-7; it raises on bad arguments, the only failure sormqr reports
    q = torch.from_numpy(reflectors)[1:, :n - 1]  # column-major views of scipy's Fortran-ordered arrays
    top[1:] = torch.ormqr(q, torch.from_numpy(tau), torch.from_numpy(top)[1:], transpose=False).numpy()
    return top


_MOMENT_KEYS = ("shift", "sum", "gram")  # gram: float64, upper triangle defined (see pydc.ops.pca)
_FIT_KEYS = ("mean", "components", "eigenvalues", "scale", "total_variance")


class PCAWhitening:
    """Streamed PCA + whitening + row L2 normalization (DeepCluster's preprocessing); see the module docstring.

    Attributes after fitting: mean_ (D, float64), components_ (n_components, D, float32; rows are unit
    eigenvectors, largest eigenvalue first), eigenvalues_ / explained_variance_ (n_components, float64),
    explained_variance_ratio_, scale_ (the per-component whitening factors, 0 for components below the floor),
    n_samples_seen_, n_features_in_.
    """

    def __init__(self, n_components: int = 256, eigen_power: float = -0.5, eps: float = 0.0, *,
                 eigenvalue_floor: float = 1e-6, fit_batch_rows: int = 65536, flush_rows: int = 8192,
                 eigh_threads: int | None = None, defer_nonfinite_check: bool | None = None):
        if not isinstance(n_components, int) or isinstance(n_components, bool) or n_components < 1:
            raise ValueError(f"PCAWhitening: expected n_components to be a positive int, got {n_components!r}")
        if eps < 0:
            raise ValueError(f"PCAWhitening: expected eps >= 0 (added to the eigenvalues), got {eps}")
        if not 0.0 <= eigenvalue_floor < 1.0:
            raise ValueError(f"PCAWhitening: expected 0 <= eigenvalue_floor < 1 (relative), got {eigenvalue_floor}")
        if fit_batch_rows < 1 or flush_rows < 1:
            raise ValueError(f"PCAWhitening: expected fit_batch_rows >= 1 and flush_rows >= 1, got {fit_batch_rows} "
                             f"and {flush_rows}")
        self.n_components = n_components
        self.eigen_power = float(eigen_power)
        self.eps = float(eps)
        self.eigenvalue_floor = float(eigenvalue_floor)
        self.fit_batch_rows = fit_batch_rows
        self.flush_rows = flush_rows
        # LAPACK's tridiagonalization (inside eigh) is ~D small parallel BLAS-2 steps, each ending in a
        # thread barrier; where the CPU is shared, every barrier waits for a time slice. Measured at D = 2048
        # on the 2-core EPYC under load ~11: eigh took 45 s with 2 threads and 3.3 s with 1 (float32 at load
        # ~4.4: 26.5 s against 0.8 s). So the CPU eigen-decomposition (top_eigenpairs: the eigh calls and
        # the small refinement GEMMs/QRs, which also ran faster on one thread there: 1.35-1.4 s against
        # 1.6-2.8 s in all) runs on eigh_threads threads (None: torch's setting); the Gram GEMMs use all.
        # On an idle machine torch's setting is faster (the float32 eigh at D = 2048: 0.40-0.44 s with 2 threads
        # against 0.80 s with 1), so it is the default; pass 1 on a shared, oversubscribed CPU.
        self.eigh_threads = eigh_threads
        # None: deferred on CUDA (no host sync per batch), checked per batch on the CPU (where it is free).
        self.defer_nonfinite_check = defer_nonfinite_check
        self.reset()

    # ----------------------------------------------------------------------------------------------- fitting
    def reset(self) -> PCAWhitening:
        """Forgets all moments and the fit."""
        self.n_features_in_: int | None = None
        self.n_samples_seen_ = 0
        self._unchecked_nonfinite: torch.Tensor | None = None  # device count of rows left out, not yet reported
        self._unchecked_rows = 0  # rows accumulated since that count was last read
        self._moments: dict[str, torch.Tensor] | None = None
        # float32 Gram that float32/16/bf16 batches' GEMMs accumulate into in place (beta = 1), added into the
        # float64 moments every flush_rows rows. Measured on the 2-core CPU at 50,000 x 2048: 12 s with it
        # against 21 s with a float64 add per 2048-row chunk (under load); its float32 sums span at most
        # 2 * flush_rows rows, which keeps the covariance to ~1e-6 relative (test_pca.py checks 10^6 rows).
        self._pending_gram: torch.Tensor | None = None
        self._pending_rows = 0
        self._fit: dict[str, torch.Tensor] | None = None
        self._projections: dict[tuple, torch.Tensor] = {}
        return self

    def partial_fit(self, batch: torch.Tensor) -> PCAWhitening:
        """Adds one batch of features (rows) to the moments, on the batch's device."""
        total, bad = self._accumulate(batch)
        if bad:  # None when the check is deferred
            raise ValueError(self._nonfinite_message("partial_fit", bad, total, "the batch"))
        return self

    def fit(self, x: torch.Tensor) -> PCAWhitening:
        """Fits on all rows of x, fed through the moment update fit_batch_rows rows at a time."""
        self._check_features("fit", x)
        self.reset()
        total = bad = 0
        for chunk in x.split(self.fit_batch_rows):
            rows, bad_rows = self._accumulate(chunk)
            total, bad = total + rows, bad + (bad_rows or 0)
        self._report_unchecked_nonfinite("fit", "x")
        if bad:
            raise ValueError(self._nonfinite_message("fit", bad, total, "x"))
        self._finalize()
        return self

    def fit_transform(self, x: torch.Tensor) -> torch.Tensor:
        return self.fit(x).transform(x)

    def transform(self, x: torch.Tensor) -> torch.Tensor:
        """Whitened, L2-normalized rows of x, float32, shape (N, n_components), computed in chunks."""
        self._check_features("transform", x)
        fit = self._fitted()
        if x.shape[1] != self.n_features_in_:
            raise ValueError(f"PCAWhitening.transform: expected {self.n_features_in_} features per row (as fitted), "
                             f"got shape {tuple(x.shape)}")
        compute_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
        out, bad = pca_transform(x, fit["mean"].to(x.device), self._projection(x.device, compute_dtype), NORM_EPS)
        bad = int(bad)
        if bad:
            raise ValueError(f"PCAWhitening.transform: {bad} of {x.shape[0]} rows of x contain NaN or Inf; "
                             "remove or repair them (check the network for a diverged loss)")
        return out

    # ------------------------------------------------------------------------------------ fitted attributes
    @property
    def n_samples_seen_(self) -> int:
        """Finite rows accumulated so far; with a deferred NaN/Inf check, reading it waits for the device."""
        unread = int(self._unchecked_nonfinite) if self._unchecked_rows else 0
        return self._n_samples_seen - unread

    @n_samples_seen_.setter
    def n_samples_seen_(self, value: int) -> None:
        self._n_samples_seen = int(value)

    @property
    def mean_(self) -> torch.Tensor:
        return self._fitted()["mean"]

    @property
    def components_(self) -> torch.Tensor:
        return self._fitted()["components"].to(torch.float32)

    @property
    def eigenvalues_(self) -> torch.Tensor:
        return self._fitted()["eigenvalues"]

    explained_variance_ = eigenvalues_

    @property
    def explained_variance_ratio_(self) -> torch.Tensor:
        fit = self._fitted()
        return fit["eigenvalues"] / fit["total_variance"].clamp_min(torch.finfo(torch.float64).tiny)

    @property
    def scale_(self) -> torch.Tensor:
        return self._fitted()["scale"]

    def get_covariance(self) -> torch.Tensor:
        """The (D, D) float64 population covariance (1/n) sum (x - mean)(x - mean)^T of the rows seen so far."""
        self._report_unchecked_nonfinite("partial_fit", "the batches since the last check")
        if self._moments is None or self.n_samples_seen_ == 0:
            raise RuntimeError("PCAWhitening: no rows seen yet; call partial_fit(batch) or fit(x) first")
        return self._mean_and_covariance()[1]

    # --------------------------------------------------------------- merging moments (pydc.cluster.sharded)
    def sum_of_rows(self) -> torch.Tensor:
        """The float64 column sums of the rows seen so far (D,), on the moments' device."""
        if self._moments is None:
            raise RuntimeError("PCAWhitening.sum_of_rows: no rows seen yet; call partial_fit(batch) first")
        return self._moments["sum"] + self.n_samples_seen_ * self._moments["shift"]

    def moments_about(self, shift: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(sum, gram) of the rows seen so far, taken about `shift` instead of the internal shift, in float64:
        sum = sum_i (x_i - shift) (D,) and gram = sum_i (x_i - shift)(x_i - shift)^T (D, D), both triangles.

        Moments about different shifts add up only once they share one; with d = own shift - shift, S and G the
        internal sum and Gram, exactly: sum = S + n d, gram = G + S d^T + d S^T + n d d^T (pending float32 Gram
        products are flushed first). Call after partial_fit has seen rows.
        """
        if self._moments is None:
            raise RuntimeError("PCAWhitening.moments_about: no rows seen yet; call partial_fit(batch) first")
        self._flush()
        moments, n = self._moments, self.n_samples_seen_
        shift = shift.to(device=moments["shift"].device, dtype=torch.float64)
        if shift.shape != moments["shift"].shape:
            raise ValueError(f"PCAWhitening.moments_about: expected a shift of shape {tuple(moments['shift'].shape)}, "
                             f"got {tuple(shift.shape)}")
        delta = moments["shift"] - shift
        gram = _symmetric_from_upper(moments["gram"])  # the ops define the upper triangle only
        # S d^T + d S^T + n d d^T = u d^T + d u^T with u = S + n d / 2; o + o^T is symmetric bit for bit
        outer = torch.outer(moments["sum"] + (0.5 * n) * delta, delta)
        gram += outer + outer.T
        return moments["sum"] + n * delta, gram

    def load_moments(self, n_samples: int, shift: torch.Tensor, sum: torch.Tensor, gram: torch.Tensor) -> PCAWhitening:
        """Replaces the moments by (n_samples, shift, sum about shift, gram about shift), e.g. moments_about()
        summed over ranks; forgets any fit and pending products. gram must be float64 (D, D), upper triangle
        defined at least."""
        d = shift.shape[0]
        if (shift.dim() != 1 or sum.shape != (d,) or gram.shape != (d, d)
                or any(t.dtype != torch.float64 for t in (shift, sum, gram))):
            raise ValueError(f"PCAWhitening.load_moments: expected float64 shift and sum of shape (D,) and gram of "
                             f"shape (D, D), got {tuple(shift.shape)}, {tuple(sum.shape)}, {tuple(gram.shape)} of "
                             f"dtypes {shift.dtype}, {sum.dtype}, {gram.dtype}")
        if self.n_components > d:
            raise ValueError(f"PCAWhitening: n_components={self.n_components} exceeds the {d} features of the input; "
                             f"expected n_components <= {d}")
        self.reset()
        self.n_features_in_ = d
        self.n_samples_seen_ = int(n_samples)
        self._moments = {"shift": shift, "sum": sum, "gram": gram}
        return self

    def fit_tensors(self) -> dict[str, torch.Tensor]:
        """The fit (mean, components (float64), eigenvalues, scale, total_variance), computed if needed; with
        load_fit it hands one process's fit to others (pydc.cluster.sharded broadcasts rank 0's)."""
        return dict(self._fitted())

    def load_fit(self, fit: dict[str, torch.Tensor]) -> PCAWhitening:
        """Adopts a fit from fit_tensors() (of a PCAWhitening with this configuration); keeps the moments."""
        missing = [key for key in _FIT_KEYS if key not in fit]
        if missing:
            raise ValueError(f"PCAWhitening.load_fit: the fit lacks {missing}; expected PCAWhitening.fit_tensors()")
        if fit["components"].shape[0] != self.n_components:
            raise ValueError(f"PCAWhitening.load_fit: the fit has {fit['components'].shape[0]} components, this object "
                             f"{self.n_components}")
        self.n_features_in_ = fit["components"].shape[1]
        self._fit = {key: fit[key] for key in _FIT_KEYS}
        self._projections = {}
        return self

    # ------------------------------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict:
        """Configuration, moments (so partial_fit can resume) and the fit; tensors stay on their device."""
        if self._moments is not None:
            self._flush()
        state = {"version": _STATE_VERSION, "n_components": self.n_components, "eigen_power": self.eigen_power,
                 "eps": self.eps, "eigenvalue_floor": self.eigenvalue_floor, "n_features_in": self.n_features_in_,
                 "n_samples_seen": self.n_samples_seen_}
        for key in _MOMENT_KEYS:
            state[key] = None if self._moments is None else self._moments[key]
        for key in _FIT_KEYS:
            state["fit_" + key] = None if self._fit is None else self._fit[key]
        return state

    def load_state_dict(self, state: dict) -> PCAWhitening:
        missing = [key for key in ("version", "n_components", "eigen_power", "eps", "n_features_in", "n_samples_seen",
                                   *_MOMENT_KEYS, *("fit_" + k for k in _FIT_KEYS)) if key not in state]
        if missing:
            raise ValueError(f"PCAWhitening.load_state_dict: the state lacks {missing}; expected a PCAWhitening.state_dict()")
        for key in ("n_components", "eigen_power", "eps"):
            if state[key] != getattr(self, key):
                raise ValueError(f"PCAWhitening.load_state_dict: the state has {key}={state[key]!r}, this object "
                                 f"{getattr(self, key)!r}; construct PCAWhitening with the saved configuration")
        self.reset()
        self.eigenvalue_floor = float(state.get("eigenvalue_floor", self.eigenvalue_floor))
        self.n_features_in_ = state["n_features_in"]
        self.n_samples_seen_ = int(state["n_samples_seen"])
        if state["shift"] is not None:
            self._unchecked_nonfinite = torch.zeros((), dtype=torch.int64, device=state["shift"].device)
        if state["shift"] is not None:
            self._moments = {key: state[key].clone() for key in _MOMENT_KEYS}
        if state["fit_mean"] is not None:
            self._fit = {key: state["fit_" + key].clone() for key in _FIT_KEYS}
        return self

    def __repr__(self) -> str:
        return (f"PCAWhitening(n_components={self.n_components}, eigen_power={self.eigen_power}, eps={self.eps}, "
                f"n_samples_seen_={self.n_samples_seen_})")

    # ------------------------------------------------------------------------------------------------ inside
    def _check_features(self, method: str, x) -> None:
        check_features(f"PCAWhitening.{method}", "the input", x)

    def _nonfinite_message(self, method: str, bad: int, total: int, what: str) -> str:
        return (f"PCAWhitening.{method}: {bad} of {total} rows of {what} contain NaN or Inf; they were left out of "
                f"the fit (the other {total - bad} rows were accumulated); remove or repair them (check the network "
                "for a diverged loss)")

    def _start(self, batch: torch.Tensor) -> None:
        d = batch.shape[1]
        if self.n_components > d:
            raise ValueError(f"PCAWhitening: n_components={self.n_components} exceeds the {d} features of the input; "
                             f"expected n_components <= {d}")
        # The shift only conditions the products (any value is exact in theory): the mean of the first batch's
        # first _SHIFT_ROWS rows, over its finite rows when some are not. Its whole 50,000 x 2048 (fit's first
        # chunk) took 0.27 s to sum in float64 on the 2-core EPYC, 1024 rows ~6 ms; a mean of 1024 rows leaves
        # ~3% of a standard deviation of offset, and what the shift is there for is a common offset far larger.
        sample = batch[:_SHIFT_ROWS]
        shift = sample.sum(dim=0, dtype=torch.float64) / sample.shape[0]
        if not bool(torch.isfinite(shift).all()):
            kept = batch[torch.isfinite(batch).all(dim=1)][:_SHIFT_ROWS]
            shift = kept.sum(dim=0, dtype=torch.float64) / max(kept.shape[0], 1)
        self.n_features_in_ = d
        self._unchecked_nonfinite = torch.zeros((), dtype=torch.int64, device=batch.device)
        self._moments = {"shift": shift, "sum": torch.zeros_like(shift),
                         "gram": torch.zeros((d, d), dtype=torch.float64, device=batch.device)}

    def _flush(self) -> None:
        if self._pending_gram is not None and self._pending_rows:
            # Only the upper triangle is defined: it is added and cleared in row panels gram[i:i+256, i:]. At
            # D = 2048 on the 2-core CPU that takes ~2 ms, one full-matrix float32 -> float64 add ~12 ms.
            gram, pending = self._moments["gram"], self._pending_gram
            for start in range(0, gram.shape[0], _FLUSH_PANEL):
                source = pending[start:start + _FLUSH_PANEL, start:]
                gram[start:start + _FLUSH_PANEL, start:] += source
                source.zero_()
        self._pending_rows = 0

    def _defers_check(self, device: torch.device) -> bool:
        if self.defer_nonfinite_check is None:
            return device.type == "cuda"
        return bool(self.defer_nonfinite_check)

    def _accumulate(self, batch: torch.Tensor) -> tuple[int, int | None]:
        """Adds batch to the moments; returns (rows, rows left out for NaN/Inf), or (rows, None) when that count
        stays on the device until _report_unchecked_nonfinite reads it."""
        self._check_features("partial_fit", batch)
        rows, d = batch.shape
        if self.n_features_in_ is not None and d != self.n_features_in_:
            raise ValueError(f"PCAWhitening.partial_fit: expected {self.n_features_in_} features per row (as in the "
                             f"earlier batches), got shape {tuple(batch.shape)}")
        if rows == 0:
            return 0, 0
        if self._moments is None:
            self._start(batch)
        moments = self._moments
        if batch.device != moments["gram"].device:
            raise ValueError(f"PCAWhitening.partial_fit: the moments live on {moments['gram'].device}, got a batch on "
                             f"{batch.device}; feed every batch from one device")
        deferred = self._defers_check(batch.device)
        # Deferred: the op adds straight into the unread device count (no extra kernel, no sync).
        bad = self._unchecked_nonfinite if deferred else torch.zeros((), dtype=torch.int64, device=batch.device)
        if batch.dtype == torch.float64:
            pca_accumulate(batch, moments["shift"], moments["sum"], moments["gram"], bad)
        else:
            if self._pending_gram is None:
                self._pending_gram = torch.zeros_like(moments["gram"], dtype=torch.float32)
            for piece in batch.split(self.flush_rows):
                pca_accumulate(piece, moments["shift"], moments["sum"], self._pending_gram, bad)
                self._pending_rows += piece.shape[0]
                if self._pending_rows >= self.flush_rows:
                    self._flush()
        self._fit = None
        self._projections = {}
        if deferred:
            self._unchecked_rows += rows
            self._n_samples_seen += rows  # less the unread count (see n_samples_seen_)
            return rows, None
        bad = int(bad)
        self._n_samples_seen += rows - bad
        return rows, bad

    def _report_unchecked_nonfinite(self, method: str, what: str) -> None:
        """Reads the deferred count (one host sync) and raises ValueError if rows were left out since the last
        read; the count is then cleared, so each such row is reported once."""
        if not self._unchecked_rows:
            return
        total, bad = self._unchecked_rows, int(self._unchecked_nonfinite)
        self._unchecked_rows = 0
        if bad:
            self._unchecked_nonfinite.zero_()
            self._n_samples_seen -= bad
            raise ValueError(self._nonfinite_message(method, bad, total, what))

    def _fitted(self) -> dict[str, torch.Tensor]:
        if self._fit is None:
            self._report_unchecked_nonfinite("partial_fit", "the batches since the last check")
            if self._moments is None or self.n_samples_seen_ == 0:
                raise RuntimeError("PCAWhitening: not fitted yet; call fit(x) or partial_fit(batch) with some finite rows")
            self._finalize()
        return self._fit

    def _finalize(self) -> None:
        """Covariance from the moments, then its top eigenpairs and the whitening scales."""
        if self.n_samples_seen_ == 0:
            raise RuntimeError("PCAWhitening: no finite rows were seen; nothing to fit")
        n, k = self.n_samples_seen_, self.n_components
        mean, covariance = self._mean_and_covariance()
        total_variance = covariance.diagonal().sum().clamp_min(0.0)
        with _cpu_threads(self.eigh_threads if covariance.device.type == "cpu" else None):
            eigenvalues, eigenvectors = top_eigenpairs(covariance, k)
        components = eigenvectors.T.contiguous()  # (k, D), rows = eigenvectors
        largest = components.abs().argmax(dim=1, keepdim=True)
        components *= torch.sign(components.gather(1, largest))
        floor = self.eigenvalue_floor * eigenvalues[0].clamp_min(0.0)
        carries_variance = eigenvalues > floor
        eigenvalues = eigenvalues.clamp_min(0.0)
        scale = torch.where(carries_variance, (eigenvalues + self.eps).clamp_min(torch.finfo(torch.float64).tiny)
                            .pow(self.eigen_power), torch.zeros_like(eigenvalues))
        dropped = int((~carries_variance).sum())
        if dropped:
            warnings.warn(f"PCAWhitening: {dropped} of the {k} components have eigenvalue <= {self.eigenvalue_floor:g} x "
                          f"the largest ({n} rows, {self.n_features_in_} features: the data are rank deficient); their "
                          "output columns are 0", RuntimeWarning, stacklevel=3)
        self._fit = {"mean": mean, "components": components, "eigenvalues": eigenvalues,
                     "scale": scale, "total_variance": total_variance}
        self._projections = {}

    def _mean_and_covariance(self) -> tuple[torch.Tensor, torch.Tensor]:
        self._flush()
        moments, n = self._moments, self.n_samples_seen_
        offset = moments["sum"] / n  # mean - shift
        covariance = _symmetric_from_upper(moments["gram"])  # the ops define the upper triangle only
        covariance.addr_(offset, offset, beta=1.0 / n, alpha=-1.0)  # gram / n - offset offset^T, in place
        return moments["shift"] + offset, covariance

    def _projection(self, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """The scaled components diag(scale) V^T on `device` in `dtype`, cached per (device, dtype)."""
        key = (str(device), dtype)
        if key not in self._projections:
            fit = self._fit
            self._projections[key] = (fit["scale"][:, None] * fit["components"]).to(device=device, dtype=dtype)
        return self._projections[key]
