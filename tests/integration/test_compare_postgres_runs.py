"""``peftlab compare`` on a real PostgreSQL server (issue #33): two processes standing for two machines (separate
study directories, one storage URL, distinct machine names) share one study, every run happens exactly once
across both, a machine SIGKILLed mid-run is found by the heartbeat and its run redone by the other, and the report
written on either side holds every method with its intervals. A missing driver is one line naming the package.

The server is scripts/postgres.sh's throwaway one: scripts/test.sh starts it (PEFTLAB_TEST_POSTGRES holds its
URL); run alone, this module starts and stops its own; where none can start, the tests that need it are skipped
with the script's reason.

This file holds the tests that start processes or load a packaged model; the in-process ones are in
tests/unit/test_compare_postgres.py."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from pathlib import Path

import pytest

from conftest import ROOT, runs_log, tiny_study


@pytest.fixture(scope="session")
def postgres_server():
    """The URL of a running PostgreSQL server's database (scripts/test.sh's, or one started here)."""
    url = os.environ.get("PEFTLAB_TEST_POSTGRES")
    if url == "none":
        pytest.skip("no PostgreSQL server could be started (scripts/postgres.sh printed why at the start)")
    if url:
        yield url
        return
    directory = tempfile.mkdtemp(prefix="peftlab-postgres-", dir="/tmp")  # the server's user must reach it
    started = subprocess.run(["bash", str(ROOT / "scripts" / "postgres.sh"), "start", directory],
                             capture_output=True, text=True, timeout=300)
    url = started.stdout.strip()
    try:
        if not url:
            reason = (started.stderr.strip().splitlines() or ["scripts/postgres.sh printed no URL"])[-1]
            pytest.skip(reason)
        yield url
    finally:
        subprocess.run(["bash", str(ROOT / "scripts" / "postgres.sh"), "stop", directory], timeout=120)


@pytest.fixture
def database(postgres_server):
    """A fresh database on the server for one test (dropped afterwards)."""
    import psycopg

    name = f"peftlab_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(postgres_server, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    yield postgres_server.rsplit("/", 1)[0] + "/" + name
    with psycopg.connect(postgres_server, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def machine(study, study_dir, url, name, **env):
    """`peftlab compare` as machine ``name``: its own study directory, the shared storage URL."""
    return subprocess.Popen(
        [sys.executable, "-m", "peftlab", "compare", "--config", str(study), "--study_dir", str(study_dir),
         "--storage", url], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env=dict(os.environ, PYTHONWARNINGS="ignore", PEFTLAB_COMPARE_HOST=name, OMP_NUM_THREADS="1", **env))


def check_report(study_dir: Path, methods: set[str], trials: int, seeds: int) -> None:
    """results.json on this machine holds every method: all its trials and seeds, metrics with intervals."""
    part = json.loads((study_dir / "results.json").read_text())["parts"][0]
    assert {m["name"] for m in part["methods"]} == methods
    for m in part["methods"]:
        # (a killed worker's trial stays listed as failed beside its re-run)
        assert sum(t["state"] == "complete" for t in m["trials"]) == trials and len(m["seeds"]) == seeds, m["name"]
        assert all("metrics" in s for s in m["seeds"])
        for metric in ("test/acc", "test/loss"):
            iv = m["test"][metric]
            assert iv["low"] <= iv["mean"] <= iv["high"] and len(iv["per_seed"]) == seeds, (m["name"], metric)
    assert (study_dir / "report.md").is_file()


@pytest.mark.slow  # two compare processes on one PostgreSQL: minutes on 2 cores
def test_two_machines_share_one_postgres_study_and_every_run_happens_once(tmp_path, tiny_bert, sentiment_csv,
                                                                         database):
    study = tiny_study(tmp_path, tiny_bert, sentiment_csv, tuning={"trials": 1, "pruner": "none", "seed": 0},
                       seeds=[0])
    dirs = {"a": tmp_path / "machine-a", "b": tmp_path / "machine-b"}
    procs = {name: machine(study, d, database, f"machine-{name}") for name, d in dirs.items()}
    outputs = {name: p.communicate(timeout=900)[0] for name, p in procs.items()}
    for name, p in procs.items():
        assert p.returncode == 0, outputs[name][-3000:]
    ran = Counter(e["run"] for d in dirs.values() for e in runs_log(d) if e["event"] == "start")
    expected = {f"main/{m}/{r}" for m in ("lora", "prompt") for r in ("tune-000", "seed-0")}
    assert set(ran) == expected and set(ran.values()) == {1}, ran  # every run exactly once across both machines
    hosts = {e["host"] for d in dirs.values() for e in runs_log(d)}
    assert hosts == {"machine-a", "machine-b"}, "both machines trained"
    for d in dirs.values():  # either side's report holds everything (results come from the shared storage)
        check_report(d, {"lora", "prompt"}, trials=1, seeds=1)


@pytest.mark.slow
def test_a_killed_machine_is_found_by_the_heartbeat_and_its_run_redone(tmp_path, tiny_bert, sentiment_csv, database):
    """SIGKILL machine a in the middle of a run: machine b (another host name, so only the heartbeat can tell) fails
    that trial after the grace period, runs it again, and finishes the study."""
    study = tiny_study(tmp_path, tiny_bert, sentiment_csv, budget={"max_steps": 40, "val_check_interval": 4},
                       methods={"lora": {}}, seeds=[0], tuning={"trials": 2, "pruner": "none", "seed": 0})
    a_dir, b_dir = tmp_path / "machine-a", tmp_path / "machine-b"
    heartbeat = {"PEFTLAB_COMPARE_HEARTBEAT_S": "2"}  # grace period 8 s
    a = machine(study, a_dir, database, "machine-a", **heartbeat)
    deadline = time.time() + 300
    while time.time() < deadline and not any(e["event"] == "start" for e in runs_log(a_dir)):
        time.sleep(0.2)
    time.sleep(3)  # a's run is under way (and has sent a heartbeat) when b starts
    b = machine(study, b_dir, database, "machine-b", **heartbeat)
    time.sleep(2)
    a.send_signal(signal.SIGKILL)
    a.wait()
    killed = {e["run"] for e in runs_log(a_dir) if e["event"] == "start"} - \
        {e["run"] for e in runs_log(a_dir) if e["event"] == "end"}
    assert len(killed) == 1, runs_log(a_dir)
    out = b.communicate(timeout=900)[0]
    assert b.returncode == 0, out[-3000:]
    b_runs = Counter(e["run"] for e in runs_log(b_dir) if e["event"] == "start")
    assert b_runs[next(iter(killed))] == 1, (killed, b_runs)  # the killed run was redone by b
    finished = Counter(e["run"] for d in (a_dir, b_dir) for e in runs_log(d) if e.get("state") == "finished")
    # the killed run, one more tuning trial (named by its trial number) and the seed, each finished once
    assert len(finished) == 3 and set(finished.values()) == {1}, finished
    assert killed <= set(finished) and "main/lora/seed-0" in finished, finished
    check_report(b_dir, {"lora"}, trials=2, seeds=1)
    before = runs_log(a_dir)
    again = subprocess.run([sys.executable, "-m", "peftlab", "compare", "--config", str(study), "--study_dir",
                            str(a_dir), "--storage", database], capture_output=True, text=True, timeout=600,
                           env=dict(os.environ, PYTHONWARNINGS="ignore", PEFTLAB_COMPARE_HOST="machine-a"))
    assert again.returncode == 0, again.stdout[-2000:] + again.stderr[-2000:]
    assert runs_log(a_dir) == before  # machine a, restarted, trains nothing ...
    check_report(a_dir, {"lora"}, trials=2, seeds=1)  # ... and reports everything
