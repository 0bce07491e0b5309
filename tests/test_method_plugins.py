"""Third-party generation methods through the ``anomaly_forge.methods`` entry-point group: a fake distribution
on sys.path registers a method that is listed, loaded, runs through the generation stage, and bad ones fail
with a message naming the distribution."""
import numpy as np
import pytest

from ops.methods import registry
from ops.methods.base import Method

PLUGIN = '''
import numpy as np
from ops.methods.base import Method, synthesize_each
from ops.types import Adapter


class Smudge(Method):
    """Darkens the target mask (a test plugin)."""

    name = "smudge"
    needs_reference = False

    def fit(self, backbone, support, cfg, out_dir, progress=None):
        return Adapter(self.name, support[0].category if support else "")

    def synthesize(self, backbone, adapter, jobs, cfg, progress=lambda *a: None):
        def make(job):
            image = job.normal.image.copy()
            image[job.target_mask] //= 2
            return image, job.target_mask.copy(), {"factor": 0.5}
        return synthesize_each(self.name, jobs, make, progress)


class NotAMethod:
    name = "broken"
'''


def _distribution(root, name, entries, module="fake_forge_methods"):
    (root / f"{module}.py").write_text(PLUGIN)
    info = root / f"{name}-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[anomaly_forge.methods]\n" + "".join(f"{k} = {v}\n" for k, v in entries.items()))


@pytest.fixture
def plugin_path(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(tmp_path))
    registry.refresh_methods()
    yield tmp_path
    monkeypatch.undo()
    registry.refresh_methods()


def test_an_installed_entry_point_is_a_method(plugin_path, demo_split, tmp_path_factory):
    _distribution(plugin_path, "fake-forge-methods", {"smudge": "fake_forge_methods:Smudge"})
    registry.refresh_methods()
    assert registry.available_methods()[-1] == "smudge" and "cutpaste" in registry.available_methods()
    method = registry.get_method("smudge")
    assert isinstance(method, Method) and method.name == "smudge"

    from ops.generation import fit_adapter, synthesize_partition
    from ops.storage import Storage

    storage = Storage(tmp_path_factory.mktemp("plugin_storage"))
    adapters = fit_adapter(storage, "brick", "smudge", demo_split, None, {}, progress=lambda *a: None)
    df = synthesize_partition(storage, "brick", "smudge", demo_split, adapters, None, n=3, seed=0, cfg={})
    assert len(df) == 3 and set(df["method"]) == {"smudge"} and (df["mask_area"] > 0).all()


def test_bad_entry_points_fail_naming_the_distribution(plugin_path):
    _distribution(plugin_path, "clashing-methods", {"perlin": "fake_forge_methods:Smudge"})
    registry.refresh_methods()
    with pytest.raises(ValueError, match="clashing-methods.*built-in method 'perlin'"):
        registry.available_methods()


def test_a_plugin_that_is_not_a_method_is_refused(plugin_path):
    _distribution(plugin_path, "broken-methods", {"broken": "fake_forge_methods:NotAMethod",
                                                  "missing": "no_such_module:Thing"})
    registry.refresh_methods()
    assert registry.available_methods()[-2:] == ["broken", "missing"]
    with pytest.raises(TypeError, match="broken-methods.*subclass of ops.methods.base.Method"):
        registry.get_method("broken")
    with pytest.raises(ImportError, match="'missing' of distribution broken-methods.*failed to import"):
        registry.get_method("missing")
    with pytest.raises(KeyError, match="unknown generation method 'nope'"):
        registry.get_method("nope")
