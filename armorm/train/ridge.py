"""Ridge regression for many objectives on rows streamed from disk: the numerics behind stage-1 training.

`Gram` accumulates X^T X and X^T Y of one label mask's rows as they stream
by: exactly in float64, or (bf16 rows, a CPU with AVX512_BF16) on the core's
bf16 GEMM with float32 sums per block and float64 across blocks.
`solve_all_alphas` solves (M + alpha I) X = B for a whole alpha grid:
`MixedSolver` (float32 Cholesky factors, shared between alphas where that
converges fast, refined in float64 to float64 answers; LAPACK through ctypes
so solves on threads run in parallel), one float64 Cholesky factorization per
alpha, LU, or one eigendecomposition. `blas_pool` runs independent products
and solves on threads with a one-thread BLAS each. stage1.train drives them.
"""
from __future__ import annotations

import contextlib
import functools
import math
import os
import threading
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np

from ..safetensors_io import bf16_to_float32, float32_to_bf16, to_float


def decode_into(raw: np.ndarray, st_dtype: str, out: np.ndarray) -> None:
    """Stored embedding rows -> float64 `out` (exact: every stored dtype is a subset of float64)."""
    if st_dtype == "BF16":
        bf16_to_float32(raw, out=out)
    else:
        out[...] = raw


def _add_diag(M: np.ndarray, a: float) -> np.ndarray:
    out = M.copy()
    out.flat[:: M.shape[0] + 1] += a
    return out


def _tri_solve(L: np.ndarray, B: np.ndarray, lower: bool, block: int = 256) -> np.ndarray:
    """Solves L X = B (lower) or L^T X = B (lower=False: L is the lower factor), blocked."""
    n = L.shape[0]
    X = np.array(B, dtype=np.float64, copy=True)
    starts = list(range(0, n, block))
    if lower:
        for i0 in starts:
            i1 = min(n, i0 + block)
            if i0:
                X[i0:i1] -= L[i0:i1, :i0] @ X[:i0]
            X[i0:i1] = np.linalg.solve(L[i0:i1, i0:i1], X[i0:i1])
    else:
        U = L.T
        for i0 in reversed(starts):
            i1 = min(n, i0 + block)
            if i1 < n:
                X[i0:i1] -= U[i0:i1, i1:] @ X[i1:]
            X[i0:i1] = np.linalg.solve(U[i0:i1, i0:i1], X[i0:i1])
    return X


def solve_all_alphas(M: np.ndarray, B: np.ndarray, alphas: Sequence[float], solver: str, threads: int = 1,
                      scratch: Optional[Scratch] = None) -> Tuple[List[np.ndarray], Dict[str, int],
                                                                   Optional["MixedSolver"]]:
    """Solutions of (M + alpha I) X = B for every alpha (M symmetric positive semi-definite).

    "mixed": float32 Cholesky factors refined to float64 accuracy
    (`MixedSolver`, returned too, for corrections); "cholesky": one float64
    factorization per alpha; "lu"; "eigh": one eigendecomposition for all
    alphas (also the fallback when a Cholesky factorization finds the matrix
    numerically indefinite). Returns the solutions, what was done
    (`{method: 1, "float32 factorizations": n, ...}`) and the mixed solver
    (which runs its factorizations on up to `threads` threads).
    """
    if solver == "mixed":
        lapack = scipy_lapack()
        if lapack is None:
            solver = "cholesky"
        else:
            try:
                ms = MixedSolver(M, alphas, lapack, threads, scratch)
                W = ms.solve([B] * len(alphas))
                return W, {"mixed": 1, **ms.counts}, ms
            except np.linalg.LinAlgError:
                solver = "eigh"
    if solver == "cholesky":
        try:
            out = []
            for a in alphas:
                L = np.linalg.cholesky(_add_diag(M, a))
                out.append(_tri_solve(L, _tri_solve(L, B, lower=True), lower=False))
            return out, {"cholesky": 1, "float64 factorizations": len(out)}, None
        except np.linalg.LinAlgError:
            solver = "eigh"  # numerically indefinite for a tiny alpha: the eigendecomposition copes
    if solver == "lu":
        return [np.linalg.solve(_add_diag(M, a), B) for a in alphas], {"lu": 1}, None
    lam, Q = np.linalg.eigh(M)
    lam = np.maximum(lam, 0.0)  # M is a Gram matrix: negative eigenvalues are rounding
    QtB = Q.T @ B
    return [Q @ (QtB / (lam + a)[:, None]) for a in alphas], {"eigh": 1}, None


