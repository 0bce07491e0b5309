"""What `dagster dev` prints: no Dagster beta/preview warnings from the code location, no progress bars when
stderr is not a terminal, no torch "degrees of freedom" warning from IS at tiny N (its spread is undefined)."""
import io
import math
import subprocess
import sys
import warnings
from pathlib import Path

import torch

from ops.metrics.fid_kid import set_metrics
from ops.progress import bars_disabled, progress_bar

ROOT = Path(__file__).resolve().parents[1]


def _run(code: str, tmp_path: Path) -> subprocess.CompletedProcess:
    """``code`` in a fresh interpreter at the repository root, with a bare environment and its own forge home."""
    env = {"PATH": "/usr/bin:/bin", "ANOMALY_FORGE_HOME": str(tmp_path), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)


def test_loading_the_code_location_prints_no_beta_or_preview_warning(tmp_path):
    code = ("import warnings, dagster as dg\n"
            "warnings.simplefilter('error', dg.BetaWarning)\n"
            "warnings.simplefilter('error', dg.PreviewWarning)\n"
            "import pipelines.definitions\n")
    proc = _run(code, tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "Warning" not in proc.stderr, proc.stderr[-2000:]


def test_library_deprecation_notices_are_quiet_where_the_code_location_is_loaded(tmp_path):
    """Step processes of a run import the code location: a library's deprecation FutureWarning stays out of
    their logs; other FutureWarnings still show."""
    code = ("import warnings, pipelines.definitions\n"
            "warnings.warn('old_arg is deprecated', FutureWarning)\n"
            "warnings.warn('a behaviour change', FutureWarning)\n")
    proc = _run(code, tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "deprecated" not in proc.stderr and "a behaviour change" in proc.stderr, proc.stderr[-2000:]


def test_an_ingest_run_prints_no_beta_warning():
    """raw_defect_sets returns a data-versioned Output (a beta parameter) in every ingest run."""
    import dagster as dg
    import pandas as pd

    from assets.ingest import CONTENT_COLUMNS, versioned_output

    rows = pd.DataFrame({c: [] for c in CONTENT_COLUMNS})
    with warnings.catch_warnings():
        warnings.simplefilter("error", dg.BetaWarning)
        out = versioned_output(rows, {})
    assert out.data_version is not None


def test_progress_bars_are_off_when_stderr_is_not_a_terminal(monkeypatch):
    monkeypatch.delenv("ANOMALY_FORGE_NO_PROGRESS", raising=False)
    monkeypatch.delenv("ANOMALY_FORGE_PROGRESS", raising=False)
    captured = io.StringIO()  # isatty() is False, like dagster dev's log pipe
    monkeypatch.setattr(sys, "stderr", captured)
    assert bars_disabled()
    with progress_bar("steps", total=3) as bar:
        bar.update(3)
    assert captured.getvalue() == ""

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    monkeypatch.setattr(sys, "stderr", Terminal())
    assert not bars_disabled()
    monkeypatch.setenv("ANOMALY_FORGE_NO_PROGRESS", "1")
    assert bars_disabled()
    monkeypatch.setattr(sys, "stderr", captured)
    monkeypatch.delenv("ANOMALY_FORGE_NO_PROGRESS")
    monkeypatch.setenv("ANOMALY_FORGE_PROGRESS", "1")
    assert not bars_disabled()


def _set(n_fake):
    g = torch.Generator().manual_seed(0)
    real, fake = torch.randn(6, 8, generator=g, dtype=torch.float64), torch.randn(n_fake, 8, generator=g,
                                                                                  dtype=torch.float64)
    return set_metrics(real, fake, torch.randn(n_fake, 10, generator=g), kid_subsets=5)


def test_inception_score_spread_is_undefined_at_tiny_n_without_a_warning():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tiny = _set(3)
    assert not [w for w in caught if "degrees of freedom" in str(w.message)]
    assert tiny.is_splits == 1 and math.isfinite(tiny.is_mean) and math.isnan(tiny.is_std)
    assert "IS spread (is_std) undefined" in tiny.notes
    enough = _set(8)
    assert enough.is_splits == 4 and math.isfinite(enough.is_std) and "IS spread" not in enough.notes
