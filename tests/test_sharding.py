"""Tensor-parallel slicing of packed weights: a slice of the packed bytes and its quant
state must dequantize to exactly the same slice of the dequantized full weight, and
sharded matmuls must reassemble the unsharded output."""

import pytest
import torch
from bitsandbytes import functional as bnbf
from hypothesis import given, settings
from hypothesis import strategies as st

from vllm_bnb_mm import quant_state as qs


def _packed(rows, cols, quant_type, double_quant, seed=0, blocksize=64):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g) * 0.05
    packed, state = bnbf.quantize_4bit(
        w, quant_type=quant_type, compress_statistics=double_quant, blocksize=blocksize
    )
    if double_quant:  # what the loader does at parse time
        absmax = bnbf.dequantize_blockwise(state.absmax, state.state2) + state.offset
        state = qs._with(state, absmax.float(), (rows, cols))
    return packed, state


def _dequant(packed, state):
    """bitsandbytes' dequantization, blocks over the flattened weight (given a 1-D
    shape: its CPU kernel restarts blocks at each row of a 2-D one, wrongly where rows
    are not whole blocks)."""
    flat = qs._with(state, state.absmax, (state.shape.numel(),))
    return bnbf.dequantize_4bit(packed.reshape(-1, 1), flat).reshape(state.shape)


CASES = [(q, dq) for q in ("nf4", "fp4") for dq in (True, False)]


@pytest.mark.parametrize("quant_type,double_quant", CASES)
@pytest.mark.parametrize("tp", [2, 4])
def test_column_parallel_row_slices_are_exact(quant_type, double_quant, tp):
    packed, state = _packed(256, 128, quant_type, double_quant)
    full = _dequant(packed, state)
    step = 256 // tp
    pieces = []
    for rank in range(tp):
        cut = qs.slice_4bit_rows(packed, state, rank * step, (rank + 1) * step)
        assert cut is not None
        pieces.append(_dequant(*cut))
    torch.testing.assert_close(torch.cat(pieces, 0), full, rtol=0, atol=0)


@pytest.mark.parametrize("quant_type,double_quant", CASES)
@pytest.mark.parametrize("tp", [2, 4])
def test_row_parallel_column_slices_are_exact(quant_type, double_quant, tp):
    packed, state = _packed(64, 512, quant_type, double_quant)
    full = _dequant(packed, state)
    step = 512 // tp
    for rank in range(tp):
        cut = qs.slice_4bit_cols(packed, state, rank * step, (rank + 1) * step)
        assert cut is not None
        torch.testing.assert_close(
            _dequant(*cut), full[:, rank * step : (rank + 1) * step], rtol=0, atol=0
        )


@pytest.mark.parametrize("quant_type,double_quant", CASES)
def test_sharded_matmuls_reassemble_the_unsharded_output(quant_type, double_quant):
    packed, state = _packed(128, 256, quant_type, double_quant)
    x = torch.randn(3, 256)
    full = x @ _dequant(packed, state).t()
    # column parallel: outputs concatenate
    top = qs.slice_4bit_rows(packed, state, 0, 64)
    bottom = qs.slice_4bit_rows(packed, state, 64, 128)
    col = torch.cat([x @ _dequant(*top).t(), x @ _dequant(*bottom).t()], dim=-1)
    torch.testing.assert_close(col, full, rtol=1e-5, atol=1e-5)
    # row parallel: partial sums reduce
    left = qs.slice_4bit_cols(packed, state, 0, 128)
    right = qs.slice_4bit_cols(packed, state, 128, 256)
    row = x[:, :128] @ _dequant(*left).t() + x[:, 128:] @ _dequant(*right).t()
    torch.testing.assert_close(row, full, rtol=1e-5, atol=1e-5)


