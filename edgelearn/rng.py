"""Portable, counter-based, chunk-size-independent perturbation noise for zeroth-order training.

Zeroth-order optimizers such as SPSA (Spall 1992, "Multivariate stochastic approximation using
a simultaneous perturbation gradient approximation"; Rademacher +-1 perturbations) and MeZO
(Malladi et al. 2023, "Fine-Tuning Language Models with Just Forward Passes") perturb every
parameter with a noise vector z, evaluate the loss, and later regenerate the *same* z to apply
the update instead of storing it. For models with ~1e8 parameters z must be produced in chunks
``[a, b)`` and never materialized in full.

Chunk independence: element ``i`` of z is a pure function of ``(run_seed, step, probe, i)``.
The triple is hashed by ``np.random.SeedSequence`` into a 128-bit Philox key (the same hash,
vectorized here over a block of KEY_BLOCK steps: ~30 us a key one by one, ~1 us in a block);
the Philox4x64 counter-mode stream under that key is a fixed sequence of uint64 words, and
element ``i`` reads only the words at a fixed position computed from ``i`` (word ``i // 64``
bit ``i % 64`` for Rademacher, words ``2i, 2i+1`` for Gaussian). Since Philox is counter
based, any word can be reached in O(1) by setting the counter, so a chunk ``[a, b)`` reads
exactly the words the whole vector would read at those positions, whatever the chunking.
Short vectors (at most BLOCK_DRAW_MAX_WORDS words: a head, a few norms) are drawn for a block
of KEY_BLOCK steps in one pass of a vectorized Philox4x64-10 (`philox4x64`, bit-equal to
numpy's; tests compare them), so a small model's step does not pay numpy's re-keying.

Kinds:

* ``"rademacher"``: +-1.0 from raw bits. Pure integer ops on the Philox raw stream, which numpy
  guarantees to be stable across versions and platforms, so values are identical on x86 and ARM.
* ``"gaussian"``: one standard normal per element by Box-Muller in float64, cast to float32.
  Bit-exact on the same platform and numpy build; ``log``/``cos`` come from the platform libm and
  may differ by an ulp across CPUs/libms, which can (rarely) change the float32 result.
* ``"pool"``: a shared noise table as in Salimans et al. 2017 ("Evolution Strategies as a
  Scalable Alternative to Reinforcement Learning"): a float32 N(0, 1) table generated once, and z
  is a cyclic window of it starting at an offset derived from ``(run_seed, step, probe)``. Cheap
  per step (a memcpy), but only ``pool_size`` distinct windows exist and windows overlap.

No global RNG state is read or written anywhere in this module.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Iterator

import numpy as np

NOISE_KINDS = ("rademacher", "gaussian", "pool")
DEFAULT_CHUNK = 1 << 16

# numpy's Philox4x64 emits 4 uint64 words per counter increment; `advance(k)` skips k blocks.
_WORDS_PER_BLOCK = 4
_BITS_PER_WORD = 64
_TWO_PI = 2.0 * math.pi
_INV_2_53 = 1.0 / float(1 << 53)
# Sub-chunk for Gaussian so float64 temporaries stay in cache for huge `out` arrays.
_GAUSS_BLOCK = 1 << 15


def _check_nonneg_int(name: str, value: object) -> int:
    if type(value) is int and value >= 0:  # the common case, without the checks below
        return value
    # bool is an int subclass; a True seed is almost certainly a bug, so reject it.
    if isinstance(value, bool) or not isinstance(value, int | np.integer):
        raise ValueError(f"{name} must be a non-negative int, got {type(value).__name__}")
    if value < 0:
        raise ValueError(f"{name} must be >= 0, got {value}")
    return int(value)


# numpy's SeedSequence constants (numpy/random/bit_generator.pyx; stable since numpy 1.17)
_INIT_A, _MULT_A, _INIT_B, _MULT_B = 0x43B0D7E5, 0x931E8875, 0x8B51F9DD, 0x58F38DED
_MIX_L, _MIX_R, _POOL, _MASK32 = 0xCA01F9DD, 0x4973F715, 4, 0xFFFFFFFF
#: keys derived at once for a block of steps (one numpy pass; a step then costs a dict lookup)
KEY_BLOCK = 256
#: blocks kept (4 KiB each)
_MAX_KEY_BLOCKS = 256
_key_blocks: dict[tuple[int, int, int], np.ndarray] = {}
_key_seen: set[tuple[int, int, int]] = set()  # blocks asked for one key so far
#: other probes' key blocks derived with one probe's (a step's probes), at most
_MAX_SIBLINGS = 63
_key_lock = threading.Lock()


def _u32_words(n: int) -> list[int]:
    """SeedSequence's entropy words of one int: 32-bit little-endian limbs, [0] for 0."""
    words = []
    while n > 0:
        words.append(n & _MASK32)
        n >>= 32
    return words or [0]


