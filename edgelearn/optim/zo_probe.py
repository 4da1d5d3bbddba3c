"""Probe arithmetic shared by the batched zeroth-order optimizers (fzoo, adamezo, zo-gn).

A step of these optimizers keeps the unperturbed trainable slice in a copy, scores candidates
theta + sum_k c_k z_k written from that copy (as one `Population` request), and writes the
update from the copy again, so the weights after a step are exactly the update rule applied in
float32 and replay repeats the same float operations. The noise z(seed, step, probe) is
`edgelearn.rng`'s, as in zo-sgd (Malladi et al. 2023, MeZO: regenerated from its seed, never
stored); Rademacher signs are drawn once per probe and step and expanded by zo-sgd's
kernels (`edgelearn.optim.kernels`). An optimizer that writes its candidates in place (zo-gn
under restore "drift") begins its steps without the copy and uses a lean arena, whose large
passes draw their signs segment by segment instead of keeping them.
"""

from __future__ import annotations

import base64
from collections.abc import Sequence

import numpy as np

from edgelearn.errors import InputError
from edgelearn.optim.base import Population
from edgelearn.optim.kernels import SignPass, draw_sign_range, draw_signs, signed_rows
from edgelearn.params import ParamStore
from edgelearn.rng import Noise, noise_chunks

#: one term of a combination: (coefficient, noise key (run_seed, step, probe))
Term = tuple[np.float32, tuple[int, int, int]]
#: elements per segment of a lean arena's passes (a multiple of 256: a Philox block)
SEGMENT = 1 << 22


