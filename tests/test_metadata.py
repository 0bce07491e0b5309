"""Metadata a person reads at a glance: numbers as numbers, tables as tables, the same keys on every check."""
import math

import dagster as dg
import numpy as np
import pandas as pd
import pytest

from assets.metadata import check_result, number, table_metadata
from pipelines.definitions import collect_assets
from resources.backbone import DiffusionBackbone
from resources.settings import ForgeSettings
from resources.storage import ParquetIOManager, StorageResource
from tests.fixtures.layouts import build_mvtec

CHECK_KEYS = {"passed": dg.BoolMetadataValue, "problem_count": dg.IntMetadataValue, "problems": dg.TextMetadataValue}


def test_number_rounds_and_converts():
    assert number(np.float32(0.123456789)) == 0.1235 and type(number(np.float32(1.5))) is float
    assert number(np.int64(7)) == 7 and type(number(np.int64(7))) is int
    assert number(np.bool_(True)) is True
    assert number(float("nan")) is None and number(None) is None
    assert number(123456.7) == 123500.0


def test_table_metadata_is_typed_and_has_no_nan():
    df = pd.DataFrame({"name": ["a", "b"], "n": [1, 2], "score": [0.123456, math.nan], "ok": [True, False]})
    table = table_metadata(df)
    assert isinstance(table, dg.TableMetadataValue)
    assert [(c.name, c.type) for c in table.schema.columns] == [("name", "string"), ("n", "int"),
                                                                ("score", "float"), ("ok", "bool")]
    assert table.records[0].data == {"name": "a", "n": 1, "score": 0.1235, "ok": True}
    assert table.records[1].data["score"] is None
    assert len(table_metadata(pd.concat([df] * 40), max_rows=50).records) == 50


def test_check_result_says_passed_as_a_value():
    ok = check_result([], rows=np.int64(3), fraction=np.float64(0.333333))
    meta = ok.metadata
    assert ok.passed and meta["passed"] == dg.MetadataValue.bool(True) and meta["problem_count"] == dg.MetadataValue.int(0)
    assert meta["rows"] == dg.MetadataValue.int(3) and meta["fraction"] == dg.MetadataValue.float(0.3333)
    bad = check_result([f"p{i}" for i in range(12)])
    assert not bad.passed and bad.metadata["passed"].value is False and bad.metadata["problem_count"].value == 12
    text = bad.metadata["problems"].value
    assert text.startswith("p0\np1") and text.endswith("and 2 more")


@pytest.fixture(scope="module")
def ingested(tmp_path_factory):
    base = tmp_path_factory.mktemp("meta")
    root = build_mvtec(base / "data", "widget", defects={"scratch": 3, "hole": 3})
    store = str(base / "storage")
    resources = {"storage": StorageResource(root=store), "io_manager": ParquetIOManager(root=store),
                 "settings": ForgeSettings(dataset_roots=[str(root)]), "backbone": DiffusionBackbone(model="tiny")}
    assets, checks = collect_assets()
    selected = [a for a in assets if a.key.to_user_string() in ("raw_defect_sets", "few_shot_splits")]
    with dg.instance_for_test() as instance:
        instance.add_dynamic_partitions("category", ["widget"])
        result = dg.materialize([*assets, *checks], selection=dg.AssetSelection.assets(*selected),
                                partition_key="widget", instance=instance, resources=resources)
    return result


def _assert_readable(metadata):
    for key, value in metadata.items():
        assert not isinstance(value, dg.FloatMetadataValue) or value.value is None or \
            float(f"{value.value:.4g}") == value.value, f"{key}: {value.value} is not rounded"
        if isinstance(value, dg.MarkdownMetadataValue):
            assert "|---" not in value.value.replace(" ", "") and "``" not in value.value, f"{key}: a Markdown table"


def test_ingest_metadata_and_checks_are_readable(ingested):
    assert ingested.success
    for node in ("raw_defect_sets", "few_shot_splits"):
        meta = ingested.asset_materializations_for_node(node)[0].metadata
        _assert_readable(meta)
        assert any(isinstance(v, dg.TableMetadataValue) for v in meta.values())
        assert all(isinstance(meta[k], dg.IntMetadataValue) for k in ("images",) if k in meta)
    evaluations = ingested.get_asset_check_evaluations()
    assert len(evaluations) == 2
    for e in evaluations:
        meta = e.metadata
        for key, kind in CHECK_KEYS.items():
            assert isinstance(meta[key], kind), f"{e.asset_check_key.name}: {key} is {type(meta[key]).__name__}"
        assert meta["passed"].value is True and meta["problem_count"].value == 0 and meta["problems"].value == "none"
        _assert_readable(meta)


def test_descriptions_have_no_rst_markup():
    """The UI shows asset and check descriptions (the docstrings) raw: no RST double backticks or roles."""
    assets, checks = collect_assets()
    texts = {k.to_user_string(): a.specs_by_key[k].description or "" for a in assets for k in a.keys}
    texts.update({s.name: s.description or "" for c in checks for s in c.check_specs})
    assert all(texts.values()), [k for k, t in texts.items() if not t]
    assert not {k: t for k, t in texts.items() if "``" in t or ":class:" in t or ":func:" in t}
