import hashlib

import pandas as pd
import pytest

from ops.ingest import RAW_SCHEMA
from ops.manifest import to_table
from ops.splits import SPLIT_SCHEMA, check_no_leakage, make_split


def raw(types: dict[str, list[str]], category: str = "widget", n_train: int = 2, n_test_good: int = 1) -> pd.DataFrame:
    """A raw manifest without files: ``types`` maps a defect type to its image file names (in listing order)."""
    recs = [("train", "good", f"{i:03d}.png") for i in range(n_train)]
    recs += [("test", "good", f"{i:03d}.png") for i in range(n_test_good)]
    recs += [("test", t, name) for t, names in types.items() for name in names]
    rows = [{"image_id": f"{split}/{t}/{name.rsplit('.', 1)[0]}", "category": category, "split": split,
             "defect_type": t, "dataset_root": "/data", "layout": "mvtec",
             "image_path": f"{category}/{split}/{t}/{name}",
             "mask_path": None if t == "good" else f"{category}/ground_truth/{t}/{name}", "width": 8, "height": 8,
             "sha256": hashlib.sha256(f"{category}/{split}/{t}/{name}".encode()).hexdigest(),
             "mask_area": 0.0 if t == "good" else 0.1, "mask_count": 0 if t == "good" else 1}
            for split, t, name in recs]
    return pd.DataFrame(rows)[RAW_SCHEMA.names]


def support(split: pd.DataFrame, defect_type: str) -> list[str]:
    s = split[(split["defect_type"] == defect_type) & (split["role"] == "support")]
    return sorted(s["image_id"])


def test_anomalydiffusion_first_third_by_file_name():
    names = ["006.png", "001.png", "004.png", "000.png", "005.png", "003.png", "002.png"]  # n = 7, shuffled
    split = make_split(raw({"scratch": names, "hole": [f"{i:02d}.png" for i in range(9)], "dent": ["b.png", "a.png"]}))
    assert support(split, "scratch") == ["test/scratch/000", "test/scratch/001"]  # floor(7/3) = 2
    assert support(split, "hole") == ["test/hole/00", "test/hole/01", "test/hole/02"]  # floor(9/3) = 3
    assert support(split, "dent") == ["test/dent/a"]  # n = 2 keeps one support image
    assert (split[split["defect_type"] != "good"]["role"].value_counts().to_dict()
            == {"holdout": 5 + 6 + 1, "support": 2 + 3 + 1})
    goods = split[split["defect_type"] == "good"]
    assert goods.groupby("split")["role"].unique().map(list).to_dict() == {"test": ["test_good"],
                                                                           "train": ["train_good"]}
    assert (split["protocol"] == "anomalydiffusion").all() and (split["split_seed"] == 0).all()
    assert list(split.columns) == SPLIT_SCHEMA.names
    to_table(split, SPLIT_SCHEMA, "few_shot_splits")  # types match the declared schema
    assert check_no_leakage(split) == []


def test_sorting_is_by_file_name_not_by_row_order():
    names = ["010.png", "002.png", "001.png", "020.png", "003.png", "000.png"]
    a = make_split(raw({"scratch": names}))
    b = make_split(raw({"scratch": list(reversed(names))}).sample(frac=1.0, random_state=1))
    assert support(a, "scratch") == support(b, "scratch") == ["test/scratch/000", "test/scratch/001"]
    pd.testing.assert_frame_equal(a, b)


def test_single_image_type_is_an_error():
    with pytest.raises(ValueError, match="defect type 'dent': only 1 defect image.*add images"):
        make_split(raw({"dent": ["a.png"], "scratch": ["a.png", "b.png", "c.png"]}))


def test_k_shot_is_seeded_and_per_type_independent():
    names = [f"{i:03d}.png" for i in range(12)]
    df = raw({"scratch": names, "hole": names})
    a, b = make_split(df, "k_shot", k=3, seed=5), make_split(df, "k_shot", k=3, seed=5)
    pd.testing.assert_frame_equal(a, b)
    assert len(support(a, "scratch")) == 3 and len(support(a, "hole")) == 3
    assert (a["protocol"] == "k_shot").all() and (a["split_seed"] == 5).all()
    draws = {tuple(support(make_split(df, "k_shot", k=3, seed=s), "scratch")) for s in range(6)}
    assert len(draws) > 1, "the seed must change the draw"
    assert support(make_split(raw({"scratch": names}), "k_shot", k=3, seed=5), "scratch") == support(a, "scratch")
    assert check_no_leakage(a) == []


def test_k_shot_arguments():
    df = raw({"scratch": ["a.png", "b.png", "c.png"]})
    with pytest.raises(ValueError, match="needs k = a positive integer"):
        make_split(df, "k_shot")
    with pytest.raises(ValueError, match="k_shot with k=3 needs at least 4"):
        make_split(df, "k_shot", k=3)
    with pytest.raises(ValueError, match="unknown split protocol 'random'"):
        make_split(df, "random")
    with pytest.raises(ValueError, match=r"missing columns \['sha256'\]"):
        make_split(df.drop(columns=["sha256"]))


def _clean() -> pd.DataFrame:
    return make_split(raw({"scratch": [f"{i:03d}.png" for i in range(6)]}, n_train=3, n_test_good=2))


def test_leakage_check_catches_a_held_out_copy_in_support():
    split = _clean()
    held = split.index[split["role"] == "holdout"][0]
    sup = split.index[split["role"] == "support"][0]
    split.loc[held, "sha256"] = split.loc[sup, "sha256"]  # the same file under two names
    problems = check_no_leakage(split)
    assert len(problems) == 1 and "support" in problems[0] and split.loc[held, "image_id"] in problems[0]


def test_leakage_check_catches_same_id_in_support_and_holdout():
    split = _clean()
    leaked = split[split["role"] == "holdout"].iloc[[0]].assign(role="support")
    problems = check_no_leakage(pd.concat([split, leaked], ignore_index=True))
    assert any("also held out" in p for p in problems) and any("more than once" in p for p in problems)


def test_leakage_check_catches_good_images_in_support_and_train_test_overlap():
    split = _clean()
    split.loc[split.index[split["role"] == "test_good"][0], "role"] = "support"
    assert any("test good image has role 'support'" in p for p in check_no_leakage(split))
    split = _clean()
    train, test = split.index[split["role"] == "train_good"][0], split.index[split["role"] == "test_good"][0]
    split.loc[test, "sha256"] = split.loc[train, "sha256"]
    assert any("train_good" in p and "same file" in p for p in check_no_leakage(split))
    split = _clean()
    split.loc[split.index[split["role"] == "support"][0], "role"] = "train"
    assert any("unknown roles ['train']" in p for p in check_no_leakage(split))


def test_demo_split_is_clean(demo_split):
    assert check_no_leakage(demo_split) == []
    counts = demo_split[demo_split["role"] == "support"].groupby("defect_type").size().to_dict()
    assert counts == {"crack": 3, "hole": 2, "stain": 2}  # floor(9/3), floor(7/3), floor(8/3)