# ---------------------------------------------------------------- mixed precision: float32 factors, float64 answers


@functools.lru_cache(maxsize=None)
def scipy_lapack() -> Optional["_Lapack"]:
    """LAPACK's Cholesky routines from scipy (an optional dependency), or None without scipy.

    numpy has no triangular solve and its Cholesky copies the matrix twice.
    """
    try:
        from scipy.linalg import cython_lapack
        return _Lapack(cython_lapack)
    except (ImportError, AttributeError, KeyError, TypeError):
        return None


class _Lapack:
    """potrf / potrs of scipy's LAPACK, called so that the GIL is released during the call.

    scipy's Python wrappers (scipy.linalg.lapack) hold the GIL while LAPACK
    runs, so solves in threads would take turns (measured); the same routines
    called through ctypes, from the function pointers scipy.linalg.cython_lapack
    exports, release it, and the label masks' solves use every core.
    Matrices are C-ordered and symmetric: LAPACK sees their transpose, the
    same matrix; the factor L is stored as L^T in the upper triangle.
    """

    def __init__(self, cython_lapack: Any) -> None:
        import ctypes as C
        capi = cython_lapack.__pyx_capi__
        name_of, ptr_of = C.pythonapi.PyCapsule_GetName, C.pythonapi.PyCapsule_GetPointer
        name_of.restype, name_of.argtypes = C.c_char_p, [C.py_object]
        ptr_of.restype, ptr_of.argtypes = C.c_void_p, [C.py_object, C.c_char_p]
        i = C.POINTER(C.c_int)
        potrf = C.CFUNCTYPE(None, C.c_char_p, i, C.c_void_p, i, i)
        potrs = C.CFUNCTYPE(None, C.c_char_p, i, i, C.c_void_p, i, C.c_void_p, i, i)

        def fn(name: str, proto: Any) -> Any:
            cap = capi[name]
            return proto(ptr_of(cap, name_of(cap)))

        self._potrf = {np.dtype(np.float32): fn("spotrf", potrf), np.dtype(np.float64): fn("dpotrf", potrf)}
        self._potrs = {np.dtype(np.float32): fn("spotrs", potrs), np.dtype(np.float64): fn("dpotrs", potrs)}
        self._C = C

    def _check(self, A: np.ndarray) -> None:
        if A.ndim != 2 or A.shape[0] != A.shape[1] or not A.flags.c_contiguous or A.dtype not in self._potrf:
            raise ValueError(f"LAPACK needs a C-contiguous square float32/float64 matrix, got {A.dtype} "
                             f"{list(A.shape)}")

    def potrf(self, A: np.ndarray) -> int:
        """Factors the C-ordered symmetric positive definite A in place; LAPACK's info (0: done)."""
        self._check(A)
        C = self._C
        n, info = C.c_int(A.shape[0]), C.c_int(0)
        self._potrf[A.dtype](b"L", C.byref(n), A.ctypes.data, C.byref(n), C.byref(info))
        return info.value

    def potrs(self, L: np.ndarray, R: np.ndarray) -> np.ndarray:
        """(L L^T)^-1 R for a factor from `potrf` (R [n, m] is converted to L's dtype)."""
        self._check(L)
        if R.ndim != 2 or R.shape[0] != L.shape[0]:
            raise ValueError(f"right-hand sides {list(R.shape)} do not fit a {L.shape[0]} x {L.shape[0]} factor")
        C = self._C
        n, m = R.shape
        X = np.empty((m, n), dtype=L.dtype)  # LAPACK's column-major n x m
        X[...] = R.T
        nn, mm, info = C.c_int(n), C.c_int(m), C.c_int(0)
        self._potrs[L.dtype](b"L", C.byref(nn), C.byref(mm), L.ctypes.data, C.byref(nn), X.ctypes.data,
                             C.byref(nn), C.byref(info))
        if info.value:
            raise np.linalg.LinAlgError(f"potrs: argument {-info.value} is invalid")
        return X.T


