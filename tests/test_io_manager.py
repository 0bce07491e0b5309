"""ParquetIOManager: atomic writes, partition-key paths, loading inputs that span partitions, clear errors."""

import dagster as dg
import pandas as pd
import pytest

import ops.atomic
from assets.partitions import category_partitions
from resources.storage import ALLOW_MISSING, ParquetIOManager, StorageResource

CATS = ["bottle", "carpet"]
METHODS = ["cutpaste", "perlin"]
# the real category dimension; methods fixed here so that "all partitions" does not grow with the registry
cat_x_method = dg.MultiPartitionsDefinition({"category": category_partitions,
                                             "method": dg.StaticPartitionsDefinition(METHODS)})


@dg.asset(partitions_def=cat_x_method)
def part_frames(context: dg.AssetExecutionContext) -> pd.DataFrame:
    cat, method = context.partition_key.keys_by_dimension["category"], context.partition_key.keys_by_dimension["method"]
    return pd.DataFrame({"category": [cat] * 2, "method": [method] * 2, "i": [0, 1]})


@dg.asset
def all_frames(part_frames: pd.DataFrame) -> pd.DataFrame:
    return part_frames.assign(n=len(part_frames))


@dg.asset(ins={"part_frames": dg.AssetIn(metadata={ALLOW_MISSING: True})})
def some_frames(part_frames: pd.DataFrame) -> pd.DataFrame:
    return part_frames


@dg.asset(partitions_def=category_partitions)
def per_category(context: dg.AssetExecutionContext) -> pd.DataFrame:
    return pd.DataFrame({"category": [context.partition_key], "value": [1.5]})


@dg.asset(partitions_def=cat_x_method,
          ins={"per_category": dg.AssetIn(partition_mapping=dg.MultiToSingleDimensionPartitionMapping(
              partition_dimension_name="category"))})
def per_method(per_category: pd.DataFrame) -> pd.DataFrame:
    return per_category


@pytest.fixture
def instance():
    with dg.instance_for_test() as inst:
        inst.add_dynamic_partitions("category", CATS)
        yield inst


def _resources(root):
    return {"io_manager": ParquetIOManager(root=str(root))}


def _mkey(cat: str, method: str) -> dg.MultiPartitionKey:
    return dg.MultiPartitionKey({"category": cat, "method": method})


def test_multi_partition_paths_and_loading_every_partition(tmp_path, instance):
    for cat in CATS:
        for method in METHODS:
            dg.materialize([part_frames], partition_key=_mkey(cat, method), resources=_resources(tmp_path),
                           instance=instance)
    files = sorted(p.name for p in (tmp_path / "manifests" / "part_frames").iterdir())
    assert files == ["bottle|cutpaste.parquet", "bottle|perlin.parquet", "carpet|cutpaste.parquet",
                     "carpet|perlin.parquet"]
    back = pd.read_parquet(tmp_path / "manifests" / "part_frames" / "carpet|perlin.parquet")
    assert back.to_dict("list") == {"category": ["carpet"] * 2, "method": ["perlin"] * 2, "i": [0, 1]}

    res = dg.materialize([part_frames, all_frames], selection=[all_frames], resources=_resources(tmp_path),
                         instance=instance)
    out = res.output_for_node("all_frames")
    assert len(out) == 8 and set(out["n"]) == {8}
    assert set(zip(out["category"], out["method"])) == {(c, m) for c in CATS for m in METHODS}
    assert (tmp_path / "manifests" / "all_frames" / "all.parquet").exists()
    mat = res.asset_materializations_for_node("all_frames")[0]
    assert mat.metadata["dagster/row_count"].value == 8


def test_single_dimension_mapping_loads_the_category_partition(tmp_path, instance):
    for cat in CATS:
        dg.materialize([per_category], partition_key=cat, resources=_resources(tmp_path), instance=instance)
    res = dg.materialize([per_category, per_method], selection=[per_method], partition_key=_mkey("carpet", "perlin"),
                         resources=_resources(tmp_path), instance=instance)
    assert res.output_for_node("per_method")["category"].tolist() == ["carpet"]