def seed_sequence_keys(entropy: np.ndarray) -> np.ndarray:
    """`SeedSequence(row).generate_state(2, uint64)` of every row, in one vectorized pass.

    The same integer hash as numpy's SeedSequence (pool of 4 words, no spawn key), run on
    columns: uint32 arithmetic wraps modulo 2**32 like the C code's, so the keys are bit-equal
    (tests compare them with `np.random.SeedSequence` over many tuples, large ints included).

    Args:
        entropy: uint32 [N, L], row i the entropy words of tuple i (`_u32_words` of each int,
            concatenated).
    Returns: uint64 [N, 2].
    """
    cols = [np.ascontiguousarray(entropy[:, i], np.uint32) for i in range(entropy.shape[1])]
    n = entropy.shape[0]
    hc = _INIT_A

    def hashmix(v: np.ndarray) -> np.ndarray:
        nonlocal hc
        v = v ^ np.uint32(hc)
        hc = (hc * _MULT_A) & _MASK32
        v *= np.uint32(hc)
        v ^= v >> np.uint32(16)
        return v

    def mix(x: np.ndarray, y: np.ndarray) -> np.ndarray:
        r = np.uint32(_MIX_L) * x
        r -= np.uint32(_MIX_R) * y
        r ^= r >> np.uint32(16)
        return r

    zero = np.zeros(n, np.uint32)
    pool = [hashmix(cols[i] if i < len(cols) else zero) for i in range(_POOL)]
    for src in range(_POOL):
        for dst in range(_POOL):
            if src != dst:
                pool[dst] = mix(pool[dst], hashmix(pool[src]))
    for src in range(_POOL, len(cols)):
        for dst in range(_POOL):
            pool[dst] = mix(pool[dst], hashmix(cols[src]))
    state = np.empty((n, 4), np.uint32)
    hb = _INIT_B
    for i in range(4):
        v = pool[i % _POOL] ^ np.uint32(hb)
        hb = (hb * _MULT_B) & _MASK32
        v *= np.uint32(hb)
        v ^= v >> np.uint32(16)
        state[:, i] = v
    return state.view(np.uint64)  # native order, as generate_state's view


def _step_blocks(run_seed: int, base: int, probes: list[int]) -> np.ndarray:
    """Keys of steps [base, base + KEY_BLOCK) (base a multiple of KEY_BLOCK < 2**64) of each
    probe (all with as many entropy words), one pass.

    KEY_BLOCK divides 2**32, so every step of the block has as many entropy words as base.
    Returns: uint64 [len(probes), KEY_BLOCK, 2]."""
    nw = len(_u32_words(base + KEY_BLOCK - 1))
    rows = KEY_BLOCK * len(probes)
    steps = np.tile(np.arange(base, base + KEY_BLOCK, dtype=np.uint64), len(probes))
    cols = [np.full(rows, w, np.uint32) for w in _u32_words(run_seed)]
    cols += [((steps >> np.uint64(32 * i)) & np.uint64(_MASK32)).astype(np.uint32)
             for i in range(nw)]
    words = np.array([_u32_words(p) for p in probes], np.uint32)  # [P, probe words]
    cols += [np.repeat(words[:, i], KEY_BLOCK) for i in range(words.shape[1])]
    return seed_sequence_keys(np.stack(cols, axis=1)).reshape(len(probes), KEY_BLOCK, 2)


