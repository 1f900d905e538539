"""rfds-bench at scale on the CPU: one launch per (fake) GPU, runners killed or signalled mid-run and
resumed, two runners sharing a results folder, the ledger under concurrent writers, owner liveness,
timeouts and one-line errors.  threestudio's launch.py is the test double of bench_fakes.py; with
$FAKE_STEP_S it sleeps per step and prints a progress bar, and records every launch's pid and the
pids of any live earlier launch of the same run ("live_twins", which must stay empty)."""
import json
import multiprocessing
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from bench_fakes import calls, make_fake_threestudio, write_suite
from threestudio_rfds.bench.cli import main as bench_main
from threestudio_rfds.bench.ledger import Ledger
from threestudio_rfds.bench.owner import Heartbeat, Owner, me, owner_alive
from threestudio_rfds.bench.runner import run_suite
from threestudio_rfds.bench.suite import SuiteError, load_suite, parse_suite

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def fake(tmp_path):
    return make_fake_threestudio(str(tmp_path / "threestudio")), str(tmp_path / "out")


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _wait_for(cond, timeout=60.0):
    deadline = time.time() + timeout
    while not cond():
        assert time.time() < deadline, "timed out waiting"
        time.sleep(0.05)


def _attempts(out):
    by = {}
    for r in Ledger(os.path.join(out, "ledger.jsonl")).records():
        by.setdefault(r["run_id"], []).append(r["status"])
    return by


