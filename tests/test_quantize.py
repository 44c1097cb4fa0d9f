"""Blockwise int8 quantization of deltas (shared.quantize): exactness, error bound, unbiasedness, sizes."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

from shared.errors import ScreeningError
from shared.quantize import (
    DEFAULT_BLOCK,
    block_layout,
    decode_delta,
    decode_delta_wire,
    dequantize_int8,
    encode_delta,
    payload_size,
    quantize_int8,
    to_flat,
    to_wire,
)
from shared.tensors import ModelSpec, TensorSpec

NO_EXACT = torch.zeros(0, dtype=torch.int64)


def spec_of(
    float_sizes: list[int] | tuple[int, ...], exact_sizes: list[int] | tuple[int, ...] = ()
) -> ModelSpec:
    tensors = [TensorSpec(f"f{i}", (n,), "float32") for i, n in enumerate(float_sizes)]
    tensors += [TensorSpec(f"e{i}", (n,), "int64") for i, n in enumerate(exact_sizes)]
    return ModelSpec(tuple(tensors))


def reference_scales(
    x: np.ndarray, sizes: list[int] | tuple[int, ...], block: int
) -> tuple[np.ndarray, np.ndarray]:
    """Per-block scales (max|x|/127) and the scale of every element, computed independently of the library."""
    scales, per_element, start = [], [], 0
    for size in sizes:
        for b in range(start, start + size, block):
            chunk = x[b : min(b + block, start + size)]
            s = float(np.abs(chunk.astype(np.float64)).max()) / 127.0
            scales.append(s)
            per_element.extend([s] * len(chunk))
        start += size
    return np.array(scales), np.array(per_element)


def random_floats(n: int, seed: int, magnitude: float) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, generator=g) * magnitude
    # a few exact zeros and a few outliers, so blocks have very different scales
    if n:
        x[torch.randint(0, n, (max(1, n // 10),), generator=g)] = 0.0
        x[torch.randint(0, n, (max(1, n // 50),), generator=g)] *= 100.0
    return x


sizes_st = st.lists(st.integers(1, 700), min_size=1, max_size=5)
blocks_st = st.integers(1, 300)


# ---------------------------------------------------------------- scheme "none"


@settings(max_examples=80, deadline=None)
@given(
    values=st.lists(st.lists(st.floats(width=32), min_size=0, max_size=40), min_size=1, max_size=4),
    exact=st.lists(st.integers(-(2**63), 2**63 - 1), max_size=20),
)
def test_none_round_trip_is_bit_exact(values: list[list[float]], exact: list[int]) -> None:
    spec = spec_of([len(v) for v in values], [len(exact)])
    floats = torch.tensor([v for vs in values for v in vs], dtype=torch.float32)
    ex = torch.tensor(exact, dtype=torch.int64)
    payload = encode_delta(floats, ex, spec, "none")
    assert len(payload) == payload_size(spec, "none", DEFAULT_BLOCK) == 4 * spec.n_float + 8 * spec.n_exact
    f, e = decode_delta(payload, spec, "none", DEFAULT_BLOCK)
    assert f.dtype == torch.float32 and e.dtype == torch.int64
    assert torch.equal(f.view(torch.int32), floats.view(torch.int32))  # bit-exact, NaN and -0.0 included
    assert torch.equal(e, ex)


def test_none_layout_is_little_endian_floats_then_int64() -> None:
    spec = spec_of([2], [1])
    payload = encode_delta(torch.tensor([1.0, -2.0]), torch.tensor([7]), spec, "none")
    assert payload == np.array([1.0, -2.0], "<f4").tobytes() + np.array([7], "<i8").tobytes()


# ---------------------------------------------------------------- scheme "int8"


@settings(max_examples=120, deadline=None)
@given(
    sizes=sizes_st,
    block=blocks_st,
    seed=st.integers(0, 2**31),
    exponent=st.integers(-30, 30),
)
@example(sizes=[1], block=1, seed=0, exponent=0)
@example(sizes=[1, 1, 1], block=256, seed=1, exponent=0)
@example(sizes=[257], block=256, seed=2, exponent=-3)
@example(sizes=[5, 300], block=7, seed=3, exponent=5)
def test_int8_error_is_at_most_the_block_scale(
    sizes: list[int], block: int, seed: int, exponent: int
) -> None:
    spec = spec_of(sizes)
    x = random_floats(spec.n_float, seed, 10.0**exponent)
    payload = encode_delta(x, NO_EXACT, spec, "int8", block, torch.Generator().manual_seed(seed))
    assert len(payload) == payload_size(spec, "int8", block)

    ref_scales, scale = reference_scales(x.numpy(), sizes, block)
    n_blocks = len(ref_scales)
    assert n_blocks == sum(math.ceil(n / block) for n in sizes)
    wire_scales = np.frombuffer(payload[: 4 * n_blocks], dtype="<f4").astype(np.float64)
    # on the wire, blocks come full ones first, then tails (see shared/quantize.py)
    wire_order = block_layout(tuple(sizes), block).wire_blocks.numpy()
    np.testing.assert_allclose(wire_scales, ref_scales[wire_order], rtol=1e-6, atol=0)
    q = np.frombuffer(payload[4 * n_blocks : 4 * n_blocks + spec.n_float], dtype=np.int8)
    assert np.abs(q.astype(np.int32)).max() <= 127

    f, e = decode_delta(payload, spec, "int8", block)
    assert e.numel() == 0
    err = np.abs(f.numpy().astype(np.float64) - x.numpy().astype(np.float64))
    # |x - scale*q| < scale, up to float32 rounding of x/scale and scale*q
    assert np.all(err <= scale * (1 + 1e-4)), float((err / np.maximum(scale, 1e-300)).max())
    # elements of an all-zero block (scale 0) come back as exact zeros
    assert np.all(f.numpy()[scale == 0] == 0)


def test_int8_zero_block_and_block_max_travel_exactly() -> None:
    spec = spec_of([4, 3])
    x = torch.tensor([0.0, 0.0, 0.0, 0.0, 1.0, -0.5, 127.0])
    f, _ = decode_delta(encode_delta(x, NO_EXACT, spec, "int8", 4), spec, "int8", 4)
    assert f[:4].tolist() == [0.0, 0.0, 0.0, 0.0]
    assert f[6].item() == 127.0  # max|x| is exactly 127 * scale, so q = 127 with no rounding
    assert f[4].item() == 1.0  # 1.0 / (127/127) is an integer: no randomness either


def test_int8_blocks_never_span_two_tensors() -> None:
    # one huge value in tensor 0 must not coarsen tensor 1, even though both fit in one block
    spec = spec_of([2, 2])
    x = torch.tensor([1e6, 0.0, 1e-3, -2e-3])
    payload = encode_delta(x, NO_EXACT, spec, "int8", 256)
    scales = np.frombuffer(payload[:8], dtype="<f4")
    np.testing.assert_allclose(scales, [1e6 / 127, 2e-3 / 127], rtol=1e-6)
    f, _ = decode_delta(payload, spec, "int8", 256)
    assert abs(f[3].item() + 2e-3) < 1e-9


def test_int8_same_generator_seed_same_bytes_different_seed_different_bytes() -> None:
    spec = spec_of([1000])
    x = random_floats(1000, 0, 1.0)

    def enc(seed: int) -> bytes:
        return encode_delta(x, NO_EXACT, spec, "int8", 64, torch.Generator().manual_seed(seed))

    assert enc(1) == enc(1)
    assert enc(1) != enc(2)


def test_int8_stochastic_rounding_is_unbiased() -> None:
    """Average 2000 independent quantizations of the same delta; the mean must converge to x.

    One draw of element i is ``s*q`` with ``q`` in {floor(y), floor(y)+1} (y = x/s), Bernoulli with
    p = frac(y), so its variance is s^2 p(1-p) <= s^2/4 and the mean of N draws has standard
    deviation <= s / (2 sqrt N). We allow 6 of those (P(|Z| > 6) ~ 2e-9 per element, ~1e-6 for
    all 500 elements together), which is 0.067 s at N = 2000 -- far below the up-to-0.5 s bias of
    round-to-nearest, which the test checks it would catch.
    The N draws are vectorized: the model is tiled N times and quantized in one call, each copy
    getting its own uniform noise; encode/decode is checked to be exactly that computation.
    """
    sizes, block, draws = (5, 300, 195), 64, 2000
    spec = spec_of(sizes)
    x = random_floats(spec.n_float, 7, 0.1)
    _, scale = reference_scales(x.numpy(), sizes, block)

    tiled_layout = block_layout(sizes * draws, block)
    scales, q = quantize_int8(x.repeat(draws), tiled_layout, torch.Generator().manual_seed(2024))
    samples = dequantize_int8(scales, q, tiled_layout).reshape(draws, -1).to(torch.float64)
    mean = samples.mean(0).numpy()

    tolerance = 6 * scale / (2 * math.sqrt(draws)) + 1e-6 * scale
    bias = np.abs(mean - x.numpy().astype(np.float64))
    assert np.all(bias <= tolerance), float((bias / np.maximum(scale, 1e-300)).max())
    # the draws really are random where x is not on the grid ...
    y = x.numpy().astype(np.float64) / np.where(scale > 0, scale, 1)
    frac = y - np.floor(y)
    spread = samples.std(0).numpy()
    off_grid = (frac > 0.05) & (frac < 0.95)
    assert off_grid.sum() > 300
    assert np.all(spread[off_grid] > 0)
    # ... and round-to-nearest would have failed the same bound
    nearest = np.round(y) * scale
    assert np.any(np.abs(nearest - x.numpy()) > tolerance)

    # encode_delta/decode_delta with a seeded generator is the same computation, copy by copy
    single = block_layout(sizes, block)
    for seed in (0, 1, 2):
        s1, q1 = quantize_int8(x, single, torch.Generator().manual_seed(seed))
        payload = encode_delta(x, NO_EXACT, spec, "int8", block, torch.Generator().manual_seed(seed))
        f, _ = decode_delta(payload, spec, "int8", block)
        assert torch.equal(f, dequantize_int8(s1, q1, single))


# ---------------------------------------------------------------- sizes and exact tensors


@settings(max_examples=100, deadline=None)
@given(
    float_sizes=st.lists(st.integers(0, 600), max_size=5),
    exact_sizes=st.lists(st.integers(0, 20), max_size=3),
    scheme=st.sampled_from(["int8", "none"]),
    block=blocks_st,
    seed=st.integers(0, 2**31),
)
@example(float_sizes=[], exact_sizes=[3], scheme="int8", block=256, seed=0)
@example(float_sizes=[0, 1], exact_sizes=[], scheme="int8", block=1, seed=0)
def test_payload_size_and_exact_part(
    float_sizes: list[int], exact_sizes: list[int], scheme: str, block: int, seed: int
) -> None:
    spec = spec_of(float_sizes, exact_sizes)
    x = random_floats(spec.n_float, seed, 1.0)
    g = torch.Generator().manual_seed(seed)
    ex = torch.randint(-(2**62), 2**62, (spec.n_exact,), generator=g, dtype=torch.int64)
    if spec.n_exact:
        ex[0] = -(2**63)
        ex[-1] = 2**63 - 1
    payload = encode_delta(x, ex, spec, scheme, block, g)
    n_blocks = sum(math.ceil(n / block) for n in float_sizes)
    expected = 4 * n_blocks + spec.n_float if scheme == "int8" else 4 * spec.n_float
    expected += 8 * spec.n_exact
    assert len(payload) == payload_size(spec, scheme, block) == expected
    f, e = decode_delta(payload, spec, scheme, block)
    assert f.shape == (spec.n_float,)
    assert torch.equal(e, ex)  # exact tensors travel exactly under both schemes
    assert payload[len(payload) - 8 * spec.n_exact :] == ex.numpy().astype("<i8").tobytes()


@pytest.mark.parametrize("scheme", ["int8", "none"])
@pytest.mark.parametrize("change", ["one more", "one less", "empty", "double"])
def test_wrong_payload_length_is_bad_shape(scheme: str, change: str) -> None:
    spec = spec_of([10, 3], [2])
    payload = encode_delta(torch.ones(13), torch.tensor([1, 2]), spec, scheme, 4)
    bad = {
        "one more": payload + b"\x00",
        "one less": payload[:-1],
        "empty": b"",
        "double": payload + payload,
    }[change]
    with pytest.raises(ScreeningError) as info:
        decode_delta(bad, spec, scheme, 4)
    assert info.value.reason == "bad_shape"


def test_block_mismatch_unknown_scheme_and_bad_block_are_bad_shape() -> None:
    spec = spec_of([10])
    payload = encode_delta(torch.ones(10), NO_EXACT, spec, "int8", 4)  # 3 blocks
    for scheme, block in [("int8", 8), ("int8", 0), ("int8", -1), ("int8", (1 << 20) + 1), ("fp16", 4)]:
        with pytest.raises(ScreeningError) as info:
            decode_delta(payload, spec, scheme, block)
        assert info.value.reason == "bad_shape", (scheme, block)
    # the block size only matters for int8
    none = encode_delta(torch.ones(10), NO_EXACT, spec, "none", 4)
    assert torch.equal(decode_delta(none, spec, "none", 12345)[0], torch.ones(10))


def test_unknown_scheme_on_encode_and_size() -> None:
    spec = spec_of([3])
    with pytest.raises(ValueError):
        encode_delta(torch.ones(3), NO_EXACT, spec, "fp8")
    with pytest.raises(ValueError):
        payload_size(spec, "fp8", 4)
    with pytest.raises(ValueError):
        block_layout((3,), 0)


def test_block_layout_counts() -> None:
    layout = block_layout((5, 1, 8), 4)
    assert layout.counts.tolist() == [4, 1, 1, 4, 4]
    assert layout.block_of.tolist() == [0, 0, 0, 0, 1, 2, 3, 3, 3, 3, 4, 4, 4, 4]
    assert layout.n == 14 and layout.n_blocks == 5


def test_block_order_puts_full_blocks_first_and_round_trips() -> None:
    layout = block_layout((5, 1, 8), 4)
    assert layout.n_full == 3 and layout.tail_counts.tolist() == [1, 1]
    assert layout.perm is not None
    assert layout.perm.tolist() == [0, 1, 2, 3, 6, 7, 8, 9, 10, 11, 12, 13, 4, 5]
    assert layout.wire_blocks.tolist() == [0, 3, 4, 1, 2]
    x = torch.arange(14, dtype=torch.float32)
    assert torch.equal(to_flat(to_wire(x, layout), layout), x)
    assert block_layout((8, 4), 4).perm is None  # nothing to move: block order is flat order


def test_wire_ratio_of_a_million_floats_at_block_256() -> None:
    n = 1_000_000
    spec = spec_of([n])
    fp32 = 4 * n
    assert payload_size(spec, "none", 256) == fp32
    size = payload_size(spec, "int8", 256)
    assert size == 4 * math.ceil(n / 256) + n
    assert size / fp32 < 0.26
    payload = encode_delta(torch.randn(n), NO_EXACT, spec, "int8", 256, torch.Generator().manual_seed(0))
    assert len(payload) == size


def test_decode_into_a_reused_buffer_across_slabs_matches_an_independent_dequantize() -> None:
    """Large models dequantize slab by slab into the caller's buffer: every slab, the tails
    and a buffer full of an earlier update's values must give exactly scale * q."""
    sizes = (2_500_000, 777, 1_000_003)  # several slabs, tails in two tensors
    spec = spec_of(sizes, [3])
    layout = block_layout(sizes, DEFAULT_BLOCK)
    out = torch.full((spec.n_float,), float("nan"))
    for seed in (1, 2):
        x = random_floats(spec.n_float, seed, 0.01)
        payload = encode_delta(x, torch.tensor([4, 5, 6]), spec, "int8", DEFAULT_BLOCK)
        floats, exact, got_layout = decode_delta_wire(payload, spec, "int8", DEFAULT_BLOCK, out)
        assert floats is out and got_layout is layout
        nb = layout.n_blocks
        scales = np.frombuffer(payload[: 4 * nb], dtype="<f4")
        q = np.frombuffer(payload[4 * nb : 4 * nb + spec.n_float], dtype=np.int8)
        per_value = np.concatenate(
            [
                np.repeat(scales[: layout.n_full], DEFAULT_BLOCK),
                np.repeat(scales[layout.n_full :], layout.tail_counts),
            ]
        )
        assert np.array_equal(out.numpy(), q.astype(np.float32) * per_value)
        assert exact.tolist() == [4, 5, 6]
        fresh, _, _ = decode_delta_wire(payload, spec, "int8", DEFAULT_BLOCK)
        assert torch.equal(fresh, out)


def test_decode_rejects_an_output_buffer_of_the_wrong_shape() -> None:
    spec = spec_of([300])
    payload = encode_delta(torch.ones(300), NO_EXACT, spec, "int8", DEFAULT_BLOCK)
    with pytest.raises(ValueError, match="300 values"):
        decode_delta_wire(payload, spec, "int8", DEFAULT_BLOCK, torch.empty(299))
    none = encode_delta(torch.ones(300), NO_EXACT, spec, "none", DEFAULT_BLOCK)
    out = torch.empty(300)
    assert decode_delta_wire(none, spec, "none", DEFAULT_BLOCK, out)[0] is out
    assert torch.equal(out, torch.ones(300))
