"""``peftlab compare`` on a real PostgreSQL server (issue #33): two processes standing for two machines (separate
study directories, one storage URL, distinct machine names) share one study, every run happens exactly once
across both, a machine SIGKILLed mid-run is found by the heartbeat and its run redone by the other, and the report
written on either side holds every method with its intervals. A missing driver is one line naming the package.

The server is scripts/postgres.sh's throwaway one: scripts/test.sh starts it (PEFTLAB_TEST_POSTGRES holds its
URL); run alone, this module starts and stops its own; where none can start, the tests that need it are skipped
with the script's reason.

This file holds the in-process tests; those that start processes or load a packaged model are in
tests/integration/test_compare_postgres_runs.py."""

from __future__ import annotations

import sys

from conftest import run_main, tiny_study


def test_a_missing_driver_is_one_line_naming_the_package_and_extra(tmp_path, tiny_bert, sentiment_csv, capsys,
                                                                  monkeypatch):
    """SQLAlchemy 2.1 maps postgresql:// to psycopg 3: without it, the error says what to install."""
    monkeypatch.setitem(sys.modules, "psycopg", None)  # `import psycopg` now fails, as where it is not installed
    study = tiny_study(tmp_path, tiny_bert, sentiment_csv)
    url = "postgresql://someone@127.0.0.1:1/peftlab"
    code, _, err = run_main(["compare", "--config", str(study), "--check", "--storage", url], capsys)
    assert code == 2 and err.count("\n") == 1, err
    assert f"storage {url!r} needs the database driver 'psycopg', which is not installed" in err
    assert "pip install 'peftlab[postgres]' (it installs psycopg[binary])" in err
