"""RainSpec: presets carry the published ranges, the parser round-trips and rejects bad fields by name."""
import numpy as np
import pytest

from engine.rain import PRESETS, RainSpec, TABLE1_QUANTITY_TO_AMOUNT
from kernels import params as P


def test_authors_ranges():
    # the authors' ranges (their generator's small / medium / large settings, and our random union of them)
    m = RainSpec.preset("medium")
    assert (m.amount, m.width, m.width_prob, m.length, m.angle) == (
        (0.005, 0.007), (3, 5, 7), (0.25, 0.5, 0.25), (35, 45), (-30, 30))
    s, l, r = RainSpec.preset("small"), RainSpec.preset("large"), RainSpec.preset("random")
    assert s.amount == (0.002, 0.004) and s.width == (1, 3) and s.length == (25, 35) and s.angle == (-10, 10)
    assert l.amount == (0.008, 0.010) and l.width == (7, 9) and l.length == (45, 55) and l.angle == (-60, 60)
    assert r.width == (1, 3, 5, 7, 9) and r.length == (25, 55)
    for spec in (s, m, l, r):
        assert spec.beta == (0.7, 1.0) and spec.rain_prob == 1.0 and spec.threshold == 50


def test_table1_quantity_reading():
    t = RainSpec.preset("table1-medium")
    # quantity 200..300 read as get_noise's `value`: seeds kept where U(0,256) >= 256 - value/100
    assert t.amount == pytest.approx((200 / 100 / 256, 300 / 100 / 256))
    assert TABLE1_QUANTITY_TO_AMOUNT == pytest.approx(1 / 25600)
    assert t.width == (5, 7, 9) and t.length == (20, 40) and t.angle == (-30, 30)
    assert RainSpec.preset("table1-large").length == (5, 60)


def test_heldout_presets_are_other_families():
    assert {PRESETS[n].family for n in PRESETS if n.startswith("heldout-")} == {"layered", "sparse"}


def test_parse_full_form_equals_medium_ranges():
    s = RainSpec.parse("amount=0.005:0.007,width=3|5|7,wprob=0.25|0.5|0.25,length=35:45,angle=-30:30,beta=0.7:1")
    m = RainSpec.preset("medium")
    for f in ("amount", "width", "width_prob", "length", "angle", "beta"):
        assert getattr(s, f) == getattr(m, f)


def test_parse_preset_with_overrides():
    s = RainSpec.parse("large,prob=0.9,t=30,pad=60")
    assert s.rain_prob == 0.9 and s.threshold == 30 and s.canvas_pad == 60 and s.length == (45, 55)
    assert RainSpec.parse("small").name == "small"
    w = RainSpec.parse("width=1|3")
    assert w.width_prob == (0.5, 0.5)


@pytest.mark.parametrize("text,field", [
    ("amount=abc", "amount"), ("length=3.5:9", "length"), ("width=2|4", "width"), ("angle=40:-40", "angle"),
    ("prob=1.5", "rain_prob"), ("t=300", "threshold"), ("wprob=0.5|0.6", "width_prob"), ("foo=1", "foo=1"),
    ("nosuchpreset", "nosuchpreset"),
])
def test_parse_errors_name_the_field(text, field):
    with pytest.raises(ValueError, match=field):
        RainSpec.parse(text)


def test_unknown_preset_lists_valid_names():
    with pytest.raises(ValueError, match="medium"):
        RainSpec.preset("drizzle")


def test_to_vector_layout():
    v = RainSpec.preset("medium").to_vector()
    assert v.dtype == np.float64 and v.shape == (P.SIZE,)
    assert v[P.FAMILY] == P.FAMILY_IDS["streak"] and v[P.N_WIDTHS] == 3
    np.testing.assert_array_equal(v[P.WIDTHS:P.WIDTHS + 3], [3, 5, 7])
    np.testing.assert_allclose(v[P.WIDTH_CDF:P.WIDTH_CDF + 3], [0.25, 0.75, 1.0])
    assert (v[P.LENGTH_LO], v[P.LENGTH_HI], v[P.ANGLE_LO], v[P.ANGLE_HI]) == (35, 45, -30, 30)