def _key_tuple(run_seed: int, step: int, probe: int) -> tuple[int, int]:
    """The Philox key of (run_seed, step, probe) as two ints.

    numpy's SeedSequence costs ~30 us a key; derived KEY_BLOCK steps at a time it costs ~1 us.
    A block is derived the second time its (run_seed, probe) stream asks for a key in it
    (training and replay walk steps in order; a chunked fill of a huge vector asks the same
    triple ~1500 times), so streams asked once per block (keys indexed by something other
    than the step) keep the one-key cost. The last _MAX_KEY_BLOCKS blocks are kept."""
    if step >= 1 << 64:  # steps beyond uint64: numpy's own SeedSequence
        return _one_key(run_seed, step, probe)
    base = step - step % KEY_BLOCK
    where = (run_seed, base, probe)
    block = _key_blocks.get(where)
    if block is None:
        with _key_lock:
            if where not in _key_seen:  # first ask in this block: one key
                if len(_key_seen) >= 8 * _MAX_KEY_BLOCKS:
                    _key_seen.clear()
                _key_seen.add(where)
                return _one_key(run_seed, step, probe)
            # with the blocks of the other probes asked in this block (a step's q probes:
            # one pass; probes of as many entropy words, so their rows stack)
            nw = len(_u32_words(probe))
            siblings = [p for s, b, p in _key_seen if s == run_seed and b == base
                        and p != probe and (s, b, p) not in _key_blocks
                        and len(_u32_words(p)) == nw]
            probes = [probe, *siblings[:_MAX_SIBLINGS]]
            blocks = _step_blocks(run_seed, base, probes)
            for p, keys in zip(probes, blocks, strict=True):
                if len(_key_blocks) >= _MAX_KEY_BLOCKS:  # bounded: the oldest block goes
                    del _key_blocks[next(iter(_key_blocks))]
                _key_blocks[(run_seed, base, p)] = keys
            block = blocks[0]
    i = step - base
    return block.item(i, 0), block.item(i, 1)


def _one_key(run_seed: int, step: int, probe: int) -> tuple[int, int]:
    """`SeedSequence([run_seed, step, probe]).generate_state(2, uint64)` as two ints."""
    state = np.random.SeedSequence([run_seed, step, probe]).generate_state(2, np.uint64)
    return int(state[0]), int(state[1])


# Philox4x64-10 (Salmon et al. 2011, "Parallel random numbers: as easy as 1, 2, 3"; Random123,
# numpy's Philox): round multipliers and key increments
_PHILOX_M = (0xD2E7470EE14C6C93, 0xCA5A826395121157)
_PHILOX_W = (0x9E3779B97F4A7C15, 0xBB67AE8584CAA73B)
_PHILOX_ROUNDS = 10
_LO32, _SHIFT32 = np.uint64(_MASK32), np.uint64(32)
#: streams of at most this many words are drawn for KEY_BLOCK steps in one vectorized pass
#: (a step then reads its row; one by one, re-keying numpy's Philox costs more than the draw)
BLOCK_DRAW_MAX_WORDS = 32
#: bytes of sign blocks kept (the oldest go first)
_MAX_SIGN_BLOCK_BYTES = 2 << 20
#: Philox lanes (4 words each) one vectorized pass of `_draw_sign_blocks` computes at most
SIGN_PASS_MAX_LANES = 4096
_sign_blocks: dict[tuple[int, int, int, int], np.ndarray] = {}