def test_missing_partition_names_the_file_and_the_asset(tmp_path, instance):
    dg.materialize([part_frames], partition_key=_mkey("bottle", "cutpaste"), resources=_resources(tmp_path),
                   instance=instance)
    res = dg.materialize([part_frames, all_frames], selection=[all_frames], resources=_resources(tmp_path),
                         instance=instance, raise_on_error=False)
    assert not res.success
    text = res.get_step_failure_events()[0].step_failure_data.error.to_string()
    assert "FileNotFoundError" in text and "part_frames" in text and "materialize" in text
    assert str(tmp_path / "manifests" / "part_frames") in text and ".parquet does not exist" in text

    res = dg.materialize([part_frames, some_frames], selection=[some_frames], resources=_resources(tmp_path),
                         instance=instance)
    assert res.output_for_node("some_frames")[["category", "method"]].drop_duplicates().values.tolist() == [
        ["bottle", "cutpaste"]]


def test_failed_write_keeps_the_old_file_and_leaves_no_temp_files(tmp_path, instance, monkeypatch):
    key = _mkey("bottle", "cutpaste")
    dg.materialize([part_frames], partition_key=key, resources=_resources(tmp_path), instance=instance)
    folder = tmp_path / "manifests" / "part_frames"
    before = (folder / "bottle|cutpaste.parquet").read_bytes()

    def crash(_fd):
        raise OSError("disk full")

    monkeypatch.setattr(ops.atomic.os, "fsync", crash)  # the new bytes are in the temp file, not yet renamed
    ctx = dg.build_output_context(asset_key=dg.AssetKey("part_frames"), partition_key=str(key),
                                  asset_partitions_def=dg.StaticPartitionsDefinition([str(key)]),
                                  asset_partition_key_range=dg.PartitionKeyRange(str(key), str(key)))
    with pytest.raises(OSError, match="disk full"):
        ParquetIOManager(root=str(tmp_path)).handle_output(ctx, pd.DataFrame({"other": ["rows"] * 5}))
    assert (folder / "bottle|cutpaste.parquet").read_bytes() == before
    assert sorted(p.name for p in folder.iterdir()) == ["bottle|cutpaste.parquet"]


def test_output_spanning_partitions_needs_a_dict_per_key(tmp_path):
    static = dg.StaticPartitionsDefinition(["a", "b", "c"])
    io = ParquetIOManager(root=str(tmp_path))
    ctx = dg.build_output_context(asset_key=dg.AssetKey(["pre", "wide"]), asset_partitions_def=static,
                                  asset_partition_key_range=dg.PartitionKeyRange("a", "b"))
    with pytest.raises(TypeError, match="dict"):
        io.handle_output(ctx, pd.DataFrame({"x": [1]}))
    io.handle_output(ctx, {"a": pd.DataFrame({"x": [1]}), "b": pd.DataFrame({"x": [2, 3]})})
    assert pd.read_parquet(tmp_path / "manifests" / "pre" / "wide" / "b.parquet")["x"].tolist() == [2, 3]

    in_ctx = dg.build_input_context(asset_key=dg.AssetKey(["pre", "wide"]), asset_partitions_def=static,
                                    asset_partition_key_range=dg.PartitionKeyRange("a", "b"))
    assert io.load_input(in_ctx)["x"].tolist() == [1, 2, 3]


def test_storage_resource_points_at_the_same_root(tmp_path):
    storage = StorageResource(root=str(tmp_path)).get()
    io = ParquetIOManager(root=str(tmp_path))
    assert io.path_for(dg.AssetKey("x"), "c|m") == storage.manifest_path("x", "c|m")
    assert str(storage.manifest_path("x", None)).endswith("manifests/x/all.parquet")
