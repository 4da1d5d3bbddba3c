"""Fast elementwise kernels of zeroth-order steps over packed Rademacher signs.

A ZO step's cost beyond its forwards is a few passes `dst = src + sum_k c_k z_k` over the
trainable slice, with z_k = +-1 drawn from packed sign bits (`edgelearn.rng.rademacher_bytes`).
This module does those passes, and the draws, as fast as numpy allows:

  * one pass per call whatever the number of terms: per chunk, c_0 z_0 is gathered from a
    256-row table indexed by the packed sign bytes (each row is the 8 values a byte packs, as
    one 32-byte item, so a gather is one fixed-size copy), further terms are gathered and
    added in the chunk's buffer (in cache), and `src + acc` is written to `dst`;
  * the byte indices of a chunk are widened to intp in a reused buffer and gathered with
    mode="wrap" (no per-call index allocation, no per-index bounds error path);
  * large slices are split into contiguous blocks of chunks run by a small thread pool (numpy
    releases the GIL in `take`, its ufuncs and Philox's `random_raw`);
  * small slices (at most SMALL_MAX elements: a head, a few norms) skip the per-coef tables,
    whose construction costs more than the pass: the signs are expanded to +-1.0 once per
    sign array and multiplied by each coef, c * (+-1.0) being exactly the table entry +-c.

A pass works in chunks of PASS_CHUNK elements (256 Ki; the buffers take 9 bytes an element
per thread, at most the slice's size): per chunk it makes a few numpy calls, and with 64 Ki
chunks their fixed cost (and the GIL handed between the workers at each) was a third of a
pass: 12.6M elements on 2 threads, median of 12 interleaved passes, 9.7 ms at 64 Ki, 6.8 ms
at 256 Ki, 6.3 ms at 512 Ki (today's 2-core box, where a second thread gains little: the add
streams at memory speed).

Measured (12.6M elements, one thread, the project's 2-core box): a pass takes ~6.7 ms CPU,
about half of it the add (streamed at memory speed), 40% the gather, 10% widening the
indices (uint8 indices straight into `take` cost the same: numpy widens them itself; a
65536-row table of 16-element items is slower). Two passes fused into one (the arena read
and written once; tried as zo-sgd's update deferred into the next step's first pass) saved
~6% of a 12.6M MLP step's CPU time and nothing measurable in wall time: the passes are bound
by numpy's per-element work, not by memory traffic, so that was not adopted.

Determinism: every element goes through the same float32 operations in the same order
(acc = c_0 z_0; acc = acc + c_k z_k for k = 1..; dst = src + acc), whatever the chunk size
and the thread count, so results are bit-identical for any `threads` and `chunk`, and to
`ZOSGD._combine` on the same terms. `draw_signs` returns the very bytes of
`rademacher_bytes`, drawn in parallel blocks (Philox is counter based: a block starts at its
own counter); a short vector's bytes come from a block drawn for 256 steps at once
(`edgelearn.rng.block_rademacher_bytes`).
"""

from __future__ import annotations

import functools
import os
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from edgelearn.rng import (
    block_rademacher_bytes,
    philox_key_ints,
    sign_table,
)

#: below this many elements a pass or a draw runs on the calling thread (pool overhead wins)
PARALLEL_MIN = 1 << 20
#: up to this many elements a pass expands the signs to +-1.0 and multiplies (no per-coef
#: table: building one costs more than the pass itself on a small slice; same values)
SMALL_MAX = 1 << 14
#: bytes of gathered values `signed_rows` holds at once (a block of columns of all rows)
ROWS_BLOCK_BYTES = 4 << 20
#: elements per chunk of a large pass (module docstring: fewer, larger chunks cut the fixed
#: per-call cost; 9 bytes an element of buffers per thread)
PASS_CHUNK = 1 << 18
#: default worker threads (None in the options): the cores this process may use, at most 4
MAX_DEFAULT_THREADS = 4
#: Philox4x64 emits 4 words per counter block; `advance` moves by blocks
_WORDS_PER_BLOCK = 4
_ZERO_BUFFER = (0, 0, 0, 0)

#: post(acc, a, b): in-place change of a pass's sum of terms over elements [a, b)
Post = Callable[[np.ndarray, int, int], None]

_pools: dict[int, ThreadPoolExecutor] = {}
_local = threading.local()  # per-thread Philox, re-keyed for each draw
if hasattr(os, "register_at_fork"):  # a forked child has none of the parent's pool threads
    os.register_at_fork(after_in_child=_pools.clear)
