"""rfds-bench's results folder: each trial folder holds its run's record and is the truth, the ledger is an
index rebuilt from the folders, finished trial folders are never deleted, a changed suite is refused, and
bad input (GPU ids, overrides, prompts, corrupt files) is one line before anything runs.  threestudio's
launch.py is the test double of bench_fakes.py (an external process)."""
import json
import os
import shutil

import pytest

from bench_fakes import calls, make_fake_threestudio, write_suite
from threestudio_rfds.bench.cli import main as bench_main
from threestudio_rfds.bench.ledger import Ledger


@pytest.fixture
def fake(tmp_path):
    return make_fake_threestudio(str(tmp_path / "threestudio")), str(tmp_path / "out")


def _run(ts, out, suite, *extra):
    return bench_main(["run", suite, "--threestudio", ts, "--out", out, *extra])


def _trial_dirs(out):
    runs = os.path.join(out, "runs")
    return sorted(os.path.join(runs, label, tag) for label in os.listdir(runs) for tag in os.listdir(os.path.join(runs, label)))


def _one_line_error(capsys, *parts):
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("rfds-bench: error: "), err
    for p in parts:
        assert p in err, err
    return err


@pytest.mark.parametrize("damage", ["truncate", "delete"])
def test_lost_ledger_loses_no_finished_run(fake, tmp_path, capsys, damage):
    """The data-loss case: with ledger.jsonl emptied or deleted, the next run used to delete every finished
    trial folder and rerun it.  Now the ledger is rebuilt from the folders' records, with a warning."""
    ts, out = fake
    suite = write_suite(str(tmp_path / "s.yaml"), ["a cat", "a dog"])
    assert _run(ts, out, suite) == 0
    trials = _trial_dirs(out)
    assert len(trials) == 2
    for t in trials:
        with open(os.path.join(t, "mine.txt"), "w") as f:
            f.write("a file the user put here")
    ledger = os.path.join(out, "ledger.jsonl")
    if damage == "truncate":
        open(ledger, "w").close()
    else:
        os.remove(ledger)
    capsys.readouterr()

    assert bench_main(["status", out]) == 0
    res = capsys.readouterr()
    assert "fake-suite: 2 done (of 2)" in res.out
    assert "rebuilt" in res.err and "2 trial folder(s)" in res.err  # said, not silent
    assert _run(ts, out, suite) == 0
    assert "2 already finished" in capsys.readouterr().out
    assert len(calls(ts)) == 2  # nothing ran again
    assert _trial_dirs(out) == trials and all(os.path.exists(os.path.join(t, "mine.txt")) for t in trials)
    assert sorted(r["status"] for r in Ledger(ledger).state().values()) == ["done", "done"]


def test_each_trial_folder_records_its_outcome(fake, tmp_path):
    ts, out = fake
    suite = write_suite(str(tmp_path / "s.yaml"), ["a cat", "FAIL now"], overrides=["trainer.max_steps=4"])
    assert _run(ts, out, suite) == 1
    state = Ledger(os.path.join(out, "ledger.jsonl")).state()
    for rid, rec in state.items():
        with open(os.path.join(out, rec["trial_dir"], "rfds-bench.json")) as f:
            own = json.load(f)
        assert own == rec  # the ledger's record is the folder's record
        assert own["definition"]["overrides"] == ["trainer.max_steps=4"] and len(own["digest"]) == 16
        assert own["definition"]["prompt"] == own["prompt"] and own["attempt"] == 1
    done = [r for r in state.values() if r["status"] == "done"][0]
    assert done["renders"] == ["0.png", "1.png", "2.png", "3.png"] and done["step"] == 4  # the score inputs


