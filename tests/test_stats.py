"""llama2_lit.core.stats: the mean and its standard error, and the paired difference, hand-worked."""
import pytest

from llama2_lit.core.stats import mean_and_se, paired_difference


def test_mean_and_standard_error_hand_worked():
    assert mean_and_se([0.0, 1.0]) == (0.5, 0.5)                     # s^2 = 0.5, se = sqrt(0.5 / 2)
    m, se = mean_and_se([0.2, 0.4, 0.6])                             # s^2 = 0.08 / 2 = 0.04, se = sqrt(0.04 / 3)
    assert abs(m - 0.4) < 1e-12 and abs(se - 0.11547005383792516) < 1e-12
    assert mean_and_se([0.3]) == (0.3, 0.0)


def test_paired_difference_hand_worked():
    # differences 0.1, 0.3, 0.2: mean 0.2, sample sd 0.1, se 0.1 / sqrt(3)
    d, se = paired_difference([0.5, 0.2, 0.0], [0.6, 0.5, 0.2])
    assert d == pytest.approx(0.2) and se == pytest.approx(0.1 / 3 ** 0.5)
    assert paired_difference([0.4], [0.9]) == (pytest.approx(0.5), 0.0)
    with pytest.raises(ValueError, match="same non-zero number"):
        paired_difference([0.1], [0.1, 0.2])
