"""Layer specs: names round-trip, exact byte formulas, validation of impossible shapes."""
import pytest
import torch

from dfplan.errors import DfplanError
from dfplan.formats import quant
from dfplan.formats.specs import DEFAULT_CANDIDATES, Binary, IntN, Keep, parse_spec, spec_from_json, spec_to_json

NAMES = ["fp32", "bf16", "fp16", "int8", "int4", "int3", "int2", "int4g128", "int4g128a", "int8a",
         "int3g32", "int2g16a", "bin", "bin+r16", "bin+r16i4", "bin+r8i2", "bin+r32i3", "fbi", "fbi+r16"]


@pytest.mark.parametrize("name", NAMES)
def test_name_round_trip(name):
    spec = parse_spec(name)
    assert str(spec) == name
    assert parse_spec(str(spec)) == spec
    assert hash(spec) == hash(parse_spec(name))


def test_parse_spec_fields():
    assert parse_spec("int4g128a") == IntN(4, 128, symmetric=False)
    assert parse_spec("bin+r16i4") == Binary("row", 16, 4)
    assert parse_spec("fbi+r8") == Binary("fbi", 8, 8)
    assert parse_spec("FP16") == Keep("fp16")


@pytest.mark.parametrize("bad", ["int5", "int4g", "bin+r", "fp8", "binary", "", "int4g128b", "bin+r16i5"])
def test_parse_spec_rejects(bad):
    with pytest.raises(DfplanError):
        parse_spec(bad)


def test_init_is_not_in_the_name_but_survives_json():
    z = Binary("row", 16, init="zero")
    assert str(z) == "bin+r16" and z.nbytes((64, 32)) == Binary("row", 16).nbytes((64, 32))
    assert spec_from_json(spec_to_json(z)) == z
    assert spec_to_json(Binary("row", 16)) == "bin+r16"
    with pytest.raises(DfplanError):
        spec_from_json({"format": "int4", "init": "zero"})


def test_nbytes_formulas_by_hand():
    shape = (10, 37)
    assert Keep("fp32").nbytes(shape) == 370 * 4
    assert Keep("bf16").nbytes(shape) == 370 * 2
    assert IntN(8).nbytes(shape) == 370 + 10 * 2
    assert IntN(4).nbytes(shape) == 10 * 19 + 10 * 2           # ceil(37 * 4 / 8) = 19
    assert IntN(3).nbytes(shape) == 10 * 14 + 10 * 2           # ceil(111 / 8) = 14
    assert IntN(2).nbytes(shape) == 10 * 10 + 10 * 2
    assert IntN(4, symmetric=False).nbytes(shape) == 10 * 19 + 10 * 2 + 10
    assert IntN(4, 8).nbytes((10, 32)) == 10 * 16 + 10 * 4 * 2
    assert IntN(4, 8, False).nbytes((10, 32)) == 10 * 16 + 10 * 4 * 3
    assert Binary().nbytes(shape) == 10 * 5 + 10 * 2            # ceil(37 / 8) = 5
    assert Binary("fbi").nbytes(shape) == 10 * 5 + 37 * 2 * 2
    # rank 4 int8: U (10, 4) + u_scale (10,) fp16 + V (4, 37) + v_scale (4,) fp16
    assert Binary("row", 4).nbytes(shape) == 50 + 20 + 40 + 20 + 148 + 8
    # rank 4 int3: U rows ceil(12/8) = 2 bytes, V rows ceil(111/8) = 14 bytes
    assert Binary("row", 4, 3).nbytes(shape) == 50 + 20 + 10 * 2 + 20 + 4 * 14 + 8


def test_dfssm_unit_bytes_1p3b():
    # in_proj of mamba2-1.3b: bits + row scales + rank-16 int8 U, V with fp16 scales
    s = Binary("row", 16)
    assert s.nbytes((8512, 2048)) == 8512 * 256 + 8512 * 2 + 8512 * 16 + 8512 * 2 + 16 * 2048 + 16 * 2


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("shape", [(24, 40), (9, 37)])
def test_nbytes_equals_encoded_tensors(name, shape):
    spec = parse_spec(name)
    if isinstance(spec, IntN) and spec.group and shape[1] % spec.group:
        pytest.skip("group does not divide this row")
    if isinstance(spec, Binary) and spec.rank > min(shape):
        pytest.skip("rank too large for this shape")
    w = torch.randn(*shape, generator=torch.Generator().manual_seed(1))
    bufs = quant.encode_weight(w, spec)
    assert sum(t.numel() * t.element_size() for t in bufs.values()) == spec.nbytes(shape)
    assert [t.name for t in spec.payload(shape)] == list(bufs)


def test_validate_impossible_shapes():
    with pytest.raises(DfplanError, match="does not divide"):
        IntN(4, 128).validate((64, 200))
    with pytest.raises(DfplanError, match="rank 64 exceeds"):
        Binary("row", 64).validate((32, 256))
    with pytest.raises(DfplanError, match="2-D"):
        Keep().nbytes((3,))
    with pytest.raises(DfplanError):
        IntN(5)
    with pytest.raises(DfplanError):
        Binary("col")
    with pytest.raises(DfplanError):
        Keep("fp8")
    IntN(4, 128).validate((64, 256))


def test_default_candidates():
    names = [str(s) for s in DEFAULT_CANDIDATES]
    assert names == ["bin", "bin+r8", "bin+r16", "bin+r32", "bin+r64", "bin+r128",
                     "int2", "int3", "int4", "int8", "fp16"]