class Scratch:
    """Large arrays handed back for reuse by later requests of the same size in bytes (thread-safe).

    First touching fresh memory (the kernel clearing its pages) was measured
    at 0.5-2 GB/s on a small VM: for the factors and row buffers of a run,
    about as much time as the factorizations themselves.
    """

    def __init__(self) -> None:
        self._free: Dict[int, List[np.ndarray]] = {}  # by size in bytes: raw uint8 buffers
        self._lock = threading.Lock()

    def get(self, shape: Tuple[int, ...], dtype: Any) -> np.ndarray:
        dtype = np.dtype(dtype)
        nbytes = int(np.prod(shape)) * dtype.itemsize
        with self._lock:
            free = self._free.get(nbytes)
            buf = free.pop() if free else None
        return np.empty(shape, dtype=dtype) if buf is None else buf.view(dtype).reshape(shape)

    def put(self, a: Optional[np.ndarray]) -> None:
        """Hands `a` (C-contiguous; nothing else may use it any more) back for reuse."""
        if a is not None and a.flags.c_contiguous and a.nbytes:
            with self._lock:
                self._free.setdefault(a.nbytes, []).append(a.reshape(-1).view(np.uint8))


def _pow2(x: float) -> float:
    """The power of two nearest below 1/|x| (1.0 for 0 or non-finite): an exact scale factor."""
    return 2.0 ** -math.frexp(x)[1] if x and math.isfinite(x) else 1.0


class _Factor:
    """Lower Cholesky factor of `scale * (M + alpha I)` in float32 or float64; `ok` False if not positive definite.

    `scale` (a power of two) brings M's diagonal to about 1, so the float32
    copy neither overflows nor underflows.
    """

    def __init__(self, lapack: _Lapack, M: np.ndarray, alpha: float, dtype: Any, scale: float,
                 scratch: Optional[Scratch] = None) -> None:
        n = M.shape[0]
        self.L = scratch.get(M.shape, dtype) if scratch is not None else np.empty(M.shape, dtype=dtype)
        np.multiply(M, scale, out=self.L, casting="same_kind")
        self.L.flat[:: n + 1] += dtype(alpha * scale)
        self.ok = lapack.potrf(self.L) == 0 and bool(np.isfinite(self.L.diagonal()).all())
        self.lapack, self.alpha, self.dtype, self.scale = lapack, alpha, dtype, scale

    def solve(self, R: np.ndarray) -> np.ndarray:
        """Approximately (M + alpha I)^-1 R, float64 (each column scaled by a power of two on the way)."""
        c = np.array([_pow2(v) for v in np.abs(R).max(axis=0)]) if R.size else np.ones(R.shape[1])
        return self.lapack.potrs(self.L, R * c).astype(np.float64) * (self.scale / c)


def col_change(D: np.ndarray, W: np.ndarray) -> float:
    """Largest per-column ratio max|D| / max|W| (a column of zeros changing by zeros: 0)."""
    d, w = np.abs(D).max(axis=0), np.abs(W).max(axis=0)
    with np.errstate(divide="ignore", invalid="ignore"):
        r = np.where(d == 0, 0.0, d / w)
    return float(np.max(r)) if r.size else 0.0