# (rows, cols, blocksize, cut) -> the blocksize the rank's slice is re-expressed with, or
# None where no bitsandbytes blocksize (>= 32) can: then the caller dequantizes.
CUTS = [
    # row-parallel: column cuts
    ((128, 64), 64, ("cols", 32, 64), 32),  # o_proj of 2 heads x 32 at TP=2
    ((96, 192), 64, ("cols", 96, 192), 32),  # down_proj of 192 at TP=2
    ((64, 96), 64, ("cols", 32, 96), 32),  # blocks straddle rows in the full weight
    ((64, 512), 256, ("cols", 128, 384), 128),
    ((96, 160), 64, ("cols", 80, 160), None),  # 2 heads x 80 at TP=2: multiples of 16 only
    ((64, 96), 64, ("cols", 0, 48), None),
    # column-parallel: row cuts
    ((160, 90), 64, ("rows", 80, 160), 32),  # q of 2 heads x 80 over hidden 90 at TP=2
    ((96, 90), 64, ("rows", 0, 48), 32),
    ((80, 90), 64, ("rows", 40, 80), None),  # 3600 = 16 x 225
    ((96, 96), 64, ("rows", 1, 2), 32),
    ((256, 128), 64, ("rows", 64, 192), 64),  # aligned: the original blocks
]


@pytest.mark.parametrize("quant_type,double_quant", CASES)
@pytest.mark.parametrize("shape,blocksize,cut,expected_blocksize", CUTS)
def test_cuts_inside_blocks_are_exact_with_a_smaller_blocksize(
    quant_type, double_quant, shape, blocksize, cut, expected_blocksize
):
    packed, state = _packed(*shape, quant_type, double_quant, blocksize=blocksize)
    full = _dequant(packed, state)
    axis, start, end = cut
    sliced = (qs.slice_4bit_rows if axis == "rows" else qs.slice_4bit_cols)(
        packed, state, start, end
    )
    if expected_blocksize is None:
        assert sliced is None
        return
    data, sub = sliced
    assert sub.blocksize == expected_blocksize
    expected = full[start:end] if axis == "rows" else full[:, start:end]
    assert torch.equal(_dequant(data, sub), expected)  # bit for bit


@settings(max_examples=200, deadline=None)
@given(
    rows=st.integers(1, 24).map(lambda r: 2 * r),
    cols=st.integers(1, 24).map(lambda c: 8 * c),
    blocksize=st.sampled_from([32, 64, 128, 256]),
    axis=st.sampled_from(["rows", "cols"]),
    data=st.data(),
)
def test_any_cut_is_exact_or_refused(rows, cols, blocksize, axis, data):
    """Whatever the geometry, a cut either dequantizes to exactly the slice of the
    dequantized full weight or is refused (never an approximation)."""
    packed, state = _packed(rows, cols, "nf4", False, blocksize=blocksize)
    full = _dequant(packed, state)
    size = rows if axis == "rows" else cols
    start = data.draw(st.integers(0, size - 1))
    end = data.draw(st.integers(start + 1, size))
    fn = qs.slice_4bit_rows if axis == "rows" else qs.slice_4bit_cols
    sliced = fn(packed, state, start, end)
    if sliced is None:
        return
    expected = full[start:end] if axis == "rows" else full[:, start:end]
    assert torch.equal(_dequant(*sliced), expected)


def test_shards_of_different_blocksizes_merge_exactly():
    """A re-blocked shard (32) stacked with aligned ones (64): one quant state at 32."""
    q, q_state = _packed(128, 64, "nf4", True)
    k, k_state = _packed(64, 64, "nf4", True, seed=1)
    q_half, q_half_state = qs.slice_4bit_rows(q, q_state, 0, 64)
    k_cols, k_cols_state = qs.slice_4bit_cols(k, k_state, 32, 64)
    v, v_state = _packed(64, 32, "nf4", True, seed=2)
    states = [k_cols_state, v_state]
    assert qs.can_merge_4bit(states)
    merged = qs.merge_4bit(states, torch.float32)
    assert merged.blocksize == 32
    data = torch.cat([k_cols.reshape(-1), v.reshape(-1)])
    expected = torch.cat([_dequant(k, k_state)[:, 32:], _dequant(v, v_state)])
    assert torch.equal(_dequant(data, merged), expected)
    assert q_half_state.blocksize == 64 and not qs.can_merge_4bit([q_half_state, v_state])


