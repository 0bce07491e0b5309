"""bench/bench_scale.py's measuring helpers: per-phase peak memory resets, step times, method options."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from bench.bench_scale import Meter, _method_config, _train_step_times, bench_inputs


def test_cpu_peak_is_per_phase():
    meter = Meter(torch.device("cpu"))
    _, _, base = meter.run(lambda: None)

    def big():
        a = np.ones(300 * 2**20 // 8)  # 300 MiB, touched
        return float(a[::4096].sum())

    _, seconds, peak = meter.run(big)
    assert peak - base > 250 * 2**20 and seconds >= 0 and meter.cpu_seconds >= 0
    _, _, after = meter.run(lambda: None)
    if after > base + 200 * 2**20:  # no /proc/self/clear_refs here: the peak is the process's so far
        pytest.skip("this kernel cannot reset the peak RSS")
    assert after < peak - 200 * 2**20  # the next phase does not inherit the big one's peak


def test_train_step_times_skip_setup_and_other_loops():
    calls = [("apo bench: adapters", 0, 1, 0.0, 0.0),
             ("apo bench/crack", 1, 3, 10.0, 8.0),  # step 1: setup included, left out
             ("apo bench/crack", 2, 3, 13.0, 10.0),
             ("apo bench/crack", 3, 3, 17.0, 12.0),
             ("apo bench: adapters", 1, 1, 17.5, 12.1)]
    out = _train_step_times(calls)
    assert out == dict(train_step_s=3.5, train_step_cpu_s=2.0, train_steps_timed=2)
    assert _train_step_times(calls[:2])["train_step_s"] is None  # one step: nothing clean to time


class _Args:
    preset, train_steps, gen_steps = "paper", 3, 7
    set = ["apo.rank=64", "o2mag.ago_lr=0.01", "apo.prompt=a {category} with {defect_type}"]


def test_method_config_uses_preset_and_overrides():
    from ops.methods.registry import get_method

    cfg, values = _method_config(get_method("apo"), "apo", _Args)
    assert (cfg.preset, cfg.train_steps, cfg.steps, cfg.rank) == ("paper", 3, 7, 64)
    assert cfg.batch_size == 4 and cfg.prompt == "a {category} with {defect_type}"  # paper preset kept; raw string
    cfg, _ = _method_config(get_method("o2mag"), "o2mag", _Args)
    assert (cfg.ago_steps, cfg.steps, cfg.ago_lr) == (3, 7, 0.01)
    cfg, values = _method_config(get_method("cutpaste"), "cutpaste", _Args)
    assert values == {}


def test_bench_inputs_share_reference_and_normal():
    support, jobs = bench_inputs(64, 3)
    assert len(jobs) == 3 and {j.reference.image_id for j in jobs} == {support[0].image_id}
    assert all(j.target_mask.shape == (64, 64) and j.target_mask.any() for j in jobs)
    assert all(s.mask.any() and s.image.shape == (64, 64, 3) for s in support)
