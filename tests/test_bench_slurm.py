"""``rfds-bench run --executor slurm`` through submitit: the array task code runs under submitit's
in-process (debug) and local-subprocess executors — the latter preempted and requeued — and the
sbatch script submitit writes for a real cluster is checked with a stand-in ``sbatch``."""
import os
import signal
import stat
import threading
import time

import pytest

from bench_fakes import calls, make_fake_threestudio, write_suite
from threestudio_rfds.bench.cli import main as bench_main
from threestudio_rfds.bench.ledger import Ledger
from threestudio_rfds.bench.runner import run_suite
from threestudio_rfds.bench.slurm import SlurmOptions, submitted
from threestudio_rfds.bench.suite import SuiteError, load_suite

submitit = pytest.importorskip("submitit")


@pytest.fixture
def fake(tmp_path):
    return make_fake_threestudio(str(tmp_path / "threestudio")), str(tmp_path / "out")


def _statuses(out):
    by = {}
    for r in Ledger(os.path.join(out, "ledger.jsonl")).records():
        by.setdefault(r["prompt"], []).append(r["status"])
    return by


def test_debug_executor_runs_the_array_tasks(fake, tmp_path, capsys):
    ts, out = fake
    suite = load_suite(write_suite(str(tmp_path / "s.yaml"), ["a cat", "FAIL now", "a dog"]))
    counts = run_suite(suite, ts, out, executor="slurm", executor_options={"cluster": "debug", "gpus_per_task": 0},
                       log=lambda s: None)
    assert (counts["done"], counts["failed"], counts["submitted"]) == (2, 1, 3)
    assert _statuses(out) == {"a cat": ["started", "done"], "FAIL now": ["started", "failed"], "a dog": ["started", "done"]}
    (job,) = submitted(out)
    assert job["cluster"] == "debug" and len(job["runs"]) == 3
    assert bench_main(["status", out]) == 0
    assert "2 done, 1 failed (of 3)" in capsys.readouterr().out
    # a second submission has nothing left to do but the failure, which is kept
    again = run_suite(suite, ts, out, executor="slurm", executor_options={"cluster": "debug"}, log=lambda s: None)
    assert (again["submitted"], again["skipped"], again["failed_earlier"]) == (0, 2, 1) and len(calls(ts)) == 3


def test_local_executor_preempted_task_is_requeued_and_rerun_once(fake, tmp_path):
    ts, out = fake
    suite = load_suite(write_suite(str(tmp_path / "s.yaml"), ["SLOW one"]))
    open(os.path.join(ts, "slow-flag"), "w").close()
    ledger = Ledger(os.path.join(out, "ledger.jsonl"))

    def preempt():  # SIGUSR2 is what SLURM sends before preemption / time-out (submitit's --signal)
        deadline = time.time() + 60
        while not os.path.exists(os.path.join(ts, "sleeping")) and time.time() < deadline:
            time.sleep(0.05)
        rec = ledger.state()["fake/slow_one-" + suite.runs()[0].slug.rsplit("-", 1)[1] + "/s0"]
        os.kill(rec["owner"]["pid"], signal.SIGUSR2)

    t = threading.Thread(target=preempt)
    t.start()
    counts = run_suite(suite, ts, out, executor="slurm", grace=5.0, log=lambda s: None,
                       executor_options={"cluster": "local", "wait": True, "gpus_per_task": 0, "time_min": 10})
    t.join()
    assert counts["done"] == 1
    recs = list(ledger.records())
    assert [r["status"] for r in recs] == ["started", "interrupted", "started", "done"]
    assert recs[1]["reason"] == "preempted or timed out; requeued by submitit"
    assert recs[0]["owner"]["pid"] != recs[2]["owner"]["pid"]
    assert len(calls(ts)) == 2 and all(c["live_twins"] == [] for c in calls(ts))