def test_merged_shards_equal_their_parts():
    parts = [_packed(64, 128, "nf4", True, seed=i) for i in range(3)]
    merged = qs.merge_4bit([s for _, s in parts], torch.bfloat16)
    data = torch.cat([p.reshape(-1) for p, _ in parts])
    expected = torch.cat([_dequant(p, s) for p, s in parts], 0)
    torch.testing.assert_close(_dequant(data, merged).float(), expected.to(torch.bfloat16).float())
    assert qs.can_merge_4bit([s for _, s in parts])
    fp4 = _packed(64, 128, "fp4", False)[1]
    assert not qs.can_merge_4bit([parts[0][1], fp4])


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
# (32, 96): blocksize 32 and 48 column pairs, 16 of them past the C routine's vectors of 32.
@pytest.mark.parametrize(
    "shape", [(64, 128, 64), (96, 256, 64), (256, 1024, 64), (32, 96, 32), (64, 160, 32)]
)
@pytest.mark.parametrize("routine", ["c", "c-in-place", "tensor-ops"])
def test_cpu_kernel_repack_is_byte_identical_to_bitsandbytes(
    monkeypatch, quant_type, shape, routine
):
    import copy

    from vllm_bnb_mm import cpu

    if routine.startswith("c") and cpu.kernels() is None:
        pytest.skip("cpu_kernels.c is not built on this CPU")
    if routine == "tensor-ops":
        monkeypatch.setattr(cpu, "kernels", lambda: None)
    rows, cols, blocksize = shape
    packed, state = _packed(rows, cols, quant_type, double_quant=True, blocksize=blocksize)
    expected, expected_state = bnbf._convert_weight_packed_for_cpu(
        packed.clone(), copy.deepcopy(state)
    )
    in_place = routine == "c-in-place"
    got, got_state = qs.repack_for_cpu_kernel(packed, state, in_place=in_place)
    assert torch.equal(got, expected)
    # In place: the result is the given bytes, permuted (no second buffer).
    assert (got.data_ptr() == packed.data_ptr()) == in_place
    assert torch.equal(got_state.absmax, expected_state.absmax)
    assert got_state.packing_format_for_cpu and got_state.dtype == expected_state.dtype


# ------------------------------------------------------------ in-flight quantization


def _forget_bitsandbytes_tables():
    """bitsandbytes caches its 4-bit tables per process, built in whatever default dtype
    the first call ran under; start from scratch so this test sees the first call."""
    from bitsandbytes.backends import utils
    from bitsandbytes.backends.default import ops

    ops._get_4bit_quantize_bounds.cache_clear()
    utils._code_4bit_cache.clear()


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_in_flight_quantization_under_a_bf16_default_gives_bitsandbytes_float32_bytes(
    quant_type,
):
    weight = (torch.randn(128, 256, generator=torch.Generator().manual_seed(3)) * 0.05).bfloat16()
    _forget_bitsandbytes_tables()
    expected, expected_state = bnbf.quantize_4bit(weight, quant_type=quant_type)
    _forget_bitsandbytes_tables()
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)  # what vLLM sets while a bf16 model loads
    try:
        packed, state = qs.quantize_4bit(weight, quant_type, 64, torch.bfloat16)
        cb, int8_state = qs.quantize_8bit(weight)
    finally:
        torch.set_default_dtype(previous)
        _forget_bitsandbytes_tables()
    assert torch.equal(packed, expected.reshape(-1))
    assert torch.equal(state.absmax, expected_state.absmax)
    expected_cb, expected_scb, _ = bnbf.int8_vectorwise_quant(weight.half())
    assert torch.equal(cb, expected_cb) and torch.equal(int8_state.scb, expected_scb)
