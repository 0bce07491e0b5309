"""Partition definitions shared by every asset module.

``category`` is dynamic: a new product category is a new partition (sensor or ``anomaly-forge add-category``).
``method`` is static and lists the registered (implemented) generation methods.
"""
from __future__ import annotations

import dagster as dg

from ops.methods.registry import available_methods

CATEGORY = "category"
METHOD = "method"

category_partitions = dg.DynamicPartitionsDefinition(name=CATEGORY)
method_partitions = dg.StaticPartitionsDefinition(available_methods())
category_method_partitions = dg.MultiPartitionsDefinition({CATEGORY: category_partitions, METHOD: method_partitions})

GPU_TAGS = {
    "dagster-k8s/config": {"container_config": {"resources": {"limits": {"nvidia.com/gpu": "1"}}}},
}
GPU_POOL = "gpu"
SEED_TAG = "anomaly_forge/seed"  # run tag: the synthesis seed of a per_round regeneration (pipelines.schedules)


def split_key(key: str | dg.MultiPartitionKey) -> tuple[str, str]:
    """(category, method) of a category x method partition key."""
    if isinstance(key, dg.MultiPartitionKey):
        d = key.keys_by_dimension
    else:
        d = dg.MultiPartitionKey({CATEGORY: key.split("|")[0], METHOD: key.split("|")[1]}).keys_by_dimension
    return d[CATEGORY], d[METHOD]
