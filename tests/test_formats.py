"""The code tables and thresholds every kernel uses, derived or checked independently."""

from __future__ import annotations

import math
from fractions import Fraction

import pytest
import torch

from bnbx import functional as F
from reference import code_table_ref, dynamic_map_ref, fp4_pivots_ref, nf4_thresholds_ref, normal_map_ref


def test_nf4_table_is_the_normal_float_quantiles():
    derived = normal_map_ref().float()
    table = F.get_4bit_type("nf4")
    assert torch.equal(table, code_table_ref("nf4"))
    # torch's erfinv is not scipy's ndtri: the derivation agrees to about one fp32 ulp
    assert torch.allclose(derived, table, atol=2.5e-7, rtol=0)
    assert table[7] == 0 and table[0] == -1 and table[15] == 1 and bool((table[1:] > table[:-1]).all())


def test_fp4_table():
    table = F.get_4bit_type("fp4")
    assert torch.equal(table, code_table_ref("fp4"))
    assert table.abs().max() == 1 and table[1] == pytest.approx(0.0625 / 12)
    assert torch.equal(table[8:], -table[:8])


def test_thresholds_are_midpoints_to_one_ulp():
    nf4 = code_table_ref("nf4").double()
    exact = (nf4[:-1] + nf4[1:]) / 2
    thresholds = nf4_thresholds_ref()
    ulp = torch.nextafter(thresholds, torch.full_like(thresholds, 2.0)) - thresholds
    assert ((thresholds.double() - exact).abs() <= ulp.double()).all()
    magnitudes = code_table_ref("fp4")[:8].sort().values.double()
    assert torch.allclose(fp4_pivots_ref().double(), (magnitudes[:-1] + magnitudes[1:]) / 2, atol=4e-7, rtol=0)


def test_dynamic_map():
    code = F.create_dynamic_map()
    assert code.shape == (256,) and code.dtype == torch.float32
    assert torch.equal(code, dynamic_map_ref())
    assert bool((code[1:] >= code[:-1]).all())
    # spot values listed in the bitsandbytes format notes
    assert code[0].item() == pytest.approx(-0.99296875)
    assert code[127] == 0 and code[255] == 1
    assert code[254].item() == pytest.approx(0.99296875)
    assert code[192].item() == pytest.approx(0.12109375)
    assert code[129].item() == pytest.approx(3.25e-6)


def test_decimal_to_float32_rounds_once():
    from reference import decimal_to_float32

    # 1 + 2^-24 is the exact tie between 1 and 1 + 2^-23; a hair above it must round up
    assert decimal_to_float32(str(Fraction(1) + Fraction(1, 2**24) + Fraction(1, 10**30))) == 1 + 2**-23
    assert decimal_to_float32("0.1") == float(torch.tensor(0.1, dtype=torch.float32))
    assert math.isclose(decimal_to_float32("-0.8480964004993439"), -0.8480964, rel_tol=1e-7)


def test_matches_bitsandbytes_tables():
    bnb_functional = pytest.importorskip("bitsandbytes.functional", reason="bitsandbytes is not installed")
    assert torch.equal(bnb_functional.get_4bit_type("nf4", device="cpu"), F.get_4bit_type("nf4"))
    assert torch.equal(bnb_functional.get_4bit_type("fp4", device="cpu"), F.get_4bit_type("fp4"))
    assert torch.equal(bnb_functional.create_dynamic_map(signed=True), F.create_dynamic_map())
