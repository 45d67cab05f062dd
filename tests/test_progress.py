"""Progress lines (issue 20, part 4): a bar on a terminal, a few plain lines elsewhere."""
from __future__ import annotations

import logging

from llama2_lit.core import progress as prog


def test_eta_text_hand_worked():
    assert prog.eta_text(3, 10, 12.0) == "3/10 (30%), 12 s elapsed, ETA 28 s"
    assert prog.eta_text(0, 10, 0.0) == "0/10 (0%), 0 s elapsed"
    assert prog.eta_text(4, None, 7.2) == "4 done, 7 s elapsed"


def test_off_a_terminal_a_long_loop_logs_a_line_per_interval_not_per_item(caplog, monkeypatch):
    clock = iter(float(t) for t in range(0, 1000, 10))  # each perf_counter call advances 10 s
    monkeypatch.setattr(prog.time, "perf_counter", lambda: next(clock))
    with caplog.at_level(logging.INFO, logger=prog.__name__):
        assert list(prog.progress(range(20), "rs chunks", every_s=30.0, terminal=False)) == list(range(20))
    lines = [r.getMessage() for r in caplog.records]
    assert 4 <= len(lines) <= 8 and all(line.startswith("rs chunks: ") for line in lines)  # not 20
    assert lines[-1].startswith("rs chunks: 20/20 (100%)")


def test_a_short_loop_off_a_terminal_prints_nothing(caplog):
    with caplog.at_level(logging.INFO, logger=prog.__name__):
        assert list(prog.progress([1, 2, 3], "quick", terminal=False)) == [1, 2, 3]
    assert not caplog.records
