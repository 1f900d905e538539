"""rfds-bench run: launch commands, ledger, resume after failure and after a crash, render collection.
threestudio's launch.py is replaced by the test double in bench_fakes.py (an external process)."""
import json
import os
import shlex
import subprocess
import sys

import pytest

from bench_fakes import calls, make_fake_threestudio, write_suite
from threestudio_rfds.bench.cli import main as bench_main
from threestudio_rfds.bench.ledger import Ledger
from threestudio_rfds.bench.command import MEMWRAP, yaml_quote
from threestudio_rfds.bench.paths import find_test_renders
from threestudio_rfds.bench.runner import run_suite
from threestudio_rfds.bench.suite import SuiteError, load_suite

TRICKY = "a cat: cute, [draft] 'quoted' #1"


@pytest.fixture
def fake(tmp_path):
    ts = make_fake_threestudio(str(tmp_path / "threestudio"))
    return ts, str(tmp_path / "out")


def test_yaml_quote_round_trips_through_omegaconf():
    from omegaconf import OmegaConf

    cfg = OmegaConf.from_cli([f"p={yaml_quote(TRICKY)}", f"q={yaml_quote('123')}"])
    assert cfg.p == TRICKY and cfg.q == "123"


def test_run_records_failures_and_resumes(fake, tmp_path):
    ts, out = fake
    suite = load_suite(write_suite(str(tmp_path / "s.yaml"), ["a hamburger", "FAIL here", TRICKY], seeds=[0, 1],
                                   overrides=["trainer.max_steps=6"]))
    counts = run_suite(suite, ts, out, log=lambda s: None)
    assert counts == {"planned": 6, "done": 4, "failed": 2, "interrupted": 0, "skipped": 0, "failed_earlier": 0,
                      "running_elsewhere": 0}
    c = calls(ts)
    assert len(c) == 6
    assert {x["cwd"] for x in c} == {os.path.abspath(ts)} and all(x["train"] and x["gpu"] == "0" for x in c)
    assert {(x["prompt"], x["prompt_type"]) for x in c} >= {(TRICKY, "str")}  # quoting survives OmegaConf
    assert {x["max_steps"] for x in c} == {6}  # suite overrides reach the launch

    state = Ledger(os.path.join(out, "ledger.jsonl")).state()
    failed = [r for r in state.values() if r["status"] == "failed"]
    assert len(failed) == 2 and all("fake launch failed for FAIL here" in r["log_tail"] for r in failed)
    assert all(r["error"] == "exit code 1: RuntimeError: fake launch failed for FAIL here" for r in failed)
    done = [r for r in state.values() if r["status"] == "done"]
    for r in done:
        assert r["step"] == 6 and r["renders"] == ["0.png", "1.png", "2.png", "3.png"]  # last it<N>-test only
        assert r["renders_dir"] == os.path.join("runs", "fake", os.path.basename(r["trial_dir"]), "save", "it6-test")
        assert r["trial_dir"].startswith("runs/fake/") and r["log"].startswith("logs/fake/")  # relative to OUT
        assert r["wall_time_s"] > 0 and r["max_rss_bytes"] > 0
        assert r["peak_mem_allocated_bytes"] is None  # the fake never touches CUDA
    with open(os.path.join(out, "suite.json")) as f:
        assert json.load(f)["prompts"] == suite.prompts

    # resume: nothing is launched again; --retry-failed relaunches only the failures
    counts = run_suite(suite, ts, out, log=lambda s: None)
    assert (counts["skipped"], counts["failed_earlier"], counts["done"]) == (4, 2, 0)
    assert len(calls(ts)) == 6
    counts = run_suite(suite, ts, out, retry_failed=True, log=lambda s: None)
    assert counts["failed"] == 2 and counts["skipped"] == 4
    assert [x["prompt"] for x in calls(ts)[6:]] == ["FAIL here", "FAIL here"]