def test_status_rebuild_rewrites_the_ledger_from_the_folders(fake, tmp_path, capsys):
    ts, out = fake
    suite = write_suite(str(tmp_path / "s.yaml"), ["a cat", "FAIL now"])
    assert _run(ts, out, suite) == 1
    ledger = os.path.join(out, "ledger.jsonl")
    before = Ledger(ledger).state()
    with open(ledger, "wb") as f:
        f.write(b"\x00garbage\xff\n")  # not a ledger at all
    capsys.readouterr()
    assert bench_main(["status", out]) == 2
    _one_line_error(capsys, ledger, "rfds-bench status", "--rebuild")
    assert bench_main(["status", out, "--rebuild"]) == 0
    res = capsys.readouterr()
    assert "rebuilt" in res.out and "2 trial folder(s)" in res.out and "1 done, 1 failed (of 2)" in res.out
    assert Ledger(ledger).state() == before
    (old,) = [f for f in os.listdir(out) if f.startswith("ledger.jsonl.old-")]  # the damaged file is kept
    with open(os.path.join(out, old), "rb") as f:
        assert f.read() == b"\x00garbage\xff\n"


def test_ledger_that_is_a_directory(fake, tmp_path, capsys):
    ts, out = fake
    suite = write_suite(str(tmp_path / "s.yaml"), ["a cat"])
    assert _run(ts, out, suite) == 0
    ledger = os.path.join(out, "ledger.jsonl")
    os.remove(ledger)
    os.mkdir(ledger)
    capsys.readouterr()
    for argv in (["status", out], ["report", out], ["run", suite, "--threestudio", ts, "--out", out]):
        assert bench_main(argv) == 2
        _one_line_error(capsys, f"{ledger} is a directory", "--rebuild")
    assert bench_main(["status", out, "--rebuild"]) == 0
    assert "1 done (of 1)" in capsys.readouterr().out and os.path.isfile(ledger)


def test_corrupt_suite_json_is_one_line(fake, tmp_path, capsys):
    ts, out = fake
    suite = write_suite(str(tmp_path / "s.yaml"), ["a cat"])
    assert _run(ts, out, suite) == 0
    path = os.path.join(out, "suite.json")
    with open(path, "w") as f:
        f.write('{"name": "fake-suite", "prom')
    capsys.readouterr()
    for argv in (["status", out], ["report", out], ["score", out], ["run", suite, "--threestudio", ts, "--out", out]):
        assert bench_main(argv) == 2
        _one_line_error(capsys, f"{path} is not valid JSON", "restore it")


def test_retry_goes_to_a_new_attempt_folder(fake, tmp_path, capsys):
    ts, out = fake
    suite = write_suite(str(tmp_path / "s.yaml"), ["FAIL now"])
    assert _run(ts, out, suite) == 1
    (first,) = _trial_dirs(out)
    with open(os.path.join(first, "rfds-bench.json")) as f:
        assert json.load(f)["status"] == "failed"
    assert _run(ts, out, suite, "--retry-failed") == 1
    first_again, second = _trial_dirs(out)
    assert first_again == first and second == first + "-a2"  # the first attempt is kept as it was
    with open(os.path.join(first, "rfds-bench.json")) as f:
        assert json.load(f)["attempt"] == 1
    with open(os.path.join(second, "rfds-bench.json")) as f:
        rec = json.load(f)
    assert rec["attempt"] == 2 and rec["status"] == "failed" and rec["log"].endswith("-a2.log")


def test_missing_trial_folder_of_a_done_run_is_reported_and_rerun(fake, tmp_path, capsys):
    ts, out = fake
    suite = write_suite(str(tmp_path / "s.yaml"), ["a cat", "a dog"])
    assert _run(ts, out, suite) == 0
    gone = _trial_dirs(out)[0]
    shutil.rmtree(gone)
    capsys.readouterr()
    assert bench_main(["status", out]) == 0
    text = capsys.readouterr().out
    assert "1 done, 1 missing (of 2)" in text and "trial folder" in text
    assert _run(ts, out, suite) == 0
    res = capsys.readouterr()
    assert "1 done" in res.out and "1 already finished" in res.out and "missing" in res.out
    assert len(calls(ts)) == 3 and os.path.isdir(gone + "-a2")