def _mulhilo(a: int, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(high, low) 64-bit halves of the 128-bit products a * b[i], from 32-bit limbs."""
    a_lo, a_hi = np.uint64(a & _MASK32), np.uint64(a >> 32)
    b_lo, b_hi = b & _LO32, b >> _SHIFT32
    ll, lh, hl = a_lo * b_lo, a_lo * b_hi, a_hi * b_lo
    mid = (ll >> _SHIFT32) + (lh & _LO32) + (hl & _LO32)
    hi = a_hi * b_hi + (lh >> _SHIFT32) + (hl >> _SHIFT32) + (mid >> _SHIFT32)
    return hi, b * np.uint64(a)  # uint64 arrays wrap modulo 2**64: the low half


def philox4x64(keys: np.ndarray, counters: np.ndarray) -> np.ndarray:
    """Philox4x64-10 of many (key, counter) lanes in one vectorized pass, bit for bit numpy's.

    Args:
        keys: uint64 [L, 2], one Philox key per lane.
        counters: uint64 [L], the counter of each lane (its higher words 0).
    Returns: uint64 [L, 4]: the words `np.random.Philox(key=keys[i])` emits for block
        counters[i] (its first block is counter 1: numpy increments before it generates).
    """
    k0, k1 = keys[:, 0].copy(), keys[:, 1].copy()
    zero = np.zeros_like(counters)
    c0, c1, c2, c3 = counters.copy(), zero, zero, zero
    for r in range(_PHILOX_ROUNDS):
        if r:
            k0 += np.uint64(_PHILOX_W[0])
            k1 += np.uint64(_PHILOX_W[1])
        hi0, lo0 = _mulhilo(_PHILOX_M[0], c0)
        hi1, lo1 = _mulhilo(_PHILOX_M[1], c2)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
    return np.stack([c0, c1, c2, c3], axis=1)


def _sign_block(keys: np.ndarray, words: int) -> np.ndarray:
    """Packed signs (`rademacher_bytes`) of the streams under each of `keys` (uint64 [B, 2]):
    words [0, words) of each as little-endian bytes, uint8 [B, 8 * words], read-only."""
    blocks = -(-words // _WORDS_PER_BLOCK)
    lanes = np.repeat(keys, blocks, axis=0)
    counters = np.tile(np.arange(1, blocks + 1, dtype=np.uint64), len(keys))
    out = np.ascontiguousarray(philox4x64(lanes, counters).reshape(len(keys), -1)[:, :words],
                               "<u8")
    out.setflags(write=False)  # rows are handed out and shared: nobody may change them
    return out.view(np.uint8)


def cache_bytes() -> int:
    """The most bytes the process-wide caches of derived keys and drawn sign blocks hold
    (both bounded: the oldest blocks go first)."""
    return _MAX_KEY_BLOCKS * KEY_BLOCK * 2 * 8 + _MAX_SIGN_BLOCK_BYTES


def block_rademacher_bytes(run_seed: int, step: int, probe: int, words: int
                           ) -> np.ndarray | None:
    """`rademacher_bytes` of a vector of `words` Philox words (64 elements each), read from a
    block drawn for KEY_BLOCK steps at once; None when the stream is not drawn that way
    (longer than BLOCK_DRAW_MAX_WORDS, or its keys not derived in a block yet: see
    `_key_tuple`, which derives them from the second step asked in a block).

    Returns: read-only uint8 [8 * words].
    """
    if words > BLOCK_DRAW_MAX_WORDS or not type(run_seed) is type(step) is type(probe) is int:
        return None  # (a bool or a numpy int: drawn one by one, after the usual checks)
    base = step - step % KEY_BLOCK
    where = (run_seed, base, probe, words)
    block = _sign_blocks.get(where)
    if block is None:
        block = _draw_sign_blocks(run_seed, base, probe, words)
        if block is None:
            return None
    return block[step - base]


def _draw_sign_blocks(run_seed: int, base: int, probe: int, words: int) -> np.ndarray | None:
    """The sign block of `probe` in the key block (run_seed, base), drawn in one vectorized
    pass with those of other probes whose keys are derived and blocks not drawn (a step of q
    probes asks q blocks: one pass instead of q; philox4x64 works lane by lane, so the bytes
    are those of separate draws); at most half the kept bytes, and SIGN_PASS_MAX_LANES
    Philox lanes (their temporaries stay small: 16 probes in one pass raised a run's peak
    resident memory 1.5 MB), are drawn at once.

    Returns: read-only uint8 [KEY_BLOCK, 8 * words]; None when the probe's keys are not
    derived in a block (only checked non-negative ints have them)."""
    per_probe = KEY_BLOCK * -(-words // _WORDS_PER_BLOCK)  # Philox lanes of one probe
    room = max(1, min(_MAX_SIGN_BLOCK_BYTES // (2 * KEY_BLOCK * 8 * words),
                      SIGN_PASS_MAX_LANES // per_probe))
    with _key_lock:
        if (run_seed, base, probe) not in _key_blocks:
            return None
        others = [p for (s, b, p) in _key_blocks if s == run_seed and b == base
                  and p != probe and (s, b, p, words) not in _sign_blocks]
        probes = [probe, *others[: room - 1]]
        keys = np.concatenate([_key_blocks[(run_seed, base, p)] for p in probes])
    blocks = _sign_block(keys, words).reshape(len(probes), KEY_BLOCK, -1)
    with _key_lock:
        for p, block in reversed(list(zip(probes, blocks, strict=True))):  # probe's newest
            held = sum(b.nbytes for b in _sign_blocks.values())
            while _sign_blocks and held + block.nbytes > _MAX_SIGN_BLOCK_BYTES:
                held -= _sign_blocks.pop(next(iter(_sign_blocks))).nbytes  # the oldest go
            _sign_blocks[(run_seed, base, p, words)] = block
    return blocks[0]


def philox_key(run_seed: int, step: int, probe: int) -> np.ndarray:
    """Return the 128-bit Philox key for one noise vector.

    Args:
        run_seed: non-negative int identifying the training run.
        step: non-negative int optimizer step.
        probe: non-negative int index of the perturbation within the step.

    Returns:
        (2,) uint64 array, ``SeedSequence([run_seed, step, probe]).generate_state(2, uint64)``.
    """
    return np.array(philox_key_ints(run_seed, step, probe), dtype=np.uint64)


def philox_key_ints(run_seed: int, step: int, probe: int) -> tuple[int, int]:
    """`philox_key` as two Python ints (what a Philox state dict takes without conversion)."""
    return _key_tuple(
        _check_nonneg_int("run_seed", run_seed),
        _check_nonneg_int("step", step),
        _check_nonneg_int("probe", probe),
    )


def _raw_words(key: np.ndarray, first: int, count: int) -> np.ndarray:
    """Return words ``[first, first + count)`` of the Philox stream under ``key``.

    Args:
        key: (2,) uint64 Philox key.
        first: index of the first uint64 word, >= 0.
        count: number of words, >= 0.

    Returns:
        (count,) uint64 array.
    """
    bitgen = np.random.Philox(key=key)
    # advance() counts 4-word blocks and discards any buffered words, so it only lands on block
    # boundaries; skip the remaining `first % 4` words by drawing and dropping them.
    bitgen.advance(first // _WORDS_PER_BLOCK)
    skip = first % _WORDS_PER_BLOCK
    words = bitgen.random_raw(skip + count)
    return words[skip:]


def rademacher_bytes(run_seed: int, step: int, probe: int, n: int) -> np.ndarray:
    """Packed signs of a whole Rademacher vector: byte i // 8, bit i % 8 is element i.

    The same bits `Noise("rademacher").fill` expands (bit set -> +1), drawn once: n/8 bytes,
    so an optimizer can reuse one probe's signs across several passes without regenerating.

    Args:
        run_seed, step, probe: the noise key (non-negative ints).
        n: vector length (elements).
    Returns: uint8 array of ceil(n / 64) * 8 bytes.
    """
    n = _check_nonneg_int("n", n)
    words = _raw_words(philox_key(run_seed, step, probe), 0, -(-n // _BITS_PER_WORD))
    return words.astype("<u8", copy=False).view(np.uint8)


# Row b = the 8 signs (+1 / -1, float32) packed in byte b, bit j -> column j.
_BYTE_SIGNS = np.where((np.arange(256)[:, None] >> np.arange(8)) & 1, 1.0, -1.0).astype(
    np.float32)


def sign_table(coef: np.float32) -> np.ndarray:
    """(256, 8) float32 table: row b holds coef * z for the 8 elements packed in byte b.

    `table[packed_bytes]` expands packed signs into coef * z exactly (+-coef, including the
    sign of zero), in one gather instead of unpack + convert + multiply.
    """
    # +-1 * c is exact in float32 (and gives -0.0 for c == 0, like c * z would).
    return _BYTE_SIGNS * np.float32(coef)


def noise_chunks(n: int, chunk: int = DEFAULT_CHUNK) -> Iterator[tuple[int, int]]:
    """Yield ``(start, stop)`` ranges covering ``[0, n)`` in order.

    Args:
        n: total number of elements, >= 0.
        chunk: elements per range, >= 1 (the last range may be shorter).

    Yields:
        (start, stop) int pairs with ``stop - start <= chunk``.
    """
    n = _check_nonneg_int("n", n)
    chunk = _check_nonneg_int("chunk", chunk)
    if chunk == 0:
        raise ValueError("chunk must be >= 1, got 0")
    for start in range(0, n, chunk):
        yield start, min(start + chunk, n)


class Noise:
    """z(run_seed, step, probe) in chunks."""

    def __init__(
        self, kind: str = "rademacher", *, pool_size: int = 1 << 22, pool_seed: int = 0
    ) -> None:
        """Configure the noise generator.

        Args:
            kind: one of ``NOISE_KINDS``.
            pool_size: entries of the shared float32 table, >= 1 (used by ``"pool"`` only).
            pool_seed: non-negative int seeding the shared table (``"pool"`` only).
        """
        if kind not in NOISE_KINDS:
            raise ValueError(f"unknown noise kind {kind!r}; expected one of {NOISE_KINDS}")
        self.kind = kind
        self.pool: np.ndarray | None = None
        if kind == "pool":
            pool_size = _check_nonneg_int("pool_size", pool_size)
            if pool_size == 0:
                raise ValueError("pool_size must be >= 1, got 0")
            pool_seed = _check_nonneg_int("pool_seed", pool_seed)
            gen = np.random.Generator(np.random.Philox(key=philox_key(pool_seed, 0, 0)))
            self.pool = gen.standard_normal(pool_size, dtype=np.float32)
            # Read-only: a caller mutating the table would silently change every later z.
            self.pool.setflags(write=False)

    def fill(
        self, out: np.ndarray, *, run_seed: int, step: int, probe: int, start: int
    ) -> np.ndarray:
        """Write ``z[start : start + out.size]`` into ``out`` and return it.

        Args:
            out: (m,) float32, C-contiguous, writeable; overwritten.
            run_seed: non-negative int run seed.
            step: non-negative int optimizer step.
            probe: non-negative int probe index within the step.
            start: non-negative int index of ``out[0]`` within z.

        Returns:
            ``out``, holding unitless noise (+-1 or ~N(0, 1) values).
        """
        if not isinstance(out, np.ndarray):
            raise ValueError(f"out must be a numpy array, got {type(out).__name__}")
        if out.dtype != np.float32:
            raise ValueError(f"out must have dtype float32, got {out.dtype}")
        if out.ndim != 1:
            raise ValueError(f"out must be 1-D, got shape {out.shape}")
        if not out.flags.c_contiguous or not out.flags.writeable:
            raise ValueError("out must be C-contiguous and writeable")
        start = _check_nonneg_int("start", start)
        key = philox_key(run_seed, step, probe)
        if out.size == 0:
            return out
        if self.kind == "rademacher":
            self._fill_rademacher(out, key, start)
        elif self.kind == "gaussian":
            for a in range(0, out.size, _GAUSS_BLOCK):
                part = out[a : a + _GAUSS_BLOCK]
                self._fill_gaussian(part, key, start + a)
        else:
            self._fill_pool(out, key, start)
        return out

    @staticmethod
    def _fill_rademacher(out: np.ndarray, key: np.ndarray, start: int) -> None:
        m = out.size
        first_word = start // _BITS_PER_WORD
        last_word = (start + m - 1) // _BITS_PER_WORD
        words = _raw_words(key, first_word, last_word - first_word + 1)
        # '<u8' makes byte 0 the least significant byte on any host, so with bitorder="little"
        # bit j of a word lands at position j: the mapping is endianness independent.
        bits = np.unpackbits(words.astype("<u8", copy=False).view(np.uint8), bitorder="little")
        lo = start - first_word * _BITS_PER_WORD
        np.multiply(bits[lo : lo + m], 2, out=out, dtype=np.float32)
        out -= 1.0

    @staticmethod
    def _fill_gaussian(out: np.ndarray, key: np.ndarray, start: int) -> None:
        m = out.size
        words = _raw_words(key, 2 * start, 2 * m)
        # Top 53 bits -> uniform in float64; u1 in (0, 1] so log(u1) is finite.
        u1 = ((words[0::2] >> np.uint64(11)).astype(np.float64) + 1.0) * _INV_2_53
        u2 = (words[1::2] >> np.uint64(11)).astype(np.float64) * _INV_2_53
        np.log(u1, out=u1)
        u1 *= -2.0
        np.sqrt(u1, out=u1)
        u2 *= _TWO_PI
        np.cos(u2, out=u2)
        np.multiply(u1, u2, out=out, casting="same_kind")

    def _fill_pool(self, out: np.ndarray, key: np.ndarray, start: int) -> None:
        pool = self.pool
        assert pool is not None  # set in __init__ for kind == "pool"
        size = pool.size
        pos = (int(key[0]) % size + start) % size
        done = 0
        m = out.size
        # Copy contiguous runs of the table, wrapping around; no index array needed.
        while done < m:
            take = min(m - done, size - pos)
            out[done : done + take] = pool[pos : pos + take]
            done += take
            pos = 0