def test_crash_mid_benchmark_resumes_without_redoing(fake, tmp_path):
    ts, out = fake
    suite = write_suite(str(tmp_path / "s.yaml"), ["first", "KILL the runner", "third"])
    open(os.path.join(ts, "kill-flag"), "w").close()
    cmd = [sys.executable, "-m", "threestudio_rfds.bench.cli", "run", suite, "--threestudio", ts, "--out", out]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert p.returncode == -9, p.stderr  # the runner was killed while the second run was going
    state = Ledger(os.path.join(out, "ledger.jsonl")).state()
    assert sorted(r["status"] for r in state.values()) == ["done", "started"]

    p = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stdout + p.stderr
    assert [x["prompt"] for x in calls(ts)] == ["first", "KILL the runner", "KILL the runner", "third"]
    state = Ledger(os.path.join(out, "ledger.jsonl")).state()
    assert sorted(r["status"] for r in state.values()) == ["done"] * 3
    assert "1 already finished" in p.stdout and "earlier attempt is gone" in p.stdout
    killed = [r["status"] for r in Ledger(os.path.join(out, "ledger.jsonl")).records() if "KILL" in r["prompt"]]
    assert killed == ["started", "interrupted", "started", "done"]  # the dead owner's attempt is closed first


def test_ctrl_c_records_interrupted_and_resumes(fake, tmp_path):
    import signal
    import time

    ts, out = fake
    suite = write_suite(str(tmp_path / "s.yaml"), ["first", "SLOW second", "third"])
    open(os.path.join(ts, "slow-flag"), "w").close()
    cmd = [sys.executable, "-m", "threestudio_rfds.bench.cli", "run", suite, "--threestudio", ts, "--out", out]
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 60
    while not os.path.exists(os.path.join(ts, "sleeping")) and time.time() < deadline:
        time.sleep(0.1)
    p.send_signal(signal.SIGINT)  # Ctrl-C reaches the runner, which stops its child
    _, err = p.communicate(timeout=60)
    assert p.returncode == 130 and "run the same command again to resume" in err
    state = Ledger(os.path.join(out, "ledger.jsonl")).state()
    assert sorted(r["status"] for r in state.values()) == ["done", "interrupted"]
    assert subprocess.run(cmd, capture_output=True, timeout=120).returncode == 0
    assert [x["prompt"] for x in calls(ts)] == ["first", "SLOW second", "SLOW second", "third"]


def test_relative_out_dir(fake, tmp_path, monkeypatch):
    ts, _ = fake
    suite = write_suite(str(tmp_path / "s.yaml"), ["a red panda"])
    monkeypatch.chdir(tmp_path)
    assert bench_main(["run", suite, "--threestudio", os.path.relpath(ts), "--out", "rel-out"]) == 0
    (rec,) = Ledger(str(tmp_path / "rel-out" / "ledger.jsonl")).state().values()
    assert rec["status"] == "done" and rec["max_rss_bytes"] > 0  # memwrap's stats landed in OUT/logs
    assert rec["renders_dir"].startswith("runs/")  # relative to the results folder


def test_dry_run_prints_commands_and_writes_nothing(fake, tmp_path, capsys):
    ts, out = fake
    suite = write_suite(str(tmp_path / "s.yaml"), ["a red panda"], seeds=[3])
    assert bench_main(["run", suite, "--threestudio", ts, "--out", out, "--dry-run", "--override", "trainer.max_steps=2"]) == 0
    text = capsys.readouterr().out
    argv = shlex.split(text.split(" && ", 1)[1])  # the printed command is valid shell
    assert argv[3:6] == [os.path.join(ts, "launch.py"), "--config", os.path.join(ts, "custom/threestudio-rfds/configs/fake.yaml")]
    assert "system.prompt_processor.prompt='a red panda'" in argv and "--train" in argv
    assert "seed=3" in argv and "use_timestamp=false" in argv and argv[-1] == "trainer.max_steps=2"
    assert not os.path.exists(out) and calls(ts) == []


