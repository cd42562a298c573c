"""Progress bars for long waits: drawn on a terminal, silent where stderr is a file or pipe."""

from __future__ import annotations

import io

from fedkrso.common import logs


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_draws_on_a_terminal(monkeypatch):
    screen = Terminal()
    monkeypatch.setattr(logs.sys, "stderr", screen)
    with logs.progress(total=3, desc="round 2 updates", unit="update") as bar:
        bar.update(2)
        bar.refresh()  # tqdm redraws at most every 0.1 s on its own
    assert "round 2 updates" in screen.getvalue() and "2/3" in screen.getvalue()


def test_progress_is_silent_off_a_terminal(monkeypatch):
    pipe = io.StringIO()
    monkeypatch.setattr(logs.sys, "stderr", pipe)
    with logs.progress(total=3, desc="clients joined") as bar:
        bar.update(3)
    assert pipe.getvalue() == ""
