"""The UI serves the whole lineage: a real ``dagster-webserver`` on 127.0.0.1 over this repository's workspace and a
demo instance (two categories registered), checked through GraphQL against the Definitions object: every asset,
its partitions, its asset checks, the sensors and the schedule."""
import os
import shutil
from pathlib import Path

import dagster as dg
import pytest

from assets.partitions import CATEGORY
from pipelines.definitions import build_definitions
from pipelines.ui_server import LOCATION, UIServer

REPO = Path(__file__).resolve().parents[1]
CATEGORIES = ["brick", "gravel"]

QUERY = """
{ repositoriesOrError { ... on RepositoryConnection { nodes { name location { name }
    sensors { name } schedules { name }
    assetNodes { assetKey { path } isPartitioned
      partitionKeysByDimension { name partitionKeys }
      assetChecksOrError { __typename ... on AssetChecks { checks { name } } } } } } } }
"""


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    home = tmp_path_factory.mktemp("ui")
    shutil.copy(REPO / "dagster.yaml", home / "dagster.yaml")
    env = {"ANOMALY_FORGE_HOME": str(home / "forge"), "ANOMALY_FORGE_NO_PROGRESS": "1"}
    with dg.DagsterInstance.from_config(str(home)) as instance:
        instance.add_dynamic_partitions(CATEGORY, CATEGORIES)
    with UIServer(home, env=env) as server:
        data = server.graphql(QUERY)
    (repo,) = [n for n in data["repositoriesOrError"]["nodes"] if n["location"]["name"] == LOCATION]
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:  # the expected side: the same code location built in this process with the same environment
        defs = build_definitions()
    finally:
        for k, v in old.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)
    return repo, defs


def test_every_asset_and_its_checks_are_served(served):
    repo, defs = served
    graph = defs.resolve_asset_graph()
    expected = {k.to_user_string() for k in graph.get_all_asset_keys()}
    got = {"/".join(n["assetKey"]["path"]) for n in repo["assetNodes"]}
    assert expected and got == expected
    checks = {}
    for key in graph.asset_check_keys:
        checks.setdefault(key.asset_key.to_user_string(), set()).add(key.name)
    assert checks
    for node in repo["assetNodes"]:
        name = "/".join(node["assetKey"]["path"])
        served_checks = {c["name"] for c in node["assetChecksOrError"].get("checks", [])}
        assert served_checks == checks.get(name, set()), name


def test_every_partition_of_every_asset_is_served(served):
    repo, defs = served
    graph = defs.resolve_asset_graph()
    with dg.instance_for_test() as instance:
        instance.add_dynamic_partitions(CATEGORY, CATEGORIES)
        for node in repo["assetNodes"]:
            key = dg.AssetKey(node["assetKey"]["path"])
            pdef = graph.get(key).partitions_def
            assert node["isPartitioned"] == (pdef is not None), key
            dims = {d["name"]: d["partitionKeys"] for d in node["partitionKeysByDimension"]}
            if pdef is None:
                assert not dims, key
            elif isinstance(pdef, dg.MultiPartitionsDefinition):
                assert dims == {d.name: d.partitions_def.get_partition_keys(dynamic_partitions_store=instance)
                                for d in pdef.partitions_defs}, key
                assert dims[CATEGORY] == CATEGORIES
            else:
                assert list(dims.values()) == [pdef.get_partition_keys(dynamic_partitions_store=instance)], key


def test_the_sensors_and_the_schedule_are_served(served):
    repo, defs = served
    rd = defs.get_repository_def()
    sensors = {s.name for s in rd.sensor_defs}
    schedules = {s.name for s in rd.schedule_defs}
    assert "new_category_sensor" in sensors and "regeneration_schedule" in schedules
    assert {s["name"] for s in repo["sensors"]} == sensors
    assert {s["name"] for s in repo["schedules"]} == schedules
