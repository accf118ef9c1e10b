"""blip_core.progress: a tqdm bar on a terminal, tqdm's meter as plain lines elsewhere."""

from __future__ import annotations

import io

from blip_core import progress
from blip_core.progress import Advance, PlainProgress, progress_bar


def test_plain_lines_every_five_percent_and_at_close(monkeypatch) -> None:
    clock = iter(float(t) for t in range(1000))
    monkeypatch.setattr(progress.time, "monotonic", lambda: next(clock))  # one second per call
    out = io.StringIO()
    with PlainProgress(100, "caption part-0", "img", file=out) as bar:
        bar.set_postfix({"loss": "1.5"})
        for _ in range(50):
            bar.update(1)
    start, *lines = out.getvalue().splitlines()
    assert "\r" not in out.getvalue()
    assert start == "caption part-0: started (100 img)"  # at once: a log shows the stage begin
    assert lines[0].startswith("caption part-0:   5% 5/100 [") and "img/s" in lines[0]
    assert lines[-1].startswith("caption part-0:  50% 50/100") and lines[-1].endswith("loss=1.5]")
    assert len(lines) == 10  # 5 %, 10 %, ... 50 % (the close adds no repeat)


def test_plain_lines_are_throttled_in_time(monkeypatch) -> None:
    now = [0.0]
    monkeypatch.setattr(progress.time, "monotonic", lambda: now[0])
    out = io.StringIO()
    bar = PlainProgress(1000, "pretrain", "step", file=out)
    for _ in range(25):  # 2.5 % of the total in 25 s: lines from the 10 s rule only
        now[0] += 1.0
        bar.update(1)
    assert len(out.getvalue().splitlines()) == 1 + 2  # the start line, then the 10 s rule
    bar.close()
    bar.close()
    assert len(out.getvalue().splitlines()) == 1 + 3


def test_form_follows_stderr(monkeypatch) -> None:
    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    monkeypatch.setattr("sys.stderr", io.StringIO())
    assert isinstance(progress_bar(3, "x"), PlainProgress)
    monkeypatch.setattr("sys.stderr", Tty())
    bar = progress_bar(3, "x", unit="img")
    assert not isinstance(bar, PlainProgress) and not bar.disable
    bar.close()
    assert progress_bar(3, "x", enabled=False).disable


def test_advance_opens_its_bar_at_the_first_call(monkeypatch) -> None:
    err = io.StringIO()
    monkeypatch.setattr("sys.stderr", err)
    with Advance("export", unit="row") as advance:
        assert err.getvalue() == "export: started\n"  # on entering, before the total is known
        advance(4, 10)
        advance(6, 10)
    assert err.getvalue().splitlines()[-1].startswith("export: 100% 10/10 [") and "row/s" in err.getvalue()
