"""Suite files: the shipped suites load; malformed ones fail with messages naming the problem."""
import glob
import os

import pytest
import yaml

from threestudio_rfds.bench.suite import SuiteError, find_suite, load_suite, parse_suite

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GOOD = {"name": "s", "configs": ["a.yaml"], "prompts": ["a cat"], "seeds": [0, 1]}


@pytest.mark.parametrize("path", sorted(glob.glob(os.path.join(REPO, "configs", "*.yaml"))))
def test_shipped_suites_are_valid(path):
    s = load_suite(path)
    assert s.prompts and s.configs and s.seeds
    assert len(s.runs()) == len(s.prompts) * len(s.configs) * len(s.seeds)
    assert len({r.run_id for r in s.runs()}) == len(s.runs())
    assert all(c.path.startswith("custom/threestudio-rfds/configs/") for c in s.configs)


def test_shipped_suite_names():
    names = {os.path.basename(p)[:-5] for p in glob.glob(os.path.join(REPO, "configs", "*.yaml"))}
    assert {"default", "dreamfusion-gallery", "t3bench-single", "t3bench-surroundings", "t3bench-multi"} <= names
    assert len(load_suite("default").prompts) == 10  # bare names are looked up in configs/


def test_suite_search_path(tmp_path, monkeypatch):
    (tmp_path / "mine.yaml").write_text(yaml.safe_dump({**GOOD, "name": "mine"}))
    monkeypatch.setenv("RFDS_BENCH_SUITES", str(tmp_path))
    assert load_suite("mine").name == "mine"
    monkeypatch.delenv("RFDS_BENCH_SUITES")
    monkeypatch.chdir(tmp_path.parent)
    (tmp_path.parent / "configs").mkdir(exist_ok=True)
    (tmp_path.parent / "configs" / "local.yaml").write_text(yaml.safe_dump({**GOOD, "name": "local"}))
    assert load_suite("local").name == "local"  # ./configs when not installed from a checkout


def test_valid_minimal_suite():
    s = parse_suite(GOOD)
    assert [r.run_id for r in s.runs()][0].startswith("a/a_cat-")
    assert s.configs[0].label == "a" and s.seeds == [0, 1]


@pytest.mark.parametrize(
    "patch, match",
    [
        ({"promts": ["x"]}, r"unknown keys \['promts'\]"),
        ({"prompts": []}, "'prompts' is missing or empty"),
        ({"prompts": None}, "'prompts' is missing or empty"),
        ({"prompts": ["ok", ""]}, "prompt #1 must be a non-empty string"),
        ({"prompts": ["a", "a"]}, "duplicate prompts"),
        ({"prompts": ["a ${x}"]}, "interpolate"),
        ({"seeds": [-1]}, "seed -1 is not an integer"),
        ({"seeds": ["zero"]}, "seed 'zero' is not an integer"),
        ({"seeds": [True]}, "seed True"),
        ({"seeds": [1.5]}, "seed 1.5"),
        ({"seeds": [1, 1]}, "duplicates"),
        ({"seeds": []}, "non-empty list"),
        ({"configs": []}, "'configs' is missing"),
        ({"configs": [{"path": "a.yaml", "lable": "x"}]}, r"unknown keys \['lable'\]"),
        ({"configs": ["a.txt"]}, "must be a .yaml config path"),
        ({"configs": ["x/a.yaml", "y/a.yaml"]}, "labels must be unique"),
        ({"overrides": ["seed=3"]}, "runner sets itself"),
        ({"overrides": ["nonsense"]}, "key=value"),
        ({"name": "bad name"}, "'name' must be"),
    ],
)
def test_bad_suites_name_the_problem(patch, match):
    with pytest.raises(SuiteError, match=match):
        parse_suite({**GOOD, **patch}, where="my.yaml")


def test_errors_name_the_file(tmp_path):
    p = tmp_path / "broken.yaml"
    p.write_text(yaml.safe_dump({**GOOD, "seeds": [-3]}))
    with pytest.raises(SuiteError, match="broken.yaml"):
        load_suite(str(p))
    p.write_text("name: [unclosed")
    with pytest.raises(SuiteError, match="not valid YAML"):
        load_suite(str(p))
    with pytest.raises(SuiteError, match="not found"):
        find_suite("no-such-suite")


@pytest.mark.parametrize("path", sorted(glob.glob(os.path.join(REPO, "configs", "*.yaml"))))
def test_shipped_suites_name_existing_plugin_configs(path):
    # suites name configs as seen from a threestudio checkout with the plugin linked into custom/;
    # in this repository the same relative path points at the package's configs
    for c in load_suite(path).configs:
        assert os.path.isfile(os.path.join(REPO, c.path)), f"{path}: {c.path} does not exist"
