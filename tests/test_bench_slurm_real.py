"""``rfds-bench run --executor slurm`` against a real SLURM: a one-node cluster on this machine
(``eval "$(.ci/slurm.sh start)"``; slurmctld + slurmd 22.05, jobs as root, no accounting database).

A job array of a tiny suite, ``scontrol requeue`` of a running task, ``scancel``, a resubmission while
SLURM still holds tasks, and ``rfds-bench status`` showing SLURM's states; threestudio's launch.py is the
test double of bench_fakes.py, except in the one real tiny launch.py run (THREESTUDIO_ROOT).  Without a
cluster these skip with the reason; with ``RFDS_REQUIRE_SLURM=1`` (CI) they fail instead."""
import json
import os
import shutil
import subprocess
import sys
import time

import pytest

from bench_fakes import calls, make_fake_threestudio, write_suite
from threestudio_rfds.bench.cli import main as bench_main
from threestudio_rfds.bench.ledger import Ledger
from threestudio_rfds.bench.slurm import submitted

pytestmark = pytest.mark.slurm
pytest.importorskip("submitit")


def _no_cluster() -> str:
    if not shutil.which("sbatch"):
        return "no sbatch on PATH (apt-get install slurm-wlm munge; eval \"$(.ci/slurm.sh start)\")"
    try:
        p = subprocess.run(["sinfo", "-h", "-o", "%a|%t"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError) as e:
        return f"sinfo did not answer: {e}"
    if p.returncode != 0 or not any(s.startswith("up|") and s.split("|")[1].rstrip("*") in ("idle", "mix", "alloc")
                                    for s in p.stdout.split()):
        said = (p.stdout + p.stderr).strip().splitlines()
        return f"no usable SLURM node (sinfo: {said[0][:160] if said else p.returncode}); start one with " \
               "eval \"$(.ci/slurm.sh start)\""
    return ""


@pytest.fixture(scope="module")
def cluster():
    why = _no_cluster()
    if why and os.environ.get("RFDS_REQUIRE_SLURM") == "1":
        pytest.fail(f"RFDS_REQUIRE_SLURM=1 but {why}")
    if why:
        pytest.skip(why)


@pytest.fixture
def fake(tmp_path, cluster, monkeypatch):
    monkeypatch.setenv("FAKE_STEP_S", "0.2")  # sbatch exports the submitter's environment to the tasks
    return make_fake_threestudio(str(tmp_path / "threestudio")), str(tmp_path / "out")


def _wait_for(cond, timeout=120.0, what="a condition"):
    deadline = time.time() + timeout
    while not cond():
        assert time.time() < deadline, f"timed out after {timeout:.0f} s waiting for {what}"
        time.sleep(0.2)


def _statuses(out):
    by = {}
    for r in Ledger(os.path.join(out, "ledger.jsonl")).records():
        by.setdefault(r["prompt"], []).append(r["status"])
    return by


def _final(out, n):
    state = Ledger(os.path.join(out, "ledger.jsonl")).state() if os.path.exists(os.path.join(out, "ledger.jsonl")) else {}
    return len(state) == n and all(r["status"] in ("done", "failed", "interrupted") for r in state.values())


def _submit(ts, out, suite, *extra):
    return bench_main(["run", suite, "--threestudio", ts, "--out", out, "--executor", "slurm", "--gpus-per-task", "0",
                       "--cpus-per-task", "1", "--time", "10", *extra])


def _squeue_gone(job):
    p = subprocess.run(["squeue", "-h", "-j", job], capture_output=True, text=True)
    return p.returncode != 0 or not p.stdout.strip()


def test_array_resubmission_and_status_show_slurm_states(fake, tmp_path, capsys):
    """One task at a time (--array-parallelism 1): while the first runs, status shows SLURM's RUNNING and
    PENDING tasks and a resubmission submits nothing; every run then ends once, its failure recorded."""
    ts, out = fake
    suite = write_suite(str(tmp_path / "s.yaml"), ["a cat", "FAIL now", "a dog"], overrides=["trainer.max_steps=15"])
    assert _submit(ts, out, suite, "--array-parallelism", "1") == 0
    assert "3 runs submitted" in capsys.readouterr().out
    (job,) = submitted(out)
    assert job["cluster"] == "slurm" and len(job["runs"]) == 3
    _wait_for(lambda: len(calls(ts)) == 1, what="the first task's launch")

    assert bench_main(["status", out]) == 0
    text = capsys.readouterr().out
    assert "1 running, 2 queued (of 3)" in text, text
    assert f"SLURM: RUNNING ({job['job_id']}_0)" in text and f"SLURM: PENDING ({job['job_id']}_1)" in text, text

    assert _submit(ts, out, suite) == 0  # SLURM holds the other two: not submitted again
    assert "0 runs submitted, 2 already queued" in capsys.readouterr().out and len(submitted(out)) == 1

    _wait_for(lambda: _final(out, 3), what="the array")
    assert _statuses(out) == {"a cat": ["started", "done"], "FAIL now": ["started", "failed"],
                              "a dog": ["started", "done"]}
    assert len(calls(ts)) == 3 and all(c["live_twins"] == [] for c in calls(ts))
    _wait_for(lambda: _squeue_gone(job["job_id"]), what="the array to leave the queue")
    assert bench_main(["status", out]) == 0
    text = capsys.readouterr().out
    assert "2 done, 1 failed (of 3)" in text and "fake launch failed for FAIL now; SLURM: ENDED" in text, text


def test_requeue_of_a_running_task_then_exactly_once(fake, tmp_path, capsys):
    """``scontrol requeue`` SIGTERMs the running task (recorded interrupted, its folder kept); SLURM starts it
    again and the requeued task runs the run once more, in a new attempt folder, to one ``done``."""
    ts, out = fake
    suite = write_suite(str(tmp_path / "s.yaml"), ["a slow cat"], overrides=["trainer.max_steps=20"])
    assert _submit(ts, out, suite) == 0
    (job,) = submitted(out)
    _wait_for(lambda: len(calls(ts)) == 1, what="the launch")
    time.sleep(1.0)
    subprocess.run(["scontrol", "requeue", job["job_id"]], check=True, capture_output=True)
    _wait_for(lambda: _statuses(out).get("a slow cat", [])[-1:] == ["done"], timeout=180, what="the requeued run")
    assert _statuses(out) == {"a slow cat": ["started", "interrupted", "started", "done"]}
    recs = list(Ledger(os.path.join(out, "ledger.jsonl")).records())
    assert "SIGTERM" in recs[1]["reason"] and recs[0]["owner"]["job"] == recs[2]["owner"]["job"] == job["job_id"]
    assert [r["attempt"] for r in recs] == [1, 1, 2, 2]
    with open(os.path.join(out, recs[1]["trial_dir"], "rfds-bench.json")) as f:
        assert json.load(f)["status"] == "interrupted"  # the cut attempt's folder is kept, with its record
    assert len(calls(ts)) == 2 and all(c["live_twins"] == [] for c in calls(ts))


def test_scancel_is_recorded_interrupted_and_rerun_by_the_next_submission(fake, tmp_path, capsys, monkeypatch):
    ts, out = fake
    suite = write_suite(str(tmp_path / "s.yaml"), ["a slow dog"], overrides=["trainer.max_steps=50"])
    assert _submit(ts, out, suite) == 0
    (job,) = submitted(out)
    _wait_for(lambda: len(calls(ts)) == 1, what="the launch")
    subprocess.run(["scancel", job["job_id"]], check=True, capture_output=True)
    _wait_for(lambda: _final(out, 1), what="the cancelled run's record")
    (rec,) = Ledger(os.path.join(out, "ledger.jsonl")).state().values()
    assert rec["status"] == "interrupted" and "SIGTERM" in rec["reason"], rec
    _wait_for(lambda: _squeue_gone(job["job_id"]), what="the cancelled job to leave the queue")
    capsys.readouterr()
    assert bench_main(["status", out]) == 0
    text = capsys.readouterr().out
    assert "1 interrupted (of 1)" in text and f"SLURM: ENDED ({job['job_id']}" in text, text
    monkeypatch.setenv("FAKE_STEP_S", "0.01")
    assert _submit(ts, out, suite, "--wait") == 0  # --wait polls squeue (no accounting here)
    assert _statuses(out) == {"a slow dog": ["started", "interrupted", "started", "done"]}


def test_refused_submission_is_sbatchs_own_line(fake, tmp_path, capsys):
    ts, out = fake
    suite = write_suite(str(tmp_path / "s.yaml"), ["a cat", "a dog"])
    assert _submit(ts, out, suite, "--partition", "no-such-partition") == 2
    err = capsys.readouterr().err
    assert err == ("rfds-bench: error: --executor slurm: the submission failed: "
                   "sbatch: error: Batch job submission failed: Invalid partition name specified\n"), err
    assert [f for _, _, fs in os.walk(os.path.join(out, "slurm")) for f in fs] == [] and calls(ts) == []


@pytest.mark.threestudio
def test_a_real_launch_through_slurm(tmp_path, cluster, tiny_sd3_path):
    """threestudio's own launch.py (tests/cpu_launch's shim on PYTHONPATH, tiny SD3) as a SLURM array task."""
    from omegaconf import OmegaConf

    from ts_launch import cpu_env, cpu_overrides, make_launch_dir
    from ts_support import CONFIG_DIR, threestudio_or_skip

    threestudio_or_skip()
    launch_dir = make_launch_dir(os.environ["THREESTUDIO_ROOT"], str(tmp_path / "threestudio"))
    name = "rfds-sd3-low-memory.yaml"
    overrides = cpu_overrides(OmegaConf.load(os.path.join(CONFIG_DIR, name)), tiny_sd3_path, max_steps=2, every=2)
    suite = write_suite(str(tmp_path / "s.yaml"), ["a red rotary telephone"],
                        configs=[{"path": f"custom/threestudio-rfds/configs/{name}", "label": "lm"}],
                        overrides=overrides + ["system.prompt_processor.spawn=false"])
    out = str(tmp_path / "out")
    p = subprocess.run([sys.executable, "-m", "threestudio_rfds.bench.cli", "run", suite, "--threestudio", launch_dir,
                        "--out", out, "--executor", "slurm", "--gpus-per-task", "0", "--time", "10", "--wait"],
                       env=cpu_env(), capture_output=True, text=True, timeout=600, stdin=subprocess.DEVNULL)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    (rec,) = Ledger(os.path.join(out, "ledger.jsonl")).state().values()
    assert rec["status"] == "done" and rec["n_renders"] == 2 and rec["owner"]["job"], rec
    with open(os.path.join(out, rec["log"]), encoding="utf-8", errors="replace") as f:
        assert "Epoch 0: 100%" in f.read()
