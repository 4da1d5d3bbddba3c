"""Tests for edgelearn.rng: chunk independence, determinism, distribution and golden values."""

from __future__ import annotations

import numpy as np
import pytest

from edgelearn.rng import (
    BLOCK_DRAW_MAX_WORDS,
    DEFAULT_CHUNK,
    KEY_BLOCK,
    NOISE_KINDS,
    Noise,
    block_rademacher_bytes,
    noise_chunks,
    philox4x64,
    philox_key,
    philox_key_ints,
    rademacher_bytes,
    seed_sequence_keys,
)

N = 5000
# Small table keeps construction fast and makes the wrap-around path run in the chunk tests.
POOL_SIZE = 1 << 12
ARGS = {"run_seed": 1, "step": 2, "probe": 3}


def make(kind: str) -> Noise:
    return Noise(kind, pool_size=POOL_SIZE) if kind == "pool" else Noise(kind)


def whole(noise: Noise, n: int = N, **kw: int) -> np.ndarray:
    args = {**ARGS, **kw}
    return noise.fill(np.empty(n, np.float32), start=0, **args)


@pytest.mark.parametrize("kind", NOISE_KINDS)
@pytest.mark.parametrize("chunk", [1, 7, 63, 64, 65, 1000, 4096, N])
def test_chunked_equals_whole(kind: str, chunk: int) -> None:
    noise = make(kind)
    ref = whole(noise)
    out = np.full(N, np.nan, np.float32)
    for a, b in noise_chunks(N, chunk):
        noise.fill(out[a:b], start=a, **ARGS)
    np.testing.assert_array_equal(out, ref)


@pytest.mark.parametrize("kind", NOISE_KINDS)
@pytest.mark.parametrize("offset", [1, 3, 63, 64, 129, 255, 256, 1001])
def test_unaligned_start_equals_whole(kind: str, offset: int) -> None:
    # Starts that are not multiples of 64 (rademacher word) or 2 (gaussian block) must agree.
    noise = make(kind)
    ref = whole(noise)
    out = noise.fill(np.empty(N - offset - 5, np.float32), start=offset, **ARGS)
    np.testing.assert_array_equal(out, ref[offset : N - 5])


@pytest.mark.parametrize("kind", NOISE_KINDS)
def test_same_args_same_values(kind: str) -> None:
    np.testing.assert_array_equal(whole(make(kind)), whole(make(kind)))


@pytest.mark.parametrize("kind", NOISE_KINDS)
@pytest.mark.parametrize("change", [{"run_seed": 4}, {"step": 5}, {"probe": 6}])
def test_different_args_different_values(kind: str, change: dict[str, int]) -> None:
    noise = make(kind)
    assert not np.array_equal(whole(noise), whole(noise, **change))