_pools_lock = threading.Lock()


def default_threads() -> int:
    """Worker threads for elementwise passes: usable cores, capped at MAX_DEFAULT_THREADS."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    return max(1, min(cores, MAX_DEFAULT_THREADS))


def _pool(threads: int) -> ThreadPoolExecutor:
    """The process-wide pool of `threads` workers (created once, reused by every kernel)."""
    with _pools_lock:
        pool = _pools.get(threads)
        if pool is None:
            pool = _pools[threads] = ThreadPoolExecutor(threads, "edgelearn-zo")
        return pool


def _blocks(n: int, parts: int, align: int) -> list[tuple[int, int]]:
    """[0, n) cut into at most `parts` contiguous ranges whose starts are multiples of align."""
    step = -(-n // parts)
    step = -(-step // align) * align
    return [(a, min(a + step, n)) for a in range(0, n, step)]


def sign_items(coef: np.float32) -> np.ndarray:
    """(256,) 32-byte items: item b = the 8 float32 values coef * z packed in byte b.

    Read-only and cached by the bits of coef (a step's +-eps tables recur every step)."""
    return _sign_items(int(np.float32(coef).view(np.uint32)))


@functools.lru_cache(maxsize=64)
def _sign_items(bits: int) -> np.ndarray:
    items = np.ascontiguousarray(sign_table(np.uint32(bits).view(np.float32))).view("V32")
    items = items.reshape(256)
    items.setflags(write=False)
    return items


#: (256,) 32-byte items: item b = the 8 signs (+1.0 / -1.0) packed in byte b
_ONES = sign_items(np.float32(1.0))


def _distinct_signs(signs: Sequence[np.ndarray], n: int) -> tuple[np.ndarray, list[int]]:
    """The +-1.0 float32 signs of each distinct array among `signs` (by identity), [d, n],
    and which row each of `signs` reads.

    When every array is read-only down to the memory it views (the short vectors' blocks,
    `edgelearn.rng.block_rademacher_bytes`, which nobody may change) the expansion is kept
    for the next call: a small step's probe rows and its update read the same signs."""
    first = signs[0]
    if len(signs) <= 2 and signs[-1] is first:  # one probe's pair of rows, a 1-term pass
        which, distinct = [0] * len(signs), [first]
    else:
        slot: dict[int, int] = {}  # id of a sign array -> its row among the distinct ones
        which = [slot.setdefault(id(packed), len(slot)) for packed in signs]
        distinct = list({id(p): p for p in signs}.values())
    key = (n, *map(id, distinct))
    last = _last_expanded[0]  # one tuple, replaced whole: consistent across threads
    if last is not None and last[0] == key:  # ids of arrays it holds: still those arrays
        return last[2], which
    zf = expand_signs(distinct, n)
    if all(_frozen(p) for p in distinct):
        zf.flags.writeable = False
        _last_expanded[0] = (key, distinct, zf)  # holding the arrays: their ids stay theirs
    return zf, which


def _frozen(a: np.ndarray) -> bool:
    """True when neither `a` nor any array it views can be written (so its values stay)."""
    while isinstance(a, np.ndarray):
        if a.flags.writeable:
            return False
        a = a.base
    return True


#: the last read-only expansion of `_distinct_signs`: ((n, *ids of the sign arrays), the
#: arrays, signs [d, n])
_last_expanded: list[tuple[tuple[int, ...], list[np.ndarray], np.ndarray] | None] = [None]


def _repeats(which: list[int], d: int) -> int:
    """r when `which` is [0]*r + [1]*r + ... + [d-1]*r (probe rows: +eps z_k, -eps z_k),
    else 0."""
    r = len(which) // d
    return r if r * d == len(which) and all(w == i // r for i, w in enumerate(which)) else 0


def _small_rows(rows: np.ndarray, src: np.ndarray, coefs: Sequence[np.float32],
                signs: Sequence[np.ndarray]) -> None:
    """`signed_rows` for slices of at most SMALL_MAX elements: each distinct sign array is
    expanded once (probe rows come in pairs +eps z_k, -eps z_k over the same signs)."""
    z, which = _distinct_signs(signs, src.size)
    expanded_rows(rows, src, coefs, z, which)


def expand_signs(signs: Sequence[np.ndarray], n: int) -> np.ndarray:
    """Packed signs expanded to +-1.0 float32, one row per sign array, in one gather.

    Args:
        signs: d packed sign arrays (uint8, >= ceil(n / 8) bytes each).
        n: elements.
    Returns: float32 [d, n] (a view of a [d, ceil(n / 8) * 8] array).
    """
    nb = -(-n // 8)
    packed = np.concatenate([p[:nb] for p in signs])  # (np.stack costs twice as much)
    return _ONES.take(packed, mode="wrap").view(np.float32).reshape(len(signs), -1)[:, :n]


def expanded_rows(rows: np.ndarray, src: np.ndarray, coefs: Sequence[np.float32],
                  z: np.ndarray, which: Sequence[int]) -> None:
    """rows[j] = (coefs[j] * z[which[j]]) + src, from signs already expanded to +-1.0.

    c * (+-1.0) is exactly the table entry +-c, and float addition commutes bit for bit, so
    the rows equal `signed_rows`' gathered ones.

    Args:
        rows: float32 [>= K, >= n], overwritten in [:K, :n].
        src: float32 [n].
        coefs: K float32 scalars.
        z: float32 [d, n] signs (`expand_signs`); which: K rows of z, one per coef.
    """
    k, n = len(coefs), src.size
    out = rows[:k, :n]
    d = len(z)
    if k <= 2:  # one probe's pair: a multiply per row costs less than a broadcast's setup
        for j in range(k):
            np.multiply(z[which[j]], coefs[j], out=out[j])
        np.add(out, src, out=out)
        return
    col = np.array(coefs, np.float32)
    r = _repeats(list(which), d)
    if r and out.flags.c_contiguous:  # rows of the same signs: broadcast, no row copies
        np.multiply(z[:, None, :], col.reshape(d, r, 1), out=out.reshape(d, r, n))
    else:
        np.multiply(z.take(which, axis=0), col[:, None], out=out)
    np.add(out, src, out=out)


def signed_rows(rows: np.ndarray, src: np.ndarray, coefs: Sequence[np.float32],
                signs: Sequence[np.ndarray]) -> None:
    """rows[j] = src + coefs[j] * z_j for every j: per block of columns one gather for all
    rows and one add (small slices: `expanded_rows`).

    The same float32 operations as `SignPass.run(rows[j], src, [coefs[j]], [signs[j]])`.
    The gathered values go through a buffer of at most ROWS_BLOCK_BYTES (a [K, n] one would
    add K candidates' worth of memory to a step's peak).

    Args:
        rows: float32 [K, n] (rows C-contiguous), overwritten.
        src: float32 [n].
        coefs: K float32 scalars; signs: K packed sign arrays of >= ceil(n / 8) bytes.
    """
    k, n = len(coefs), src.size
    if k == 0:
        return
    if n <= SMALL_MAX:
        _small_rows(rows, src, coefs, signs)
        return
    slots: dict[bytes, int] = {}  # one table per distinct coef (probes: +eps and -eps)
    offsets = [256 * slots.setdefault(np.float32(c).tobytes(), len(slots)) for c in coefs]
    tables = np.concatenate([sign_items(np.frombuffer(b, np.float32)[0]) for b in slots])
    cols = min(max(8, ROWS_BLOCK_BYTES // (4 * k) // 8 * 8), -(-n // 8) * 8)
    idx = np.empty((k, cols // 8), np.intp)
    vals = np.empty((k, cols // 8), "V32")
    for a in range(0, n, cols):
        b = min(a + cols, n)
        ia, ib = a // 8, -(-b // 8)
        for j, (packed, off) in enumerate(zip(signs, offsets, strict=True)):
            # row j reads its coef's table: byte indices offset into the stacked tables
            np.copyto(idx[j, : ib - ia], packed[ia:ib], casting="unsafe")
            if off:
                idx[j, : ib - ia] += off
        np.take(tables, idx[:, : ib - ia], out=vals[:, : ib - ia], mode="wrap")
        np.add(src[a:b], vals[:, : ib - ia].view(np.float32)[:, : b - a], out=rows[:k, a:b])


class SignPass:
    """Runs `dst = src + sum_k coef_k z_k` passes; keeps per-thread chunk buffers.

    Args:
        chunk: elements per chunk (a multiple of 8; results do not depend on it; buffers are
            sized to the smaller of chunk and the largest slice passed).
        threads: worker threads for slices of at least PARALLEL_MIN elements (None:
            `default_threads()`; results do not depend on it).
    """

    def __init__(self, chunk: int = PASS_CHUNK, threads: int | None = None) -> None:
        if chunk < 8 or chunk % 8:
            raise ValueError(f"chunk must be a positive multiple of 8, got {chunk}")
        self.chunk = chunk
        self.threads = default_threads() if threads is None else max(1, int(threads))
        self._bufs: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []

    def buffer_bytes(self, n: int) -> int:
        """Bytes of chunk buffers a pass over n elements allocates (all threads)."""
        return 9 * min(self.chunk, -(-n // 8) * 8) * self.threads

    def _buffers(self, i: int, elements: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Worker i's (acc, tmp) 32-byte item buffers and intp index buffer, of at least
        `elements` (<= chunk) elements each."""
        k = elements // 8
        if i < len(self._bufs) and len(self._bufs[i][2]) >= k:
            return self._bufs[i]
        bufs = (np.empty(k, "V32"), np.empty(k, "V32"), np.empty(k, np.intp))
        if i < len(self._bufs):
            self._bufs[i] = bufs
        else:
            self._bufs.append(bufs)
        return bufs

    def run(self, dst: np.ndarray, src: np.ndarray, coefs: Sequence[np.float32],
            signs: Sequence[np.ndarray], post: Post | None = None) -> None:
        """dst = src + sum_k coefs[k] * z_k, z_k the packed signs `signs[k]`.

        Args:
            dst, src: float32 [n], C-contiguous (dst may be src: the pass is in place).
            coefs: float32 scalars, one per term (at least one).
            signs: uint8 [>= ceil(n / 8)] packed signs per term (bit i % 8 of byte i // 8).
            post: post(acc, a, b) changes the sum of the terms over elements [a, b) in place
                before src is added (zo-sgd's per-tensor group multipliers); called on
                disjoint ranges, from worker threads on large slices.
        """
        n = dst.size
        if n <= SMALL_MAX and post is None:
            _small_pass(dst, src, coefs, signs)
            return
        items = [sign_items(c) for c in coefs]  # cached
        if n < PARALLEL_MIN or self.threads == 1:
            self._range(dst, src, items, signs, 0, n, 0, post)
            return
        parts = _blocks(n, self.threads, 64)  # any multiple of 8 gives the same bits
        futures = [_pool(self.threads).submit(self._range, dst, src, items, signs, a, b, i,
                                              post)
                   for i, (a, b) in enumerate(parts)]
        for f in futures:
            f.result()

    def _range(self, dst: np.ndarray, src: np.ndarray, items: list[np.ndarray],
               signs: Sequence[np.ndarray], lo: int, hi: int, worker: int,
               post: Post | None = None) -> None:
        """The pass over elements [lo, hi) (lo a multiple of 8), with worker's buffers."""
        acc, tmp, idx = self._buffers(worker, min(self.chunk, -(-(hi - lo) // 8) * 8))
        accf = acc.view(np.float32)
        for a in range(lo, hi, self.chunk):
            b = min(a + self.chunk, hi)
            ia, ib = a // 8, -(-b // 8)
            k = ib - ia
            for t, (table, packed) in enumerate(zip(items, signs, strict=True)):
                np.copyto(idx[:k], packed[ia:ib], casting="unsafe")
                np.take(table, idx[:k], out=acc[:k] if t == 0 else tmp[:k], mode="wrap")
                if t:
                    np.add(accf[: 8 * k], tmp[:k].view(np.float32), out=accf[: 8 * k])
            if post is not None:
                post(accf[: b - a], a, b)
            np.add(src[a:b], accf[: b - a], out=dst[a:b])


def _small_pass(dst: np.ndarray, src: np.ndarray, coefs: Sequence[np.float32],
                signs: Sequence[np.ndarray]) -> None:
    """`SignPass.run` on at most SMALL_MAX elements (`expanded_pass` of the distinct signs)."""
    z, which = _distinct_signs(signs, dst.size)
    expanded_pass(dst, src, coefs, z, which)


def expanded_pass(dst: np.ndarray, src: np.ndarray, coefs: Sequence[np.float32],
                  z: np.ndarray, which: Sequence[int]) -> None:
    """dst = src + sum_k coefs[k] * z[which[k]], from signs already expanded to +-1.0: the
    values of `SignPass.run` (c * (+-1.0) is exactly the table entry +-c), summed in the same
    order (acc = t_0; acc = acc + t_k, one add per term: `np.add.reduce` may sum pairwise).

    Args:
        dst, src: float32 [n] (dst may be src).
        coefs: float32 scalars, one per term (at least one).
        z: float32 [d, n] signs (`expand_signs`); which: the row of z of each term.
    """
    if len(coefs) == 1 and not np.may_share_memory(dst, src):  # the product lands in dst
        np.multiply(z[which[0]], np.float32(coefs[0]), out=dst)
        np.add(src, dst, out=dst)
        return
    if len(coefs) == 1:
        acc = np.multiply(z[which[0]], np.float32(coefs[0]))
    else:
        rows = z if len(z) == len(which) and list(which) == list(range(len(z))) else \
            z.take(which, axis=0)
        terms = np.multiply(rows, np.array(coefs, np.float32)[:, None])
        acc = terms[0]
        for term in terms[1:]:
            np.add(acc, term, out=acc)
    np.add(src, acc, out=dst)


def draw_signs(run_seed: int, step: int, probe: int, n: int, *,
               threads: int | None = None) -> np.ndarray:
    """Packed Rademacher signs of z(run_seed, step, probe): `rademacher_bytes`' exact bytes.

    Args:
        run_seed, step, probe: the noise key (non-negative ints).
        n: vector length (elements).
        threads: parallel blocks for n >= PARALLEL_MIN (None: `default_threads()`).
    Returns: uint8 array of ceil(n / 64) * 8 bytes (read-only when drawn in a block: short
        vectors, `edgelearn.rng.block_rademacher_bytes`).
    """
    signs = block_rademacher_bytes(run_seed, step, probe, -(-n // 64))  # short: in blocks
    if signs is not None:
        return signs
    return draw_sign_range(run_seed, step, probe, 0, n, threads=threads)


def draw_sign_range(run_seed: int, step: int, probe: int, start: int, stop: int, *,
                    threads: int | None = None) -> np.ndarray:
    """Packed signs of elements [start, stop) of z(run_seed, step, probe): bytes start // 8
    on of `rademacher_bytes` (Philox is counter based: a range is drawn on its own).

    Args:
        run_seed, step, probe: the noise key (non-negative ints).
        start, stop: element range; start a multiple of 256 (one Philox block of 4 words).
        threads: parallel blocks for ranges of >= PARALLEL_MIN elements (None:
            `default_threads()`).
    Returns: uint8 array of ceil((stop - start) / 64) * 8 bytes.
    """
    if start % (64 * _WORDS_PER_BLOCK) or stop < start:
        raise ValueError(f"bad sign range [{start}, {stop}): start a multiple of 256")
    key = philox_key_ints(run_seed, step, probe)  # checks the ints; derives keys in blocks
    w0, w1 = start // 64, -(-stop // 64)
    if stop - start >= PARALLEL_MIN:
        threads = default_threads() if threads is None else max(1, int(threads))
    if stop - start < PARALLEL_MIN or threads == 1:
        return _words(key, w0, w1).astype("<u8", copy=False).view(np.uint8)
    out = np.empty(w1 - w0, "<u8")
    futures = [_pool(threads).submit(_draw, key, out, a, b, w0)
               for a, b in _blocks(w1 - w0, threads, _WORDS_PER_BLOCK)]
    for f in futures:
        f.result()
    return out.view(np.uint8)


def _words(key: tuple[int, int], a: int, b: int) -> np.ndarray:
    """Words [a, b) of the Philox stream under `key` (a on a block boundary), uint64.

    Re-keys this thread's Philox by setting its state: the counter at block a // 4 and an
    empty buffer is exactly `Philox(key=key)` advanced by a // 4 blocks, and skips the OS
    entropy read a new Philox makes for its unused seed (the larger part of a small draw).
    The state is given as Python ints (the setter reads numpy arrays element by element,
    several times slower).
    """
    gen = getattr(_local, "philox", None)
    if gen is None:
        gen = _local.philox = np.random.Philox(key=np.array(key, np.uint64))
    gen.state = {"bit_generator": "Philox",
                 "state": {"counter": [a // _WORDS_PER_BLOCK, 0, 0, 0], "key": key},
                 "buffer": _ZERO_BUFFER, "buffer_pos": _WORDS_PER_BLOCK, "has_uint32": 0,
                 "uinteger": 0}
    return gen.random_raw(b - a)


def _draw(key: tuple[int, int], out: np.ndarray, a: int, b: int, first: int = 0) -> None:
    """Words [first + a, first + b) of the stream into out[a:b] (a parallel block of
    `draw_sign_range`; first on a block boundary)."""
    out[a:b] = _words(key, first + a, first + b)