def test_fanout_runs_one_launch_per_gpu(fake, tmp_path, monkeypatch):
    ts, out = fake
    monkeypatch.setenv("FAKE_STEP_S", "0.1")
    suite = load_suite(write_suite(str(tmp_path / "s.yaml"), [f"prompt {i}" for i in range(5)],
                                   overrides=["trainer.max_steps=4"]))
    lines = []
    counts = run_suite(suite, ts, out, gpus="0,1,2", progress_every=0.2, log=lines.append)
    assert (counts["done"], counts["failed"]) == (5, 0)
    c = calls(ts)
    assert {x["cuda_visible_devices"] for x in c} <= {"0", "1", "2"} and {x["gpu"] for x in c} == {"0"}
    done = [r for r in Ledger(os.path.join(out, "ledger.jsonl")).records() if r["status"] == "done"]
    for gpu in ("gpu0", "gpu1", "gpu2"):  # one launch at a time per GPU
        spans = sorted((r["start_time"], r["end_time"]) for r in done if r["gpu"] == gpu)
        assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:]))
    assert len({r["gpu"] for r in done}) == 3
    text = "\n".join(lines)
    assert "progress: " in text and "ETA" in text and "step " in text  # overall and per-run progress


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
def test_runner_killed_during_fanout_then_resumed(fake, tmp_path, sig):
    """Nothing lost, nothing run twice at once: the children die with the runner, the resume reruns
    exactly the runs that were cut off, once each."""
    ts, out = fake
    suite = write_suite(str(tmp_path / "s.yaml"), ["one", "two", "three", "four"], overrides=["trainer.max_steps=40"])
    cmd = [sys.executable, "-m", "threestudio_rfds.bench.cli", "run", suite, "--threestudio", ts, "--out", out,
           "--gpus", "0,1"]
    env = dict(os.environ, FAKE_STEP_S="0.1")
    p = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _wait_for(lambda: len(calls(ts)) >= 2)
    time.sleep(0.5)
    p.send_signal(sig)
    _, err = p.communicate(timeout=60)
    assert p.returncode == (-9 if sig == signal.SIGKILL else 128 + sig)
    children = [x["pid"] for x in calls(ts)]
    _wait_for(lambda: not any(_alive(pid) for pid in children), timeout=10)  # died with their runner
    cut = {rid: s for rid, s in _attempts(out).items()}
    assert len(cut) == 2 and all(s[-1] == ("started" if sig == signal.SIGKILL else "interrupted") for s in cut.values())
    if sig == signal.SIGTERM:
        assert "stopped by SIGTERM" in err

    p = subprocess.run(cmd, env=dict(env, FAKE_STEP_S="0.01"), capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stdout + p.stderr
    c = calls(ts)
    assert all(x["live_twins"] == [] for x in c)
    assert sorted(x["prompt"] for x in c) == sorted(["one", "two"] * 2 + ["three", "four"])
    for rid, statuses in _attempts(out).items():
        assert statuses[-1] == "done"
        assert all(not (a == b == "started") for a, b in zip(statuses, statuses[1:]))  # never two owners at once
        assert statuses.count("started") == (2 if rid in cut else 1)
    state = Ledger(os.path.join(out, "ledger.jsonl")).state()
    for rid in cut:  # the rerun went to a new attempt folder; the cut attempt's folder is kept with its record
        assert state[rid]["attempt"] == 2 and state[rid]["trial_dir"].endswith("-a2")
        first = os.path.join(out, state[rid]["trial_dir"][:-len("-a2")], "rfds-bench.json")
        with open(first) as f:
            assert json.load(f)["status"] == "interrupted"


def test_second_signal_skips_the_grace_period(fake, tmp_path):
    ts, out = fake
    suite = write_suite(str(tmp_path / "s.yaml"), ["STUBBORN one"])
    cmd = [sys.executable, "-m", "threestudio_rfds.bench.cli", "run", suite, "--threestudio", ts, "--out", out]
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _wait_for(lambda: os.path.exists(os.path.join(ts, "sleeping")))
    p.send_signal(signal.SIGTERM)  # the child ignores the SIGINT it is sent: the runner would wait 10 s
    time.sleep(0.5)
    t0 = time.time()
    p.send_signal(signal.SIGTERM)
    p.communicate(timeout=30)
    assert p.returncode == 128 + signal.SIGTERM and time.time() - t0 < 5
    assert not _alive(calls(ts)[0]["pid"])
    (rec,) = Ledger(os.path.join(out, "ledger.jsonl")).state().values()
    assert rec["status"] == "interrupted" and rec["reason"] == "SIGTERM"


def test_two_runners_share_a_results_folder(fake, tmp_path):
    ts, out = fake
    suite = write_suite(str(tmp_path / "s.yaml"), [f"p{i}" for i in range(6)], overrides=["trainer.max_steps=5"])
    cmd = [sys.executable, "-m", "threestudio_rfds.bench.cli", "run", suite, "--threestudio", ts, "--out", out,
           "--gpus", "0,1"]
    env = dict(os.environ, FAKE_STEP_S="0.05")
    procs = [subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=120)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    assert sorted(x["prompt"] for x in calls(ts)) == [f"p{i}" for i in range(6)]  # each run launched once
    assert all(s == ["started", "done"] for s in _attempts(out).values())


def _append_many(path, worker, n):
    led = Ledger(path)
    for i in range(n):
        led.append(f"w{worker}/r{i}", "done", payload="x" * 300)


def test_ledger_concurrent_writers_and_corrupt_lines(tmp_path):
    path = str(tmp_path / "ledger.jsonl")
    ctx = multiprocessing.get_context("fork")
    ps = [ctx.Process(target=_append_many, args=(path, w, 150)) for w in range(4)]
    for p in ps:
        p.start()
    for p in ps:
        p.join()
    warnings = []
    led = Ledger(path, warn=warnings.append)
    assert len(led.state()) == 600 and not warnings
    with open(path, "ab") as f:
        f.write(b'{"run_id": "bad", "status": "done", "x": "\xff"}\n')  # not UTF-8
        f.write(b"[1, 2]\n")
    led.append("after", "failed")
    assert set(led.state()) >= {"after", "w0/r0"} and "bad" not in led.state()
    assert len(warnings) == 2 and "line 601" in warnings[0] and "line 602" in warnings[1]
    led.state()
    assert len(warnings) == 2  # each bad line reported once


def test_owner_liveness(tmp_path):
    out = str(tmp_path)
    probe = Heartbeat(out, me())
    assert owner_alive(out, me(), probe)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    host = socket.gethostname()
    assert not owner_alive(out, Owner(host, dead.pid, None), probe)
    assert not owner_alive(out, Owner(host, os.getpid(), 1), probe)  # pid reused by another process
    assert not owner_alive(out, None, probe)  # a record from before owners were recorded
    other = Owner("node-b", 4242, 7, job="77_3")
    assert not owner_alive(out, other, probe)  # never beat
    Heartbeat(out, other).beat()
    assert owner_alive(out, other, probe, stale_after=60)
    old = time.time() - 120
    os.utime(os.path.join(out, "owners", other.session + ".hb"), (old, old))
    assert not owner_alive(out, other, probe, stale_after=60)
    Heartbeat(out, other).beat(force=True)
    requeued = Heartbeat(out, Owner(host, os.getpid(), 1, job="77_3"))  # the same array task, requeued
    assert not owner_alive(out, other, requeued)
    unwritable = Heartbeat(str(tmp_path / "no" / "such"), me())  # status of a read-only copy: local clock
    unwritable.dir = unwritable.path = "/proc/no-such-dir/x.hb"
    assert owner_alive(out, other, unwritable)


def test_timeout_stops_the_run(fake, tmp_path, monkeypatch):
    ts, out = fake
    monkeypatch.setenv("FAKE_STEP_S", "0.2")
    suite = load_suite(write_suite(str(tmp_path / "s.yaml"), ["slowpoke"], overrides=["trainer.max_steps=100"]))
    t0 = time.time()
    counts = run_suite(suite, ts, out, timeout=1.0, grace=2.0, log=lambda s: None)
    assert counts["failed"] == 1 and time.time() - t0 < 15
    (rec,) = Ledger(os.path.join(out, "ledger.jsonl")).state().values()
    assert rec["error"] == "timed out after 1.0s" and rec["returncode"] != 0


def test_rerun_lists_earlier_failures_and_exits_1(fake, tmp_path, capsys):
    ts, out = fake
    suite = write_suite(str(tmp_path / "s.yaml"), ["fine", "FAIL hard"])
    assert bench_main(["run", suite, "--threestudio", ts, "--out", out]) == 1
    capsys.readouterr()
    assert bench_main(["run", suite, "--threestudio", ts, "--out", out]) == 1
    text = capsys.readouterr().out
    assert "1 already finished, 1 failed earlier" in text
    assert "exit code 1: RuntimeError: fake launch failed for FAIL hard" in text


@pytest.mark.parametrize("argv, match", [
    (["run", "S", "--threestudio", "T", "--timeout", "-1"], "--timeout: must be seconds > 0, got '-1'"),
    (["run", "S", "--threestudio", "T", "--timeout", "nan"], "--timeout: must be seconds > 0"),
    (["run", "S", "--threestudio", "T", "--gpu", "1", "--gpus", "0,1"], "not allowed with argument"),
    (["score", "R", "--max-views", "0"], "--max-views: must be a view count >= 1, got '0'"),
    (["score", "R", "--batch-size", "x"], "--batch-size: must be a batch size >= 1, got 'x'"),
    (["run", "S", "--threestudio", "T", "--sbatch", "qos"], "must be KEY=VALUE"),
    (["run", "S", "--threestudio", "T", "--gpus", "0,0"], "--gpus: must be 'all' or distinct non-negative GPU indices"),
])
def test_usage_errors_exit_2(argv, match, capsys):
    with pytest.raises(SystemExit) as e:
        bench_main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and match in err and err.count("\n") == 1, err


def test_bad_values_are_one_line_errors(fake, tmp_path, capsys, monkeypatch):
    ts, out = fake
    suite = write_suite(str(tmp_path / "s.yaml"), ["x"])
    assert bench_main(["run", suite, "--threestudio", ts, "--out", out, "--gpus", "0", "--executor", "slurm"]) == 2
    assert "--gpus 0 is for --executor local" in capsys.readouterr().err
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.setenv("PATH", str(tmp_path))  # no nvidia-smi
    assert bench_main(["run", suite, "--threestudio", ts, "--out", out, "--gpus", "all"]) == 2
    assert "--gpus all found no GPU" in capsys.readouterr().err

    import threestudio_rfds.bench.score as score

    def no_clip(*a, **k):
        raise AssertionError("CLIP loaded before the results folder was checked")

    monkeypatch.setattr(score, "ClipScorer", no_clip)
    assert bench_main(["score", str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "results folder" in err and "does not exist" in err


def test_offline_default_clip_is_one_line(fake, tmp_path, capsys, monkeypatch):
    ts, out = fake
    run_suite(load_suite(write_suite(str(tmp_path / "s.yaml"), ["x"])), ts, out, log=lambda s: None)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants as c

    import threestudio_rfds.bench.score as score

    monkeypatch.setattr(c, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(score, "DEFAULT_CLIP", "rfds-test/clip-never-cached")  # the default, but surely not cached
    assert bench_main(["score", out, "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "cannot load CLIP model 'rfds-test/clip-never-cached'" in err
    assert "Traceback" not in err


def test_prompts_are_normalised_before_duplicate_checks():
    good = {"name": "s", "configs": ["a.yaml"]}
    assert parse_suite({**good, "prompts": ["  a   red\tpanda  "]}).prompts == ["a red panda"]
    with pytest.raises(SuiteError, match="duplicate prompts"):
        parse_suite({**good, "prompts": ["a cat", " a  cat "]})


def test_suite_paths_and_encoding(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # outside the repository
    assert load_suite("configs/default.yaml").name == "default"  # the repository's configs/
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "default.yaml").write_text(
        "name: mine\nconfigs: [a.yaml]\nprompts: [x]\n")
    assert load_suite("configs/default.yaml").name == "mine"  # the current folder first
    with pytest.raises(SuiteError, match="suite file 'nope/x.yaml' not found"):
        load_suite("nope/x.yaml")
    (tmp_path / "latin1.yaml").write_bytes(b"name: s\nconfigs: [a.yaml]\nprompts: [caf\xe9]\n")
    assert bench_main(["validate", str(tmp_path / "latin1.yaml")]) == 2
    err = capsys.readouterr().err
    assert "not UTF-8 text (byte 0xe9 on line 3)" in err and err.count("\n") == 1


def test_child_stopped_from_outside_is_interrupted_not_failed(fake, tmp_path):
    """SLURM's SIGTERM at preemption reaches the launch directly: that run is rerun later, not kept failed."""
    import threading

    ts, out = fake
    suite = load_suite(write_suite(str(tmp_path / "s.yaml"), ["SLOW one", "two"]))
    open(os.path.join(ts, "slow-flag"), "w").close()

    def term_child():
        _wait_for(lambda: os.path.exists(os.path.join(ts, "sleeping")))
        os.kill(calls(ts)[0]["pid"], signal.SIGTERM)

    t = threading.Thread(target=term_child)
    t.start()
    counts = run_suite(suite, ts, out, log=lambda s: None)
    t.join()
    assert (counts["interrupted"], counts["done"], counts["failed"]) == (1, 1, 0)
    (cut,) = [r for r in Ledger(os.path.join(out, "ledger.jsonl")).state().values() if r["prompt"] == "SLOW one"]
    assert cut["status"] == "interrupted" and cut["reason"] == "stopped by SIGTERM from outside the runner"
    assert run_suite(suite, ts, out, log=lambda s: None)["done"] == 1  # rerun once