def test_rademacher_matches_bit_spec() -> None:
    # Independent reference: element i = bit (i % 64) of raw word i // 64 of the keyed stream.
    n = 64 * 9 + 5
    words = np.random.Philox(key=philox_key(1, 2, 3)).random_raw(10)
    expected = [1.0 if (int(words[i // 64]) >> (i % 64)) & 1 else -1.0 for i in range(n)]
    np.testing.assert_array_equal(whole(Noise(), n), np.array(expected, np.float32))


def test_rademacher_values_and_mean() -> None:
    z = whole(Noise(), 100_000)
    assert set(np.unique(z).tolist()) == {-1.0, 1.0}
    # std of the mean of 1e5 +-1 values is 1/sqrt(1e5) ~ 0.0032; 0.02 is > 6 sigma.
    assert abs(float(z.mean(dtype=np.float64))) < 0.02


def test_gaussian_moments() -> None:
    z = whole(Noise("gaussian"), 100_000).astype(np.float64)
    # For 1e5 N(0,1) samples: sd(mean) ~ 0.0032, sd(std) ~ 0.0022; tolerances are > 6 sigma.
    assert abs(z.mean()) < 0.02
    assert abs(z.std() - 1.0) < 0.015
    assert np.isfinite(z).all()


def test_pool_is_window_of_table() -> None:
    noise = Noise("pool", pool_size=POOL_SIZE, pool_seed=7)
    assert noise.pool is not None
    offset = int(philox_key(1, 2, 3)[0]) % POOL_SIZE
    idx = (offset + np.arange(N)) % POOL_SIZE
    np.testing.assert_array_equal(whole(noise), noise.pool[idx])


def test_golden_rademacher() -> None:
    expected = [-1, 1, 1, -1, -1, 1, 1, -1, -1, 1, -1, 1, 1, -1, -1, -1]
    z = Noise("rademacher").fill(np.empty(16, np.float32), start=0, **ARGS)
    np.testing.assert_array_equal(z, np.array(expected, np.float32))


def test_golden_gaussian() -> None:
    expected = np.array([0.8081587, 1.6325673, -0.974475, 0.3670179], np.float32)
    z = Noise("gaussian").fill(np.empty(4, np.float32), start=0, **ARGS)
    # Exact on the platform the literals were computed on (x86-64, numpy 2.4); another libm
    # could differ by an ulp in log/cos, hence the fallback tolerance of a few float32 ulps.
    if not np.array_equal(z, expected):
        np.testing.assert_allclose(z, expected, rtol=1e-6, atol=0)


def test_philox_key_shape_and_determinism() -> None:
    key = philox_key(1, 2, 3)
    assert key.dtype == np.uint64
    assert key.shape == (2,)
    expected = np.random.SeedSequence([1, 2, 3]).generate_state(2, np.uint64)
    np.testing.assert_array_equal(key, expected)


def test_noise_chunks_cover_range() -> None:
    assert list(noise_chunks(10, 4)) == [(0, 4), (4, 8), (8, 10)]
    assert list(noise_chunks(0, 4)) == []
    assert next(noise_chunks(DEFAULT_CHUNK * 2)) == (0, DEFAULT_CHUNK)


def test_empty_fill_is_noop() -> None:
    out = np.empty(0, np.float32)
    assert Noise().fill(out, start=123, **ARGS) is out


@pytest.mark.parametrize(
    ("args", "match"),
    [
        ((-1, 0, 0), "run_seed"),
        ((0, -1, 0), "step"),
        ((0, 0, -1), "probe"),
        ((0, 0, 1.5), "probe"),
        ((True, 0, 0), "run_seed"),
    ],
)
def test_philox_key_rejects_bad_ints(args: tuple[object, object, object], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        philox_key(*args)  # type: ignore[arg-type]


def test_bad_kind_raises() -> None:
    with pytest.raises(ValueError, match="noise kind"):
        Noise("uniform")


@pytest.mark.parametrize("pool_size", [0, -3])
def test_bad_pool_size_raises(pool_size: int) -> None:
    with pytest.raises(ValueError, match="pool_size"):
        Noise("pool", pool_size=pool_size)


@pytest.mark.parametrize(
    ("out", "match"),
    [
        (np.empty(8, np.float64), "float32"),
        (np.empty((2, 4), np.float32), "1-D"),
        (np.empty(16, np.float32)[::2], "contiguous"),
        ([0.0] * 8, "numpy array"),
    ],
)
def test_bad_out_raises(out: object, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        Noise().fill(out, start=0, **ARGS)  # type: ignore[arg-type]


def test_negative_start_and_seed_raise() -> None:
    out = np.empty(8, np.float32)
    with pytest.raises(ValueError, match="start"):
        Noise().fill(out, start=-1, **ARGS)
    with pytest.raises(ValueError, match="run_seed"):
        Noise().fill(out, run_seed=-1, step=0, probe=0, start=0)


def test_bad_chunk_raises() -> None:
    with pytest.raises(ValueError, match="chunk"):
        list(noise_chunks(10, 0))


def _seed_sequence_key(*ints: int) -> tuple[int, int]:
    state = np.random.SeedSequence(list(ints)).generate_state(2, np.uint64)
    return int(state[0]), int(state[1])


def test_block_derived_keys_equal_numpy_seed_sequence() -> None:
    """Keys derived KEY_BLOCK steps at a time (vectorized hash) == SeedSequence, one by one:
    small and large ints (several 32-bit words), blocks next to 2**32 and 2**64, zeros."""
    rng = np.random.default_rng(5)
    bounds = [300, 1 << 32, 1 << 64, 1 << 130]
    triples = [(0, 0, 0), (1, 2, 3), (2**32 - 1, 2**32 - 1, 5), (2**32, 2**32, 2**32),
               (7, 2**64 - 1, 0), (2**100 + 3, 7, 2**70), (5, 2**64, 1), (5, 2**64 + 300, 9)]
    for _ in range(400):
        triples.append(tuple(int(rng.integers(0, 1 << 62)) % bounds[int(rng.integers(0, 4))]
                             if rng.integers(0, 2) else int(rng.integers(0, 300))
                             for _ in range(3)))
    for seed, step, probe in triples:
        # the first ask of a block derives one key, the second (another step of the same
        # block) derives the whole block, later asks look it up
        for s in (step, step ^ 1, step, step ^ 5):
            assert philox_key_ints(seed, s, probe) == _seed_sequence_key(seed, s, probe)
        assert philox_key(seed, step, probe).tolist() == list(_seed_sequence_key(seed, step,
                                                                                  probe))
    for base in (0, 2**32 - KEY_BLOCK, 2**32, 2**64 - KEY_BLOCK):  # a whole block each
        steps = range(base, base + KEY_BLOCK, 37)
        assert [philox_key_ints(11, s, 2) for s in steps] == [_seed_sequence_key(11, s, 2)
                                                               for s in steps]


def test_seed_sequence_keys_match_numpy_on_long_entropy() -> None:
    """More entropy words than SeedSequence's pool (the extra mixing rounds)."""
    rng = np.random.default_rng(6)
    ent = rng.integers(0, 1 << 32, size=(20, 7), dtype=np.uint64).astype(np.uint32)
    keys = seed_sequence_keys(ent)
    for row, key in zip(ent, keys, strict=True):
        want = np.random.SeedSequence(row).generate_state(2, np.uint64)
        assert key.tolist() == want.tolist()


def test_vectorized_philox_equals_numpy() -> None:
    """philox4x64 over many lanes == numpy's Philox(key=k) with its counter at c - 1 (it
    increments before it generates): random keys, all-ones keys, large counters."""
    rng = np.random.default_rng(8)
    keys = rng.integers(0, 2**64 - 1, size=(40, 2), dtype=np.uint64, endpoint=True)
    keys[0] = [0, 0]
    keys[1] = [2**64 - 1, 2**64 - 1]
    counters = rng.integers(1, 2**64 - 1, size=40, dtype=np.uint64)
    counters[:4] = [1, 2, 7, 2**64 - 1]
    got = philox4x64(keys, counters)
    for key, ctr, row in zip(keys, counters, got, strict=True):
        gen = np.random.Philox(key=key)
        gen.state = {**gen.state, "state": {"counter": [int(ctr) - 1, 0, 0, 0],
                                             "key": [int(k) for k in key]}}
        assert gen.random_raw(4).tolist() == row.tolist()


def test_key_blocks_of_a_steps_probes_derived_together_equal_seed_sequence() -> None:
    """The second step of a block derives the key blocks of every probe asked in the block
    in one pass (probes of one and of two entropy words: separate passes): each key is
    still SeedSequence's."""
    seed, probes = 41, [0, 1, 2, 7, 2**33, 2**33 + 1]
    for base in (0, 2**32 - KEY_BLOCK, 2**32):
        for step in range(base + 1, base + 5):  # the first ask one key, the next blocks
            for k in probes:
                assert philox_key_ints(seed, step, k) == _seed_sequence_key(seed, step, k)
        later = range(base + 5, base + KEY_BLOCK, 31)
        assert [philox_key_ints(seed, s, k) for s in later for k in probes] == \
            [_seed_sequence_key(seed, s, k) for s in later for k in probes]


def test_sign_blocks_of_a_steps_probes_drawn_together_equal_one_by_one() -> None:
    """A step of q probes asks q sign blocks; the first ask draws the blocks of the probes
    whose keys are derived in one pass: every probe's bytes are still its own stream's."""
    from edgelearn.optim.kernels import draw_signs

    seed, probes, n = 29, range(5), 650
    for step in range(3 * KEY_BLOCK - 2, 3 * KEY_BLOCK + 6):  # a block boundary inside
        for k in probes:
            got = draw_signs(seed, step, k, n)
            assert got.tobytes() == rademacher_bytes(seed, step, k, n).tobytes(), (step, k)
    rows = [block_rademacher_bytes(seed, 3 * KEY_BLOCK + 5, k, 11) for k in probes]
    assert all(r is not None for r in rows)
    bases = {id(r.base) for r in rows if r is not None}  # one pass drew them all
    assert len(bases) == 1


def test_more_probes_than_the_kept_sign_blocks_hold() -> None:
    """A step of more probes than _MAX_SIGN_BLOCK_BYTES holds blocks of: every probe still
    gets its own stream's bytes (the blocks drawn together are capped; the asked one kept)."""
    from edgelearn.optim.kernels import draw_signs

    seed, n = 43, 64 * 17  # 17 words: 34 KiB a block, ~60 blocks kept
    probes = range(150)
    for step in (2 * KEY_BLOCK, 2 * KEY_BLOCK + 1, 2 * KEY_BLOCK + 2, 2 * KEY_BLOCK + 3):
        for k in probes:
            got = draw_signs(seed, step, k, n)
            assert got.tobytes() == rademacher_bytes(seed, step, k, n).tobytes(), (step, k)


def test_signs_drawn_in_blocks_equal_one_by_one() -> None:
    """Short Rademacher vectors read from KEY_BLOCK-step blocks (from the third step of a
    block on) are the very bytes drawn one by one, across block boundaries and sizes."""
    from edgelearn.optim.kernels import draw_signs

    for n in (1, 650, 64 * BLOCK_DRAW_MAX_WORDS, 64 * BLOCK_DRAW_MAX_WORDS + 1):
        for step in [*range(KEY_BLOCK - 3, KEY_BLOCK + 40), 2**32 + 5, 2**32 + 6, 2**32 + 7]:
            got = draw_signs(13, step, 2, n)
            assert got.tobytes() == rademacher_bytes(13, step, 2, n).tobytes()
    row = block_rademacher_bytes(13, KEY_BLOCK + 7, 2, 11)
    assert row is not None
    assert not row.flags.writeable  # shared by every ask: read-only
    assert block_rademacher_bytes(13, KEY_BLOCK + 7, 2, BLOCK_DRAW_MAX_WORDS + 1) is None
    for step in range(KEY_BLOCK, KEY_BLOCK + 3):  # the blocks of run seed 1 exist ...
        draw_signs(1, step, 2, 650)
    assert block_rademacher_bytes(1, KEY_BLOCK + 7, 2, 11) is not None
    assert block_rademacher_bytes(True, KEY_BLOCK + 7, 2, 11) is None  # ... not for True
    with pytest.raises(ValueError, match="run_seed"):  # which the draw refuses
        draw_signs(True, KEY_BLOCK + 7, 2, 650)
