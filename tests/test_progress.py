"""Progress bars: throttled in log files, normal on a terminal."""

import io
import time

from slidessl import progress as mod


class _Stream(io.StringIO):
    def __init__(self, tty: bool):
        super().__init__()
        self.tty = tty

    def isatty(self):
        return self.tty


def test_log_file_bars_update_at_most_every_interval(monkeypatch):
    log = _Stream(tty=False)
    monkeypatch.setattr(mod.sys, "stderr", log)
    monkeypatch.delenv("SLIDESSL_PROGRESS_INTERVAL", raising=False)
    bar = mod.progress(total=50, desc="x", file=log, dynamic_ncols=True)
    assert bar.mininterval == mod.LOG_INTERVAL_S and not bar.dynamic_ncols
    for _ in range(50):  # ~0.6 s: an unthrottled bar (0.1 s) would redraw ~6 times
        time.sleep(0.012)
        bar.update(1)
    bar.close()
    # the opening draw and the closing one only
    assert log.getvalue().count("\r") <= 3, log.getvalue()


def test_terminal_bars_and_the_override(monkeypatch):
    monkeypatch.setattr(mod.sys, "stderr", _Stream(tty=True))
    bar = mod.progress(total=3, file=io.StringIO())
    assert bar.mininterval == 0.1
    bar.close()
    monkeypatch.setattr(mod.sys, "stderr", _Stream(tty=False))
    monkeypatch.setenv("SLIDESSL_PROGRESS_INTERVAL", "5")
    bar = mod.progress(total=3, file=io.StringIO())
    assert bar.mininterval == 5.0
    bar.close()