def test_cli_errors(fake, tmp_path, capsys):
    ts, out = fake
    suite = write_suite(str(tmp_path / "s.yaml"), ["x"])
    assert bench_main(["run", suite, "--threestudio", str(tmp_path), "--out", out]) == 2
    assert "has no launch.py" in capsys.readouterr().err
    missing = write_suite(str(tmp_path / "m.yaml"), ["x"], configs=[{"path": "nope/none.yaml"}])
    assert bench_main(["run", missing, "--threestudio", ts, "--out", out]) == 2
    assert "config 'nope/none.yaml' not found" in capsys.readouterr().err
    assert bench_main(["run", suite, "--threestudio", ts, "--out", out, "--override", "seed=1"]) == 2
    assert "runner sets itself" in capsys.readouterr().err


def test_other_suite_in_same_out_dir_is_refused(fake, tmp_path):
    ts, out = fake
    run_suite(load_suite(write_suite(str(tmp_path / "a.yaml"), ["x"])), ts, out, log=lambda s: None)
    other = load_suite(write_suite(str(tmp_path / "b.yaml"), ["y"], name="other"))
    with pytest.raises(SuiteError, match="holds results of suite 'fake-suite'"):
        run_suite(other, ts, out, log=lambda s: None)


def test_find_test_renders_orders_views_numerically(tmp_path):
    d = tmp_path / "save" / "it100-test"
    d.mkdir(parents=True)
    (tmp_path / "save" / "it20-test").mkdir()
    for i in (10, 2, 1):
        (d / f"{i}.png").write_bytes(b"")
    r = find_test_renders(str(tmp_path))
    assert r["step"] == 100 and r["renders"] == ["1.png", "2.png", "10.png"]
    assert find_test_renders(str(tmp_path / "none"))["renders"] == []


def test_ledger_survives_a_torn_line(tmp_path):
    led = Ledger(str(tmp_path / "l.jsonl"))
    led.append("a", "done")
    with open(led.path, "a") as f:
        f.write('{"run_id": "b", "stat')  # a crash mid-write
    led.append("c", "failed", error="x")
    assert {k: v["status"] for k, v in led.state().items()} == {"a": "done", "c": "failed"}


def test_memwrap_reports_exit_code_and_memory(tmp_path):
    script = tmp_path / "launch.py"
    script.write_text("import sys, helper\nsys.exit(int(sys.argv[1]))\n")
    (tmp_path / "helper.py").write_text("")  # importable only if the launch's folder is on sys.path
    stats = tmp_path / "stats.json"
    p = subprocess.run([sys.executable, MEMWRAP, str(stats), str(script), "7"], cwd=str(tmp_path / ".."))
    assert p.returncode == 7
    s = json.loads(stats.read_text())
    assert s["exit_code"] == 7 and s["max_rss_bytes"] > 1e6 and s["cuda_max_memory_allocated"] is None


def test_progress_reads_only_threestudio_training_bar(tmp_path):
    """A real launch log (rfds-sd3-low-memory, 2 steps, CPU shim of tests/cpu_launch, tests/data/): before
    training it holds transformers' "Loading weights ... 53/53" bars, after it Lightning's test bar; only
    threestudio's "Epoch 0: ... k/2" training bar is progress."""
    from threestudio_rfds.bench.logs import progress

    real = os.path.join(os.path.dirname(__file__), "data", "threestudio_launch_cpu.log")
    with open(real, encoding="utf-8") as f:
        text = f.read()
    cut = str(tmp_path / "cut.log")

    def upto(marker: str, nth: int = 1):
        i = -1
        for _ in range(nth):
            i = text.index(marker, i + 1)
        end = min(j for j in (text.find("\r", i), text.find("\n", i), len(text)) if j >= 0)
        with open(cut, "w", encoding="utf-8") as f:
            f.write(text[:end])
        return progress(cut)

    assert "Loading weights: 100%|██████████| 53/53 [" in text  # the bar the old parser took for training
    assert upto("Loading weights: 100%", 2) is None  # loading the models: not started training
    assert upto("Epoch 0:  50%") == (1, 2)
    assert upto("Testing DataLoader 0:  50%") == (2, 2)  # training is done: the test bar is not training
    assert progress(real) == (2, 2)