@pytest.mark.parametrize("edit, named", [
    ({"overrides": ["trainer.max_steps=8"]}, "overrides ['trainer.max_steps=6'] → ['trainer.max_steps=8']"),
    ({"prompts": ["a cat", "a dog", "a cow"]}, "prompts added: ['a cow']"),
    ({"seeds": [0, 1]}, "seeds [0] → [0, 1]"),
])
def test_changed_suite_under_the_same_name_is_refused(fake, tmp_path, capsys, edit, named):
    ts, out = fake
    base = {"prompts": ["a cat", "a dog"], "overrides": ["trainer.max_steps=6"]}
    suite = write_suite(str(tmp_path / "s.yaml"), base["prompts"], overrides=base["overrides"])
    assert _run(ts, out, suite) == 0
    with open(os.path.join(out, "suite.json")) as f:
        before = f.read()
    changed = write_suite(str(tmp_path / "s.yaml"), **{**base, **edit})
    capsys.readouterr()
    assert _run(ts, out, changed) == 2
    _one_line_error(capsys, named, "--new-revision")
    with open(os.path.join(out, "suite.json")) as f:
        assert f.read() == before  # never rewritten to what the finished runs did not use
    assert len(calls(ts)) == 2

    assert _run(ts, out, changed, "--new-revision") == 0
    with open(os.path.join(out, "suite.json")) as f:
        now = json.load(f)
    assert now["revision"] == 2 and now["prompts"] == edit.get("prompts", base["prompts"])
    with open(os.path.join(out, "suite.r1.json")) as f:
        assert f.read() == before  # the revision the first runs used
    rerun = 2 if "overrides" in edit else 0  # runs whose settings did not change are kept
    added = 1 if "prompts" in edit else (2 if "seeds" in edit else 0)
    assert len(calls(ts)) == 2 + rerun + added


def test_changed_command_line_override_is_refused(fake, tmp_path, capsys):
    ts, out = fake
    suite = write_suite(str(tmp_path / "s.yaml"), ["a cat"])
    assert _run(ts, out, suite, "--override", "trainer.max_steps=4") == 0
    capsys.readouterr()
    assert _run(ts, out, suite) == 2
    _one_line_error(capsys, "--override ['trainer.max_steps=4'] → []", "--new-revision")


def test_changed_config_file_is_refused(fake, tmp_path, capsys):
    ts, out = fake
    suite = write_suite(str(tmp_path / "s.yaml"), ["a cat"])
    assert _run(ts, out, suite) == 0
    cfg = os.path.join(ts, "custom", "threestudio-rfds", "configs", "fake.yaml")
    with open(cfg, "a") as f:
        f.write("# edited\n")
    capsys.readouterr()
    assert _run(ts, out, suite) == 2
    _one_line_error(capsys, "config fake: custom/threestudio-rfds/configs/fake.yaml changed", "--new-revision")


def test_suite_json_deleted_is_checked_against_the_trial_records(fake, tmp_path, capsys):
    ts, out = fake
    suite = write_suite(str(tmp_path / "s.yaml"), ["a cat"], overrides=["trainer.max_steps=6"])
    assert _run(ts, out, suite) == 0
    os.remove(os.path.join(out, "suite.json"))
    other = write_suite(str(tmp_path / "t.yaml"), ["a cat"], overrides=["trainer.max_steps=8"])
    capsys.readouterr()
    assert _run(ts, out, other) == 2
    _one_line_error(capsys, "overrides ['trainer.max_steps=6'] → ['trainer.max_steps=8']")
    assert not os.path.exists(os.path.join(out, "suite.json"))
    assert _run(ts, out, suite) == 0 and len(calls(ts)) == 1  # the suite the runs used: rewritten, nothing rerun
    assert os.path.exists(os.path.join(out, "suite.json"))