class ProbeArena:
    """The trainable float32 slice of a store, its pre-step copy and the step's noise.

    Args:
        noise: a `Noise` generator (rademacher, gaussian or pool).
        chunk: elements per noise chunk (results do not depend on it).
        owner: optimizer name for error messages.
        lean: keep no packed signs: each pass over more than SEGMENT elements draws its
            terms' signs segment by segment (the same bits; K probes' signs would take K/32
            of the slice's bytes, which in-place probing exists to avoid).
    """

    def __init__(self, noise: Noise, chunk: int, owner: str, lean: bool = False) -> None:
        self.noise, self.chunk, self.owner, self.lean = noise, chunk, owner, lean
        self.n: int | None = None
        self.copy: np.ndarray | None = None
        self._zbuf = np.empty(chunk, np.float32)
        self._abuf = np.empty(chunk, np.float32)
        self._signs: dict[tuple[int, int, int], np.ndarray] = {}
        self._pass = SignPass()

    def pass_bytes(self, n: int) -> int:
        """Bytes of the sign kernel's chunk buffers for a slice of n elements."""
        return self._pass.buffer_bytes(n) if self.noise.kind == "rademacher" else 0

    def step_bytes(self, n: int, probes: int, pool_size: int, copy: bool = True) -> int:
        """Bytes a step keeps besides the optimizer's own buffers: the pre-step copy (unless
        copy=False), the packed signs of `probes` probes, the noise pool, the chunk and kernel
        buffers."""
        kind = self.noise.kind
        # a lean pass draws one segment per term (the update's K and a probe's -eps)
        rows, kept = (probes + 1, min(n, SEGMENT)) if self.lean else (probes, n)
        signs = rows * (-(-kept // 64) * 8) if kind == "rademacher" else 0
        pool = 4 * pool_size if kind == "pool" else 0
        return 4 * n * copy + signs + pool + 8 * self.chunk + self.pass_bytes(n)

    def begin(self, store: ParamStore, copy: bool = True) -> np.ndarray:
        """Start a step: the trainable fp32 slice (theta), copied into `self.copy` (left
        None with copy=False: candidates written in place)."""
        theta = store.flat("float32")
        if theta.size == 0:
            raise InputError(f"{self.owner} needs trainable float32 parameters; none are "
                             "selected")
        if self.n is None:
            self.n = theta.size
        elif theta.size != self.n:
            raise InputError(f"store has {theta.size} trainable elements, this optimizer "
                             f"was set up for {self.n}")
        if copy:
            if self.copy is None:
                self.copy = np.empty_like(theta)
            np.copyto(self.copy, theta)
        self._signs.clear()
        return theta

    def combine(self, dst: np.ndarray, src: np.ndarray, terms: Sequence[Term]) -> None:
        """dst = src + sum_k coef_k z_k (float32, accumulated in term order, chunk by chunk).

        Args:
            dst, src: float32 [n] (may be the same array); terms: (coef, key) pairs, >= 1.
        """
        if self.noise.kind == "rademacher":
            self._combine_signs(dst, src, terms)
            return
        z, acc = self._zbuf, self._abuf
        for a, b in noise_chunks(dst.size, self.chunk):
            zc, ac = z[: b - a], acc[: b - a]
            for i, (coef, (seed, step, probe)) in enumerate(terms):
                self.noise.fill(zc, run_seed=seed, step=step, probe=probe, start=a)
                if i == 0:
                    np.multiply(zc, coef, out=ac)
                else:
                    np.multiply(zc, coef, out=zc)
                    np.add(ac, zc, out=ac)
            np.add(src[a:b], ac, out=dst[a:b])

    def _combine_signs(self, dst: np.ndarray, src: np.ndarray, terms: Sequence[Term]) -> None:
        """Rademacher `combine`: zo-sgd's sign kernels (`optim.kernels`; exactly +-coef, one
        pass for all terms, threaded over large slices; same bits for any thread count)."""
        coefs, n = [coef for coef, _ in terms], dst.size
        if not self.lean or n <= SEGMENT:
            self._pass.run(dst, src, coefs, [self.signs(key, n) for _, key in terms])
            return
        for a in range(0, n, SEGMENT):  # each element's float operations are the same
            b = min(a + SEGMENT, n)
            self._pass.run(dst[a:b], src[a:b], coefs, [
                draw_sign_range(*key, a, b, threads=self._pass.threads) for _, key in terms])

    @property
    def kept_sign_bytes(self) -> int:
        """Bytes of the packed signs this step keeps (0 in a lean arena's large passes)."""
        return sum(a.nbytes for a in self._signs.values())

    def signs(self, key: tuple[int, int, int], n: int) -> np.ndarray:
        """Packed Rademacher signs of probe `key` (drawn once per step)."""
        if key not in self._signs:
            self._signs[key] = draw_signs(*key, n, threads=self._pass.threads)
        return self._signs[key]

    def population(self, theta: np.ndarray, candidates: Sequence[Sequence[Term]]) -> Population:
        """A `Population` whose candidate j is copy + sum of `candidates[j]` (no terms: the copy).

        `place(j)` writes candidate j into theta; `fill` writes the very same values into rows
        (runs of one-term Rademacher candidates in one `signed_rows` call: the same float
        operations as `combine`).
        """
        copy = self.copy
        assert copy is not None
        by_signs = self.noise.kind == "rademacher"

        def write(dst: np.ndarray, j: int) -> None:
            if candidates[j]:
                self.combine(dst, copy, candidates[j])
            else:
                np.copyto(dst, copy)

        def fill(out: dict[str, np.ndarray], lo: int, hi: int) -> None:
            rows = out["float32"]
            j = lo
            while j < hi:
                end = j  # a run of one-term Rademacher candidates: one `signed_rows` call
                while end < hi and by_signs and len(candidates[end]) == 1:
                    end += 1
                if end == j:
                    write(rows[j - lo], j)
                    j += 1
                    continue
                terms = [candidates[i][0] for i in range(j, end)]
                signed_rows(rows[j - lo:end - lo], copy, [c for c, _ in terms],
                            [self.signs(key, copy.size) for _, key in terms])
                j = end

        return Population(len(candidates), lambda j: write(theta, j), fill)


def encode_array(a: np.ndarray) -> str:
    """A float32 array as base64 of its little-endian bytes (JSON-able optimizer state)."""
    return base64.b64encode(np.ascontiguousarray(a, "<f4").tobytes()).decode("ascii")


def decode_array(text: object, what: str) -> np.ndarray:
    """`encode_array` back: a float32 [n] array; InputError when `text` is not one."""
    try:
        raw = base64.b64decode(str(text), validate=True)
    except ValueError:
        raise InputError(f"bad {what} in optimizer state (not base64)") from None
    if len(raw) % 4 or not isinstance(text, str):
        raise InputError(f"bad {what} in optimizer state")
    return np.frombuffer(raw, "<f4").astype(np.float32)
