"""
Tests of report.py: the Wilson interval's known values.
"""
from report import wilson_interval


def test_report_wilson_interval_known_values():
    """Wilson 95% intervals match hand-computed values, stay in [0, 1] and are wide at 0 examples."""
    cases = {(8, 10): (0.4902, 0.9433), (80, 100): (0.7112, 0.8666), (0, 5): (0.0, 0.4345), (5, 5): (0.5655, 1.0)}
    for (correct, total), expected in cases.items():
        low, high = wilson_interval(correct, total)
        assert abs(low - expected[0]) < 1e-4 and abs(high - expected[1]) < 1e-4, \
            f"{correct}/{total}: got ({low:.4f}, {high:.4f}), expected {expected}: the Wilson formula is off"
    assert wilson_interval(0, 0) == (0.0, 1.0), "no examples must mean 'anything is possible'"