@pytest.mark.parametrize("flag", [["--gpus", "-1"], ["--gpus=-1"], ["--gpus", "0,-1"], ["--gpu", "-1"], ["--gpu=-1"],
                                  ["--gpus", "0,,1"], ["--gpus", "1,01"]])
def test_gpu_ids_must_be_distinct_and_non_negative(fake, tmp_path, capsys, flag):
    ts, out = fake
    suite = write_suite(str(tmp_path / "s.yaml"), ["a cat"])
    with pytest.raises(SystemExit) as e:
        _run(ts, out, suite, *flag)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "non-negative" in err and "distinct" in err, err
    assert calls(ts) == [] and not os.path.exists(out)


def test_empty_override_values_are_refused(fake, tmp_path, capsys):
    ts, out = fake
    suite = write_suite(str(tmp_path / "s.yaml"), ["a cat"], overrides=["trainer.max_steps="])
    assert bench_main(["validate", suite]) == 2
    _one_line_error(capsys, "'trainer.max_steps=' has no value", "key=''")
    ok = write_suite(str(tmp_path / "ok.yaml"), ["a cat"], overrides=["system.prompt_processor.negative_prompt=''"])
    assert bench_main(["validate", ok]) == 0  # an explicitly empty string is a value
    capsys.readouterr()
    assert _run(ts, out, ok, "--override", "trainer.max_steps= ") == 2
    _one_line_error(capsys, "--override", "has no value")
    assert calls(ts) == []


def test_prompts_differing_only_in_case_are_refused(tmp_path, capsys):
    suite = write_suite(str(tmp_path / "s.yaml"), ["a cat", "A Cat", "a dog"])
    assert bench_main(["validate", suite]) == 2
    _one_line_error(capsys, "'a cat' and 'A Cat'", "tokenise")


def test_preflight_refuses_a_checkout_that_cannot_import(fake, tmp_path, capsys):
    """The same import a launch does first (threestudio imports tinycudann before it loads extensions), once,
    in the runs' Python: one line before any run starts; --skip-preflight launches anyway."""
    ts, out = fake
    with open(os.path.join(ts, "threestudio", "__init__.py"), "w") as f:
        f.write("import tinycudann_is_not_here\n")
    suite = write_suite(str(tmp_path / "s.yaml"), ["a cat", "a dog"])
    assert _run(ts, out, suite) == 2
    _one_line_error(capsys, "import threestudio", "No module named 'tinycudann_is_not_here'", "--skip-preflight")
    assert calls(ts) == [] and not os.path.exists(os.path.join(out, "logs"))
    assert _run(ts, out, suite, "--skip-preflight") == 0 and len(calls(ts)) == 2


def test_report_counts_in_words(fake, tmp_path):
    ts, out = fake
    suite = write_suite(str(tmp_path / "s.yaml"), ["a cat"])
    assert _run(ts, out, suite) == 0
    assert bench_main(["report", out]) == 0
    with open(os.path.join(out, "report.md")) as f:
        md = f.read()
    assert "1 prompt × 1 config × seeds [0]; 1 run done" in md



def test_runner_killed_between_the_folder_and_the_ledger_write(fake, tmp_path, capsys):
    """The record reaches the trial folder first: a ledger whose last record of a run is still ``started``
    (the runner died before appending ``done``) is completed from the folder, with a warning."""
    ts, out = fake
    suite = write_suite(str(tmp_path / "s.yaml"), ["a cat", "a dog"])
    assert _run(ts, out, suite) == 0
    ledger = os.path.join(out, "ledger.jsonl")
    with open(ledger) as f:
        lines = f.readlines()
    with open(ledger, "w") as f:
        f.writelines(ln for ln in lines if json.loads(ln)["status"] == "started" or "a_dog" not in ln)
    capsys.readouterr()
    assert bench_main(["status", out]) == 0
    res = capsys.readouterr()
    assert "2 done (of 2)" in res.out and "lacked the newest record of 1 run(s)" in res.err
    assert _run(ts, out, suite) == 0 and len(calls(ts)) == 2
