"""Progress bars for long waits: drawn on a terminal, silent where stderr is a file or pipe; and
transformers kept quiet without importing it."""

from __future__ import annotations

import io
import subprocess
import sys

from fedkrso.bench.launch import child_env
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


QUIET_PROBE = """
import sys
from fedkrso.common import logs
logs.configure("info", json=True)
print("imported", sorted(m for m in ("transformers", "datasets") if m in sys.modules), flush=True)
import datasets, transformers
from transformers import AutoModelForSequenceClassification
AutoModelForSequenceClassification.from_pretrained(sys.argv[1])
datasets.Dataset.from_dict({"x": list(range(10))}).save_to_disk(sys.argv[2])
print("verbosity", transformers.logging.get_verbosity(), "bars", transformers.utils.logging.is_progress_bar_enabled(),
      datasets.is_progress_bar_enabled())
"""


def test_transformers_is_quieted_without_being_imported_and_a_users_level_is_kept(tiny_bert, tmp_path):
    """``logs.configure`` imports neither transformers nor datasets (a bad config answers before
    they load); off a terminal, a model loaded and a dataset saved after it draw no progress bar
    and transformers logs errors only, unless the user set TRANSFORMERS_VERBOSITY, which is kept."""
    quieting = ("TRANSFORMERS_VERBOSITY", "HF_HUB_DISABLE_PROGRESS_BARS", "HF_DATASETS_DISABLE_PROGRESS_BARS")
    env = {k: v for k, v in child_env().items() if k not in quieting}
    quiet = subprocess.run([sys.executable, "-c", QUIET_PROBE, str(tiny_bert), str(tmp_path / "a")],
                           capture_output=True, text=True, timeout=120, env=env)
    assert quiet.returncode == 0, quiet.stderr[-2000:]
    assert quiet.stdout.split("\n")[:2] == ["imported []", "verbosity 40 bars False False"], quiet.stdout
    assert "Loading weights" not in quiet.stderr and "%|" not in quiet.stderr, quiet.stderr[-2000:]
    chatty = subprocess.run([sys.executable, "-c", QUIET_PROBE, str(tiny_bert), str(tmp_path / "b")],
                            capture_output=True, text=True, timeout=120, env={**env, "TRANSFORMERS_VERBOSITY": "info"})
    assert chatty.returncode == 0, chatty.stderr[-2000:]
    assert "verbosity 20 bars False False" in chatty.stdout, chatty.stdout
