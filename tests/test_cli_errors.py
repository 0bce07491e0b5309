"""User errors of the CLI and the settings: one line naming the bad value and the fix, exit 2, nothing done first."""
import json

import pytest

from pipelines import cli
from resources.settings import ForgeSettings
from tests.fixtures.layouts import build_mvtec


def _one_error_line(capsys, argv, *needles, tmp_path=None):
    code = cli.main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2, err
    assert len(err) == 1 and err[0].startswith("anomaly-forge ") and "Traceback" not in err[0], err
    for needle in needles:
        assert needle in err[0], err[0]
    return err[0]


@pytest.mark.parametrize("argv, needles", [
    (["demo", "--methods", "nosuch"], ["'nosuch'", "cutpaste", "list-methods"]),
    (["demo", "--methods", ","], ["--methods is empty"]),
    (["demo", "--categories", "../evil"], ["'../evil'", "brick"]),
    (["demo", "--n", "0"], ["--n 0", ">= 1"]),
    (["demo", "--size", "8"], ["--size 8", ">= 32"]),
    (["demo", "--settings", "[1]"], ["JSON object"]),
    (["demo", "--settings", "{bad"], ["not valid JSON"]),
    (["demo", "--settings", json.dumps({"nosuch_field": 1})], ["'nosuch_field'", "n_per_partition"]),
    (["demo", "--settings", json.dumps({"seed": 3})], ["['seed']", "command's own options"]),
    (["demo", "--settings", json.dumps({"method_options": {"nosuch": {}}})], ["'nosuch'", "known methods"]),
    (["demo", "--settings", json.dumps({"method_options": {"perlin": {"bogus": 1}}})], ["'bogus'", "known options"]),
    (["demo", "--settings", json.dumps({"quality_options": {"bogus": 1}})], ["'bogus'", "QualityConfig"]),
    (["demo", "--settings", json.dumps({"quality_options": {"refine": {"bogus": 1}}})], ["'bogus'", "RefineConfig"]),
    (["demo", "--settings", json.dumps({"detection_options": {"stepz": 1}})], ["'stepz'", "steps"]),
    (["demo", "--settings", json.dumps({"detection_options": {"steps": {"segmentr": 5}}})], ["'segmentr'",
                                                                                             "segmenter"]),
    (["demo", "--settings", json.dumps({"split_protocol": "nope"})], ["'nope'", "k_shot"]),
    (["add-category", "X", "--root", "/missing/dataset"], ["/missing/dataset", "no such folder"]),
    (["add-category", "../evil", "--root", "/tmp"], ["'../evil'", "rename"]),
    (["materialize", "--methods", "nosuch"], ["'nosuch'", "cutpaste"]),
])
def test_user_errors_are_one_line_and_exit_2_before_any_work(argv, needles, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("DAGSTER_HOME", raising=False)  # materialize must fail on --methods before the instance
    _one_error_line(capsys, argv, *needles)
    assert list(tmp_path.iterdir()) == []  # nothing built, nothing written


def test_debug_shows_the_traceback(capsys):
    from pipelines.usage import UsageError

    with pytest.raises(UsageError, match="--n 0"):
        cli.main(["demo", "--n", "0", "--debug"])
    with pytest.raises(UsageError, match="--n 0"):
        cli.main(["--debug", "demo", "--n", "0"])


def test_add_category_on_a_root_without_that_category_lists_what_was_found(tmp_path, capsys):
    root = build_mvtec(tmp_path / "data", "widget")
    _one_error_line(capsys, ["add-category", "gadget", "--root", str(root), "--no-run"], "'gadget'", "widget")


def test_environment_errors_are_one_line(tmp_path, capsys, monkeypatch):
    """A read-only output folder is the user's to fix: one line naming the file, no traceback."""
    import errno

    from pipelines import demo

    def refuse(*_a, **_k):
        raise PermissionError(errno.EACCES, "Permission denied", str(tmp_path / "out" / "data"))

    monkeypatch.setattr(demo, "run_demo", refuse)
    line = _one_error_line(capsys, ["demo", "--out", str(tmp_path / "out"), "--methods", "perlin"],
                           "Permission denied", str(tmp_path / "out" / "data"))
    assert "permissions" in line


def test_settings_reject_unknown_fields_listing_the_known_ones():
    with pytest.raises(ValueError, match=r"unknown setting\(s\) \['n_per_partitoin'\].*n_per_partition"):
        ForgeSettings(dataset_roots=["/data"], n_per_partitoin=3)
    with pytest.raises(ValueError, match="unknown setting"):
        ForgeSettings.from_env(bogus=1)
    with pytest.raises(ValueError, match=r"unknown method\(s\) \['nosuch'\]"):
        ForgeSettings(dataset_roots=["/data"], method_options={"nosuch": {}}).check()
    assert ForgeSettings(dataset_roots=["/data"], method_options={"perlin": {}}).check_options()
