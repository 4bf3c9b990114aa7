import pytest
import torch

from tsq_vllm.format import pack, pack_factor, run_length, unpack


def _as_int32(word: int) -> int:
    return word - (1 << 32) if word >= 1 << 31 else word


def _stream_pack(values: list[int], bits: int) -> list[int]:
    """Independent reference: the codes as one little-endian bit stream in a Python integer."""
    stream = sum(v << (bits * j) for j, v in enumerate(values))
    n_words = len(values) * bits // 32
    return [_as_int32((stream >> (32 * w)) & 0xFFFFFFFF) for w in range(n_words)]


# Words computed by hand from the layout in docs/format.md.
GOLDEN = [
    # 2-bit: 0,1,2,3 per byte = 0b11100100
    (2, [0, 1, 2, 3] * 4, [0xE4E4E4E4]),
    # 4-bit: nibble j holds value j
    (4, list(range(8)), [0x76543210]),
    (4, [15] * 8, [0xFFFFFFFF]),
    # 8-bit: byte j holds value j
    (8, [1, 2, 3, 255], [0xFF030201]),
    # 3-bit: v0 = 1 at bit 0; v10 = 0b110 straddles words 0/1; v21 = 0b101 straddles 1/2; v31 = 7 at
    # bits 29..31
    (3, [1] + [0] * 9 + [6] + [0] * 10 + [5] + [0] * 9 + [7], [0x80000001, 0x80000001, 0xE0000002]),
    # 3-bit symmetric zero point stored as z - 1 = 3 everywhere: the classic GPTQ pattern
    (3, [3] * 32, [0xDB6DB6DB, 0xB6DB6DB6, 0x6DB6DB6D]),
    (2, [1] * 16, [0x55555555]),
    (4, [7] * 8, [0x77777777]),
    (8, [127] * 4, [0x7F7F7F7F]),
]


@pytest.mark.parametrize("bits,values,words", GOLDEN)
@pytest.mark.parametrize("dim", [0, 1])
def test_golden_words(bits, values, words, dim):
    codes = torch.tensor(values, dtype=torch.int32)
    codes = codes[:, None] if dim == 0 else codes[None, :]
    packed = pack(codes, bits, dim=dim)
    expected = torch.tensor([_as_int32(w) for w in words], dtype=torch.int32)
    assert packed.dtype == torch.int32
    assert packed.flatten().tolist() == expected.tolist()
    assert torch.equal(unpack(packed, bits, dim=dim), codes)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_matches_bit_stream_reference(bits):
    g = torch.Generator().manual_seed(bits)
    values = torch.randint(0, 1 << bits, (4 * run_length(bits),), generator=g).tolist()
    assert pack(torch.tensor(values)[:, None], bits).flatten().tolist() == _stream_pack(
        values, bits
    )


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("dim", [0, 1, -1])
def test_round_trip(bits, dim):
    g = torch.Generator().manual_seed(0)
    shape = [3, 5, 7]
    shape[dim] = 2 * run_length(bits)
    codes = torch.randint(0, 1 << bits, shape, generator=g, dtype=torch.int32)
    packed = pack(codes, bits, dim=dim)
    expected_shape = list(shape)
    expected_shape[dim] = int(shape[dim] / pack_factor(bits))
    assert list(packed.shape) == expected_shape
    assert packed.is_contiguous()
    assert torch.equal(unpack(packed, bits, dim=dim), codes)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("dtype", [torch.uint8, torch.int64])
def test_packing_in_row_blocks_gives_the_words_of_the_stream_reference(monkeypatch, bits, dtype):
    """`pack` converts a few rows at a time to int64; with blocks of 2–3 rows (and a ragged last
    block) the words are still the bit-stream reference's, whatever the codes' integer dtype."""
    from tsq_vllm.format import packing

    monkeypatch.setattr(packing, "_BLOCK", 3 * run_length(bits) - 1)  # 2 rows per block
    g = torch.Generator().manual_seed(bits)
    codes = torch.randint(0, 1 << bits, (7, run_length(bits)), generator=g).to(dtype)
    packed = pack(codes, bits, dim=1)
    for row, words in zip(codes.tolist(), packed.tolist(), strict=True):
        assert words == _stream_pack(row, bits)
    assert torch.equal(pack(codes.t(), bits, dim=0), packed.t())
    assert pack(codes[:0], bits, dim=1).shape == (0, run_length(bits) * bits // 32)


def test_pack_factor_is_exact():
    assert pack_factor(3) * 3 == 32
    assert [run_length(b) for b in (2, 3, 4, 8)] == [16, 32, 8, 4]


@pytest.mark.parametrize("bits", [1, 5, 16])
def test_unsupported_bits(bits):
    with pytest.raises(ValueError, match=f"bits={bits} is not supported"):
        pack(torch.zeros(32, 1, dtype=torch.int32), bits)


@pytest.mark.parametrize("bits,length", [(3, 48), (3, 16), (4, 12), (2, 8), (8, 6)])
def test_length_not_a_whole_run(bits, length):
    with pytest.raises(ValueError, match=f"not a multiple of {run_length(bits)}"):
        pack(torch.zeros(length, 2, dtype=torch.int32), bits)


@pytest.mark.parametrize("bad", [-1, 8])
def test_codes_out_of_range(bad):
    codes = torch.zeros(32, 1, dtype=torch.int32)
    codes[5] = bad
    with pytest.raises(ValueError, match=r"outside \[0, 7\]"):
        pack(codes, 3)


def test_float_codes_rejected():
    with pytest.raises(TypeError):
        pack(torch.zeros(8, 1), 4)
