"""The counter-based noise: Philox known answers, agreement with Triton's own generator, statistics and
invariance to batch composition."""
import pytest
import torch
import triton
import triton.language as tl
from kernel_helpers import DEVICE, tolerance

from kernels.noise import philox4x32, randn


@pytest.mark.parametrize("counter, key, expected", [
    # Known-answer vectors of Philox4x32-10 from Random123 (kat_vectors), independent of this code.
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
])
def test_philox_known_answers(counter, key, expected):
    words = philox4x32([torch.tensor([c], dtype=torch.int64) for c in counter], key)
    assert tuple(int(w) for w in words) == expected


@triton.jit
def _triton_randn4x_kernel(out_ptr, seed, GROUPS: tl.constexpr):
    group = tl.arange(0, GROUPS)
    n0, n1, n2, n3 = tl.randn4x(seed, group)
    tl.store(out_ptr + group * 4, n0)
    tl.store(out_ptr + group * 4 + 1, n1)
    tl.store(out_ptr + group * 4 + 2, n2)
    tl.store(out_ptr + group * 4 + 3, n3)


@pytest.mark.parametrize("seed", [0, 12345, 2**40 + 17])
def test_reference_matches_triton_randn4x(seed):
    """Sample id 0 and stream 0 give counter (j // 4, 0, 0, 0): exactly tl.randn4x(seed, j // 4)."""
    groups = 1024
    out = torch.full((groups * 4,), float("nan"), device=DEVICE)
    _triton_randn4x_kernel[(1,)](out, seed, GROUPS=groups)
    expected = randn(seed, 0, torch.tensor([0], device=DEVICE), (groups * 4,))[0]
    torch.testing.assert_close(out, expected, **tolerance(torch.float32))


def test_statistics_and_no_correlation_across_samples():
    noise = randn(7, 3, torch.arange(64), (4096,)).double()
    assert abs(noise.mean().item()) < 4 / (noise.numel() ** 0.5)
    assert abs(noise.var().item() - 1) < 0.01
    for lane in range(4):  # each of the four Philox outputs on its own is N(0, 1)
        lane_values = noise[:, lane::4]
        assert abs(lane_values.mean().item()) < 0.02 and abs(lane_values.var().item() - 1) < 0.03
    corr = torch.corrcoef(noise)  # 64 x 64 correlation between samples
    off_diagonal = corr[~torch.eye(64, dtype=torch.bool)]
    assert off_diagonal.abs().max().item() < 5 / (4096 ** 0.5)
    neighbours = torch.corrcoef(torch.stack((noise[:, :-1].flatten(), noise[:, 1:].flatten())))[0, 1]
    assert abs(neighbours.item()) < 0.01  # adjacent elements (inside a Philox group or across) independent
    tail = (noise.abs() > 3).double().mean().item()
    assert 0.0015 < tail < 0.0040  # P(|z| > 3) = 0.0027: the Box-Muller tails are there


def test_row_depends_only_on_sample_id_seed_stream():
    ids = torch.tensor([11, 2**33 + 5, 0, 7])
    batch = randn(99, 4, ids, (3, 5, 7))
    for row, sample_id in enumerate(ids):
        alone = randn(99, 4, sample_id.reshape(1), (3, 5, 7))[0]
        assert torch.equal(batch[row], alone)
    reordered = randn(99, 4, ids.flip(0), (3, 5, 7))
    assert torch.equal(reordered, batch.flip(0))
    assert not torch.equal(randn(99, 5, ids, (3, 5, 7)), batch)  # another stream
    assert not torch.equal(randn(98, 4, ids, (3, 5, 7)), batch)  # another seed
    assert not torch.equal(randn(99 + 2**32, 4, ids, (3, 5, 7)), batch)  # the seed's high word counts


def test_shape_is_a_view_of_the_flat_sample():
    """Element j is the C-order index: the noise of a (3, 5, 7) sample is the flat 105-vector reshaped."""
    ids = torch.tensor([4, 9])
    assert torch.equal(randn(1, 2, ids, (3, 5, 7)).reshape(2, -1), randn(1, 2, ids, (105,)))


@pytest.mark.parametrize("bad", [-1, 2**64, 1.5])
def test_bad_seed_is_refused(bad):
    with pytest.raises(ValueError, match="seed"):
        randn(bad, 0, torch.tensor([0]), (4,))


# The Philox of the previous release (16-bit split products, out-of-place ops): the vectorised version in
# kernels/noise.py must give exactly its bits, noise included (the determinism contract across versions).
def _umul32_oracle(a, b):
    b_hi, b_lo = b >> 16, b & 0xFFFF
    p_hi, p_lo = a * b_hi, a * b_lo
    return ((p_hi + (p_lo >> 16)) >> 16) & 0xFFFFFFFF, (((p_hi & 0xFFFF) << 16) + p_lo) & 0xFFFFFFFF


