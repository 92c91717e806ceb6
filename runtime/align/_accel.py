"""Optional compiled merge kernel for sorted references (numba, from the ``align`` extra).

``pandas.merge_asof`` walks both sorted arrays once; NumPy's ``searchsorted`` is a binary search
per reference row. When numba is installed and the reference is sorted, this kernel does the same
single linear walk and applies tolerance and the nearest/tie rule in the same pass, with no
temporaries. Results are identical to the NumPy path (the property tests run both). Without numba
everything still works, on the NumPy path.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

_lock = threading.Lock()
_kernels: tuple[Callable, Callable] | None = None
_tried = False

# Policy codes understood by the kernel.
PREVIOUS, NEXT, NEAREST, BOTH = 0, 1, 2, 3


def _build() -> tuple[Callable, Callable] | None:
    try:
        import numba
        import numpy as np
    except ImportError:
        return None

    def jit(fn):
        try:
            return numba.njit(cache=True, nogil=True)(fn)
        except RuntimeError:  # no writable cache location (read-only install): compile per process
            return numba.njit(cache=False, nogil=True)(fn)

    @jit
    def merge_sorted(s, t, mode, exact, has_tol, tol):  # pragma: no cover - compiled
        n = t.size
        m = s.size
        pos = np.empty(n, np.int64)
        other = np.empty(n if mode == 3 else 0, np.int64)
        need_b = mode != 1
        need_f = mode != 0
        j = 0  # exact: number of s <= t; else number of s < t  → backward = j - 1
        k = 0  # exact: number of s < t; else number of s <= t  → forward = k
        for i in range(n):
            ti = t[i]
            if exact:
                if need_b:
                    while j < m and s[j] <= ti:
                        j += 1
                if need_f:
                    while k < m and s[k] < ti:
                        k += 1
            else:
                if need_b:
                    while j < m and s[j] < ti:
                        j += 1
                if need_f:
                    while k < m and s[k] <= ti:
                        k += 1
            b = j - 1
            f = k if k < m else -1
            if has_tol:
                if b >= 0 and ti - s[b] > tol:
                    b = -1
                if f >= 0 and s[f] - ti > tol:
                    f = -1
            if mode == 0:
                pos[i] = b
            elif mode == 1:
                pos[i] = f
            elif mode == 2:
                if b >= 0 and f >= 0:
                    # pandas' rule: the backward candidate wins unless forward is strictly closer
                    pos[i] = b if (ti - s[b]) <= (s[f] - ti) else f
                else:
                    pos[i] = b if b >= 0 else f
            else:
                pos[i] = b
                other[i] = f
        return pos, other

    @jit
    def scan(ts):  # pragma: no cover - compiled
        # First non-finite index and first index smaller than its predecessor (−1: none).
        # A branch-free counting pass first (it vectorises: ~10x faster than a loop that can
        # stop early); only bad input pays for the second pass that locates the first offender.
        n = ts.size
        nonfinite = 0
        inversions = 0
        if n:
            nonfinite += (ts[0] - ts[0]) != 0  # x − x is NaN for NaN and ±inf, 0 otherwise
        for i in range(1, n):
            x = ts[i]
            nonfinite += (x - x) != 0
            inversions += x < ts[i - 1]
        if nonfinite == 0 and inversions == 0:
            return -1, -1
        bad = -1
        unsorted = -1
        for i in range(n):
            x = ts[i]
            if bad < 0 and not np.isfinite(x):
                bad = i
            if unsorted < 0 and i > 0 and x < ts[i - 1]:
                unsorted = i
            if bad >= 0 and unsorted >= 0:
                break
        return bad, unsorted

    return merge_sorted, scan


def _load() -> tuple[Callable, Callable] | None:
    global _kernels, _tried
    if not _tried:
        with _lock:
            if not _tried:
                _kernels = _build()
                _tried = True
    return _kernels


def kernel() -> Callable | None:
    """The compiled merge kernel, or None when numba is not installed (imported once, lazily)."""
    kernels = _load()
    return kernels[0] if kernels else None


def scanner() -> Callable | None:
    """The compiled validation scan (non-finite + unsorted in one pass), or None."""
    kernels = _load()
    return kernels[1] if kernels else None