class MixedSolver:
    """(M + alpha I) X = R_alpha for every alpha of a grid: float32 Cholesky factors, float64 refinement.

    Every alpha's solution is refined in float64 against M itself
    (X += F^-1 (R - (M + alpha I) X), F a factorization) until the estimated
    remaining change is below `tol` relative to the solution, per column: the
    answer is the float64 one, the factorizations cost float32 time.
    Factors are shared: the smallest alpha's factor serves every alpha for
    which that refinement converges fast (alpha well below M's smallest
    eigenvalue: the error shrinks by about (alpha - a0) / (lambda_min + a0) per
    sweep); the others get their own float32 factor, and a float64 one when
    float32 is too coarse for the conditioning (slow or no convergence). All
    alphas are refined in lock step, so M is read once per sweep. The factors
    are kept: later `solve` calls (corrections) reuse them. Raises
    LinAlgError when even a float64 factorization fails (the caller then uses
    the eigendecomposition).
    """

    def __init__(self, M: np.ndarray, alphas: Sequence[float], lapack: _Lapack, threads: int = 1,
                 scratch: Optional[Scratch] = None) -> None:
        self.M, self.alphas, self.lapack, self.threads, self.scratch = M, list(alphas), lapack, threads, scratch
        diag = M.diagonal()
        self.scale = _pow2(float(diag.max())) if diag.size else 1.0
        self.counts = {"float32 factorizations": 0, "float64 factorizations": 0, "refinement sweeps": 0}
        first = int(np.argmin(self.alphas))
        shared = self._count(self._factor(self.alphas[first], np.float32))
        self.fac = [shared] * len(self.alphas)
        self.own = [i == first for i in range(len(self.alphas))]

    def _factor(self, a: float, dtype: Any) -> _Factor:
        """Factor of M + a I in `dtype`, float64 when float32 finds it indefinite (thread-safe)."""
        for dt in ((np.float32, np.float64) if dtype == np.float32 else (np.float64,)):
            f = _Factor(self.lapack, self.M, a, dt, self.scale, self.scratch)
            if f.ok:
                return f
            if self.scratch is not None:
                self.scratch.put(f.L)
        raise np.linalg.LinAlgError(f"M + {a} I is not numerically positive definite")

    def _count(self, f: _Factor) -> _Factor:
        self.counts["float32 factorizations" if f.dtype == np.float32 else "float64 factorizations"] += 1
        return f

    def release(self) -> None:
        """Hands the factors back to the scratch pool; the solver cannot be used afterwards."""
        if self.scratch is not None:
            for f in {id(f): f for f in self.fac}.values():
                self.scratch.put(f.L)
        self.fac = []

    def _better_factor(self, i: int) -> Optional[_Factor]:
        """Alpha i's own float32 factor when it shares one, float64 when it has float32; None after that."""
        if not self.own[i]:
            return self._factor(self.alphas[i], np.float32)
        return self._factor(self.alphas[i], np.float64) if self.fac[i].dtype == np.float32 else None

    def solve(self, rhs: Sequence[np.ndarray], tol: float = 1e-10, max_sweeps: int = 60) -> List[np.ndarray]:
        """X_i with (M + alpha_i I) X_i = rhs[i], for every alpha i (float64 [n, k] each)."""
        M, alphas = self.M, self.alphas
        na = len(alphas)
        n, k = rhs[0].shape
        W = [np.zeros((n, k)) for _ in range(na)]
        change = [math.inf] * na  # last relative correction
        done = [False] * na
        for _ in range(max_sweeps):
            act = [i for i in range(na) if not done[i]]
            if not act:
                return W
            self.counts["refinement sweeps"] += 1
            R = np.concatenate([rhs[i] for i in act], axis=1)
            Wa = np.concatenate([W[i] for i in act], axis=1)
            if np.any(Wa):
                R -= M @ Wa + Wa * np.repeat([alphas[i] for i in act], k)
            D = np.empty_like(R)
            slow: List[int] = []
            by_factor: Dict[int, Tuple[_Factor, List[int]]] = {}
            for j, i in enumerate(act):
                by_factor.setdefault(id(self.fac[i]), (self.fac[i], []))[1].extend(range(j * k, (j + 1) * k))
            for f, cols in by_factor.values():
                D[:, cols] = f.solve(R[:, cols])
            for j, i in enumerate(act):
                W[i] += D[:, j * k:(j + 1) * k]
                prev, change[i] = change[i], col_change(D[:, j * k:(j + 1) * k], W[i])
                if not (math.isfinite(change[i]) and np.isfinite(W[i]).all()):
                    rate = math.inf
                elif change[i] == 0.0:
                    done[i] = True
                    continue
                else:
                    rate = change[i] / prev if math.isfinite(prev) else math.nan
                    if rate < 0.5 and change[i] * rate / (1.0 - rate) <= tol:
                        done[i] = True  # the remaining change is estimated below tol
                        continue
                    if math.isnan(rate):
                        continue  # the first correction with this factor: no rate yet
                # too slow: a shared factor is too far from this alpha, a float32 one too coarse for the
                # conditioning; a float64 factor that stagnates has reached a float64 solve's accuracy
                limit = 0.1 if not self.own[i] else 0.25 if self.fac[i].dtype == np.float32 else 0.5
                if rate > limit:
                    slow.append(i)
            # the new factorizations of a sweep are independent: on all cores (LAPACK releases the GIL)
            slow_fac = _thread_map(self.threads, self._better_factor, slow)
            for i, f in zip(slow, slow_fac):
                if f is not None:
                    if self.own[i] and self.scratch is not None:
                        self.scratch.put(self.fac[i].L)  # its float32 factor is replaced: no one else uses it
                    self.fac[i], self.own[i] = self._count(f), True
                    W[i][...] = 0.0
                    change[i] = math.inf
                elif change[i] <= 1e-2:
                    done[i] = True  # corrections at the noise level of float64 for this conditioning
                else:
                    raise np.linalg.LinAlgError(f"no convergence for alpha {alphas[i]}")
        raise np.linalg.LinAlgError("iterative refinement did not converge")


