"""Tensor-parallel slicing of packed weights: a slice of the packed bytes and its quant
state must dequantize to exactly the same slice of the dequantized full weight, and
sharded matmuls must reassemble the unsharded output."""

import pytest
import torch
from bitsandbytes import functional as bnbf

from vllm_bnb_mm import quant_state as qs


def _packed(rows, cols, quant_type, double_quant, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g) * 0.05
    packed, state = bnbf.quantize_4bit(
        w, quant_type=quant_type, compress_statistics=double_quant
    )
    if double_quant:  # what the loader does at parse time
        absmax = bnbf.dequantize_blockwise(state.absmax, state.state2) + state.offset
        state = qs._with(state, absmax.float(), (rows, cols))
    return packed, state


def _dequant(packed, state):
    return bnbf.dequantize_4bit(packed.reshape(-1, 1), state)


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


def test_unaligned_cuts_are_refused_not_corrupted():
    packed, state = _packed(96, 96, "nf4", False)  # 96 columns: not a multiple of 64
    assert qs.slice_4bit_cols(packed, state, 0, 48) is None
    assert qs.slice_4bit_rows(packed, state, 0, 1) is None  # 96 elements: 1.5 blocks


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
@pytest.mark.parametrize("shape", [(64, 128), (96, 256), (256, 1024)])
@pytest.mark.parametrize("routine", ["c", "tensor-ops"])
def test_cpu_kernel_repack_is_byte_identical_to_bitsandbytes(
    monkeypatch, quant_type, shape, routine
):
    import copy

    from vllm_bnb_mm import cpu

    if routine == "c" and cpu.kernels() is None:
        pytest.skip("cpu_kernels.c is not built on this CPU")
    if routine == "tensor-ops":
        monkeypatch.setattr(cpu, "kernels", lambda: None)
    packed, state = _packed(*shape, quant_type, double_quant=True)
    expected, expected_state = bnbf._convert_weight_packed_for_cpu(
        packed.clone(), copy.deepcopy(state)
    )
    got, got_state = qs.repack_for_cpu_kernel(packed, state)
    assert torch.equal(got, expected)
    assert torch.equal(got_state.absmax, expected_state.absmax)
    assert got_state.packing_format_for_cpu and got_state.dtype == expected_state.dtype
