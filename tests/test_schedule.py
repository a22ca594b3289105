import math

import pytest

from prefast.errors import ConfigError
from prefast.freezing.schedule import FreezeOutSchedule


@pytest.mark.parametrize(
    "n,t0,scale,scale_lr",
    [
        (10, 0.8, "cubic", True),
        (5, 0.5, "linear", False),
        (40, 0.6, "squared", True),
        (3, 1.0, "cubic", True),
    ],
)
def test_matches_closed_form(n, t0, scale, scale_lr):
    total = 1234
    s = FreezeOutSchedule(n, total, t0=t0, scale=scale, scale_lr=scale_lr, base_lr=0.1)
    power = {"linear": 1, "squared": 2, "cubic": 3}[scale]
    for i in range(n):
        t_i = (t0 + (1 - t0) * i / (n - 1)) ** power
        assert s.t(i) == pytest.approx(t_i)
        assert s.freeze_iter(i) == round(t_i * total)
        lr0 = 0.1 / t_i if scale_lr else 0.1
        for it in (0, 7, s.freeze_iter(i) // 2, s.freeze_iter(i) - 1):
            assert s.lr(i, it) == pytest.approx(
                lr0 * 0.5 * (1 + math.cos(math.pi * it / s.freeze_iter(i)))
            )
            assert not s.is_frozen(i, it)
        assert s.lr(i, s.freeze_iter(i)) == 0.0 and s.is_frozen(i, s.freeze_iter(i))


def test_freezeout_default_first_stage_at_51_2_percent():
    s = FreezeOutSchedule(40, 10_000)
    assert s.t(0) == pytest.approx(0.512)
    assert s.freeze_iter(0) == 5120
    assert s.freeze_iter(39) == 10_000  # the head trains to the end


def test_frozen_stages_form_a_prefix():
    s = FreezeOutSchedule(12, 500, t0=0.3, scale="linear")
    for it in range(0, 501, 7):
        k = s.frozen_prefix(it)
        assert all(s.is_frozen(i, it) for i in range(k))
        assert not any(s.is_frozen(i, it) for i in range(k, 12))


@pytest.mark.parametrize("kw", [{"t0": 0.0}, {"t0": 1.5}, {"scale": "quartic"}, {"total_iters": 0}])
def test_bad_values_name_the_field(kw):
    args = {"num_stages": 4, "total_iters": 100, **kw}
    with pytest.raises(ConfigError, match=next(iter(kw))):
        FreezeOutSchedule(**args)