def _usable_cpus() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:
        return max(1, os.cpu_count() or 1)


def pool_size(max_workers: Optional[int]) -> int:
    return min(max_workers or _usable_cpus(), 8)  # 8: bounds the memory of the per-group solves


def bf16_gemm_kernel() -> Optional[str]:
    """The core's bf16 GEMM kernel when it is a fast one (AVX512_BF16), else None."""
    try:
        from .. import _core
        kernel = _core.gemm_kernel()
    except (ImportError, AttributeError):
        return None
    return None if kernel == "portable" else kernel


@contextlib.contextmanager
def blas_pool(max_workers: Optional[int]) -> Iterator[Optional[Any]]:
    """A pool of threads that each run one-thread BLAS (None: one thread), for the `with` block.

    The X^T X blocks and the per-group solves are independent: one per core,
    each with a one-thread BLAS, avoids the synchronisation of multithreaded
    BLAS/LAPACK (on a small machine many times slower than one thread,
    measured: its threads spin while other threads compute) and gives results
    that do not depend on the thread count. Needs the optional threadpoolctl
    to set the BLAS threads; without it, no pool and BLAS's own threading.
    """
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        yield None
        return
    scipy_lapack()  # load scipy's own BLAS now: the limit applies to the libraries already loaded
    workers = pool_size(max_workers)
    with threadpool_limits(limits=1, user_api="blas"):
        if workers <= 1:
            yield None
            return
        from concurrent.futures import ThreadPoolExecutor
        with ThreadPoolExecutor(workers) as ex:
            yield ex


def pool_map(pool: Optional[Any], fn: Callable[[Any], Any], tasks: Sequence[Any]) -> List[Any]:
    return list(pool.map(fn, tasks)) if pool is not None and len(tasks) > 1 else [fn(t) for t in tasks]


def _thread_map(threads: int, fn: Callable[[Any], Any], tasks: Sequence[Any]) -> List[Any]:
    """`[fn(t) for t in tasks]` on up to `threads` new threads (usable inside a pool's task)."""
    if threads <= 1 or len(tasks) <= 1:
        return [fn(t) for t in tasks]
    from concurrent.futures import ThreadPoolExecutor
    with ThreadPoolExecutor(min(threads, len(tasks))) as ex:
        return list(ex.map(fn, tasks))