def _philox_oracle(counter, key):
    from kernels import noise

    c0, c1, c2, c3 = counter
    k0, k1 = key
    for _ in range(10):
        hi_b, lo_b = _umul32_oracle(noise.PHILOX_ROUND_B, c2)
        hi_a, lo_a = _umul32_oracle(noise.PHILOX_ROUND_A, c0)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0, k1 = (k0 + noise.PHILOX_KEY_A) & 0xFFFFFFFF, (k1 + noise.PHILOX_KEY_B) & 0xFFFFFFFF
    return c0, c1, c2, c3


def _randn_oracle(seed, stream, sample_ids, numel):
    from kernels import noise

    groups = (numel + 3) // 4
    c0, c1 = torch.broadcast_tensors(torch.arange(groups).unsqueeze(0), sample_ids.unsqueeze(1))
    words = _philox_oracle((c0, c1, torch.full_like(c0, stream), torch.zeros_like(c0)), noise.seed_key(seed))
    uniforms = []
    for w in words:
        signed = torch.where(w >= 2**31, w - 2**32, w)
        folded = torch.where(signed < 0, ~signed, signed)
        uniforms.append(folded.to(torch.float32) * torch.tensor(noise.UNIFORM_SCALE, dtype=torch.float32))
    n0, n1 = noise.pair_uniform_to_normal(uniforms[0], uniforms[1])
    n2, n3 = noise.pair_uniform_to_normal(uniforms[2], uniforms[3])
    return torch.stack((n0, n1, n2, n3), dim=-1).reshape(len(sample_ids), groups * 4)[:, :numel]


def test_vectorised_philox_is_bit_identical_to_the_previous_one():
    g = torch.Generator().manual_seed(0)
    counter = [torch.randint(0, 2**32, (4096,), generator=g) for _ in range(4)]
    for c in counter:  # the words where sign and carry handling could go wrong
        c[:5] = torch.tensor([0, 1, 2**31 - 1, 2**31, 2**32 - 1])
    for key in [(0, 0), (0xFFFFFFFF, 0xFFFFFFFF), (0x9E3779B9, 12345)]:
        for fast, slow in zip(philox4x32(counter, key), _philox_oracle(counter, key)):
            assert torch.equal(fast, slow)


@pytest.fixture(params=["C", "numpy"])
def philox_in(request, monkeypatch, tmp_path):
    """`randn` with its Philox in C (built here into a fresh cache) or in numpy (what a machine without a C
    compiler runs)."""
    from kernels import native

    monkeypatch.setenv(native.ENV_DIR, str(tmp_path / "native"))
    if request.param == "numpy":
        monkeypatch.setenv(native.ENV_SWITCH, "0")
    native.philox_uniforms.cache_clear()
    yield request.param
    native.philox_uniforms.cache_clear()


@pytest.mark.parametrize("seed, stream, shape", [(0, 5, (1, 8, 8)), (2**64 - 1, 2**32 - 1, (3, 7, 5)),
                                                 (12345, 3, (3, 65, 70))])  # 5 x 3413 groups: > 1 chunk
def test_randn_is_bit_identical_to_the_previous_release(seed, stream, shape, philox_in):
    from kernels import native

    assert (native.philox_uniforms() is not None) == (philox_in == "C")  # the fast path is really the one run
    ids = torch.tensor([0, 1, 2**31, 2**32 - 1, 77])
    expected = _randn_oracle(seed, stream, ids, int(torch.tensor(shape).prod()))
    assert torch.equal(randn(seed, stream, ids, shape).reshape(len(ids), -1), expected)


def test_without_a_c_compiler_randn_falls_back_to_the_same_bits(monkeypatch, tmp_path):
    from kernels import native

    ids, shape = torch.tensor([3, 2**32 - 1]), (5, 9, 11)
    expected = _randn_oracle(42, 1, ids, 5 * 9 * 11)
    monkeypatch.setenv(native.ENV_DIR, str(tmp_path / "native"))
    monkeypatch.setenv("CC", "false")  # a compiler that always fails
    native.philox_uniforms.cache_clear()
    try:
        assert native.philox_uniforms() is None
        assert torch.equal(randn(42, 1, ids, shape).reshape(2, -1), expected)
    finally:
        native.philox_uniforms.cache_clear()
    assert not list((tmp_path / "native").glob("*"))  # the failed build left no file behind


def test_the_c_library_is_built_once_and_reused(monkeypatch, tmp_path):
    from kernels import native

    monkeypatch.setenv(native.ENV_DIR, str(tmp_path))
    native.philox_uniforms.cache_clear()
    try:
        assert native.philox_uniforms() is not None
        built = native.library_path()
        assert [p.name for p in tmp_path.iterdir()] == [built.name]  # no temporary left beside it
        stamp = built.stat().st_mtime_ns
        native.philox_uniforms.cache_clear()
        monkeypatch.setenv("CC", "false")  # a rebuild would now fail: the cached library must be loaded
        assert native.philox_uniforms() is not None and built.stat().st_mtime_ns == stamp
    finally:
        native.philox_uniforms.cache_clear()
