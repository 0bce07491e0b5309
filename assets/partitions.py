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

# Where a heavy step runs, for the executors of deploy/ (pipelines.executors): its k8s pod asks for one GPU and is
# placed on a GPU node (the label NVIDIA's GPU operator / feature discovery sets, and the taint GPU node pools carry;
# other clusters override both with the k8s executor's per_step_k8s_config); under celery it goes to the "gpu" queue,
# which only workers on GPU machines consume.
GPU_QUEUE = "gpu"
GPU_TAGS = {
    "dagster-k8s/config": {
        "container_config": {"resources": {"limits": {"nvidia.com/gpu": "1"}}},
        "pod_spec_config": {
            "node_selector": {"nvidia.com/gpu.present": "true"},
            "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
        },
    },
    "dagster-celery/queue": GPU_QUEUE,
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