def _gram_add(A: np.ndarray, S: np.ndarray, pool: Optional[Any]) -> None:
    """A += S^T S on and below the diagonal, in row blocks (about half the work of the full product).

    The upper triangle is left stale: `_mirror_lower` completes A at the end.
    """
    H = A.shape[0]
    step = max(64, -(-H // 8 // 64) * 64)
    blocks = [(i0, min(H, i0 + step)) for i0 in range(0, H, step)]

    def one(b: Tuple[int, int]) -> None:
        i0, i1 = b
        A[i0:i1, :i1] += S[:, i0:i1].T @ S[:, :i1]

    pool_map(pool, one, blocks[::-1])  # the largest blocks first: the threads finish together


def _mirror_lower(A: np.ndarray, step: int = 512) -> None:
    """Copies the strictly lower triangle of A onto the upper one."""
    H = A.shape[0]
    for i0 in range(0, H, step):
        i1 = min(H, i0 + step)
        D = A[i0:i1, i0:i1]
        upper = np.triu_indices(i1 - i0, 1)
        D[upper] = D.T[upper]
        A[i0:i1, i1:] = A[i1:, i0:i1].T


def _bf16_parts(Y: np.ndarray) -> np.ndarray:
    """float64 [n, k] -> bf16 bits [n, 3k]: Y ~= part0 + part1 + part2 (24 significant bits, float32's)."""
    parts, r = [], np.asarray(Y, dtype=np.float64)
    for _ in range(3):
        p = float32_to_bf16(r.astype(np.float32))
        parts.append(p)
        r = r - bf16_to_float32(p)
    return np.ascontiguousarray(np.concatenate(parts, axis=1))


class Gram:
    """X^T X and X^T Y of one label mask's training rows, accumulated as the rows stream by.

    Rows are staged as stored and multiplied `stage_rows` at a time. mode
    "float64": exact (every stored dtype is a subset of float64): the staged
    rows decoded into `work` (float64 [stage_rows, H], shared by the groups),
    lower triangle only, in row blocks on the pool's threads. mode "bf16"
    (bf16 rows, the core's AVX512_BF16 GEMM): exact products, float32 sums
    over each block of `stage_rows` rows (into `work`, float32 [H, H]),
    float64 across blocks; X^T Y the same way from Y split into three bf16
    parts. An approximation (about 1e-6 relative): `train` refines its
    solutions against the exact rows afterwards.
    """

    def __init__(self, H: int, k: int, rows: int, mode: str, st_dtype: str, pool: Optional[Any], threads: int,
                 work: np.ndarray, scratch: Scratch, stage_rows: int = 4096) -> None:
        stored = {"BF16": np.uint16, "F16": np.float16, "F32": np.float32, "F64": np.float64}[st_dtype]
        self.A = np.zeros((H, H), dtype=np.float64)
        self.B = np.zeros((H, k), dtype=np.float64)
        self.mode, self.st_dtype, self.pool, self.threads, self.work = mode, st_dtype, pool, threads, work
        self.scratch = scratch
        self.S = scratch.get((min(stage_rows, rows), H), stored)
        self.SY = np.empty((self.S.shape[0], k), dtype=np.float64)
        self.fill = 0

    def add(self, raw: np.ndarray, st_dtype: str, Y: np.ndarray) -> None:
        """Adds embedding rows as stored (`st_dtype`) and their labels."""
        pos = 0
        while pos < len(raw):
            take = min(len(raw) - pos, self.S.shape[0] - self.fill)
            dst = self.S[self.fill:self.fill + take]
            dst[...] = raw[pos:pos + take] if st_dtype == self.st_dtype else \
                to_float(raw[pos:pos + take], st_dtype, self.S.dtype)  # files of mixed dtypes: as float
            self.SY[self.fill:self.fill + take] = Y[pos:pos + take]
            self.fill += take
            pos += take
            if self.fill == self.S.shape[0]:
                self._flush()

    def _flush(self) -> None:
        if not self.fill:
            return
        S, SY = self.S[:self.fill], self.SY[:self.fill]
        if self.mode == "bf16":
            from .. import _core
            _core.gemm(S, S, trans_a=True, out=self.work, num_threads=self.threads)
            self.A += self.work
            k = SY.shape[1]
            self.B += _core.gemm(S, _bf16_parts(SY), trans_a=True, num_threads=self.threads) \
                .reshape(-1, 3, k).sum(axis=1, dtype=np.float64)
        else:
            X = self.work[:self.fill]
            decode_into(S, self.st_dtype, X)
            _gram_add(self.A, X, self.pool)
            self.B += X.T @ SY
        self.fill = 0

    def finish(self) -> Tuple[np.ndarray, np.ndarray]:
        """(X^T X, X^T Y); hands the staging buffer back."""
        self._flush()
        self.scratch.put(self.S)
        self.S = self.SY = self.work = None
        _mirror_lower(self.A)  # float64: the upper triangle is stale; bf16: ~equal, one triangle is used
        return self.A, self.B