def test_sbatch_script_for_a_cluster(fake, tmp_path, monkeypatch, capsys):
    ts, out = fake
    copy = tmp_path / "submitted.sh"
    bindir = tmp_path / "bin"
    bindir.mkdir()
    sbatch = bindir / "sbatch"
    sbatch.write_text(f'#!/bin/sh\ncp "$1" {copy}\necho "Submitted batch job 4242"\n')
    (bindir / "srun").write_text("#!/bin/sh\nexit 1\n")  # submitit only checks that srun exists
    # no cluster behind these stand-ins: squeue prints what the test puts in squeue.txt
    queue = tmp_path / "squeue.txt"
    queue.write_text("4242_0|PENDING\n4242_1|PENDING\n4242_2|PENDING\n")
    (bindir / "squeue").write_text(f"#!/bin/sh\ncat {queue}\n")
    for exe in (sbatch, bindir / "srun", bindir / "squeue"):
        exe.chmod(exe.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{bindir}{os.pathsep}{os.environ['PATH']}")
    suite = write_suite(str(tmp_path / "s.yaml"), ["a", "b", "c"],
                        slurm={"partition": "from-suite", "time_min": 30, "sbatch": {"constraint": "a100"}})
    rc = bench_main(["run", suite, "--threestudio", ts, "--out", out, "--executor", "slurm", "--partition", "gpu",
                     "--account", "proj", "--time", "90", "--gpus-per-task", "2", "--array-parallelism", "2",
                     "--sbatch", "qos=high"])
    assert rc == 0
    assert "3 runs submitted" in capsys.readouterr().out
    script = copy.read_text()
    for line in ("#SBATCH --array=0-2%2", "#SBATCH --partition=gpu", "#SBATCH --account=proj", "#SBATCH --time=90",
                 "#SBATCH --gpus-per-node=2", "#SBATCH --qos=high", "#SBATCH --constraint=a100",
                 "#SBATCH --signal=USR2@"):
        assert line in script, line
    (job,) = submitted(out)
    assert job["job_id"] == "4242" and job["cluster"] == "slurm"
    assert bench_main(["status", out]) == 0
    assert "3 queued (of 3)" in capsys.readouterr().out
    assert calls(ts) == []  # nothing ran here

    # task 0 still pending, task 1 running (not yet in the ledger), task 2 died before starting: SLURM no
    # longer holds it, and its accounting (sacct) says how it ended
    queue.write_text("4242_0|PENDING\n4242_1|RUNNING\n")
    sacct = bindir / "sacct"
    sacct.write_text("#!/bin/sh\ncat <<'EOF'\nJobID|State\n4242_[0%2]|PENDING\n4242_1|PENDING\n4242_2|FAILED\nEOF\n")
    sacct.chmod(sacct.stat().st_mode | stat.S_IEXEC)
    assert bench_main(["status", out]) == 0
    text = capsys.readouterr().out
    assert "2 queued, 1 not started (of 3)" in text  # the task that failed before its run started is not queued
    assert "SLURM: PENDING (4242_0)" in text and "SLURM: RUNNING (4242_1)" in text and "SLURM: FAILED (4242_2)" in text
    assert bench_main(["run", suite, "--threestudio", ts, "--out", out, "--executor", "slurm"]) == 0
    assert "1 runs submitted, 2 already queued" in capsys.readouterr().out  # only the task that died
    assert len(submitted(out)) == 2 and submitted(out)[1]["runs"] == [job["runs"][2]]


@pytest.mark.parametrize("message", [
    "sbatch: error: invalid partition specified: gpu\nsbatch: error: Batch job submission failed: Invalid partition name specified",
    "sbatch: error: resolve_ctls_from_dns_srv: res_nsearch error: Unknown host\nsbatch: fatal: Could not establish a configuration source",
])
def test_refused_submission_is_one_line_and_leaves_no_pickles(fake, tmp_path, monkeypatch, capsys, message):
    ts, out = fake
    bindir = tmp_path / "bin"
    bindir.mkdir()
    (bindir / "sbatch").write_text(f"#!/bin/sh\ncat >&2 <<'EOF'\n{message}\nEOF\nexit 1\n")
    (bindir / "srun").write_text("#!/bin/sh\nexit 1\n")
    for exe in ("sbatch", "srun"):
        (bindir / exe).chmod(0o755)
    monkeypatch.setenv("PATH", f"{bindir}{os.pathsep}{os.environ['PATH']}")
    suite = write_suite(str(tmp_path / "s.yaml"), ["a", "b"])
    assert bench_main(["run", suite, "--threestudio", ts, "--out", out, "--executor", "slurm", "--partition", "gpu"]) == 2
    err = capsys.readouterr().err
    assert err == f"rfds-bench: error: --executor slurm: the submission failed: {message.splitlines()[-1]}\n"
    left = [os.path.join(d, f) for d, _, fs in os.walk(os.path.join(out, "slurm")) for f in fs]
    assert left == [] and submitted(out) == []


def test_no_slurm_here_is_a_one_line_error(fake, tmp_path, monkeypatch, capsys):
    ts, out = fake
    monkeypatch.setenv("PATH", str(tmp_path))  # no srun
    suite = write_suite(str(tmp_path / "s.yaml"), ["a"])
    assert bench_main(["run", suite, "--threestudio", ts, "--out", out, "--executor", "slurm"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and 'Could not detect "srun"' in err and "--slurm-cluster local" in err


def test_slurm_options_are_checked(tmp_path):
    with pytest.raises(SuiteError, match="slurm time_min must be an integer >= 1, got 0"):
        SlurmOptions(time_min=0)
    with pytest.raises(SuiteError, match="cluster must be one of"):
        SlurmOptions(cluster="pbs")
    bad = write_suite(str(tmp_path / "s.yaml"), ["a"], slurm={"partiton": "gpu"})
    with pytest.raises(SuiteError, match=r"slurm: unknown keys \['partiton'\]"):
        load_suite(bad)
