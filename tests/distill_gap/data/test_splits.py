"""Data loading: formats, s3://, canonical columns, split digests, stratified splits, OOD hold-out, OOD files with
unseen classes or no labels, the far-OOD set the demo ships."""

import json

import pandas as pd
import pytest

from flows.config import DataConfig
from distill_gap.data.splits import canonicalize, load_splits, read_table, split_digest
from distill_gap.errors import DistillError

LABELS = ["negative", "neutral", "positive"]


def _frame(n=60):
    return pd.DataFrame({"rid": [f"r{i}" for i in range(n)], "body": [f"text number {i}" for i in range(n)],
                         "y": [LABELS[i % 3] for i in range(n)], "site": ["a" if i % 4 else "b" for i in range(n)]})


@pytest.mark.parametrize("fmt", ["csv", "tsv", "parquet", "jsonl"])
def test_reads_every_format(tmp_path, fmt):
    df = _frame(9)
    path = tmp_path / f"d.{fmt}"
    if fmt == "csv":
        df.to_csv(path, index=False)
    elif fmt == "tsv":
        df.to_csv(path, sep="\t", index=False)
    elif fmt == "parquet":
        df.to_parquet(path)
    else:
        path.write_text("\n".join(json.dumps(r) for r in df.to_dict("records")))
    got = read_table(str(path))
    assert got["body"].tolist() == df["body"].tolist()


def test_reads_from_s3(s3_bucket):
    import boto3

    boto3.client("s3").put_object(Bucket=s3_bucket, Key="data/train.csv", Body=_frame(6).to_csv(index=False).encode())
    assert len(read_table(f"s3://{s3_bucket}/data/train.csv")) == 6
    with pytest.raises(DistillError, match="cannot read"):
        read_table(f"s3://{s3_bucket}/data/missing.csv")


def test_missing_file_and_unknown_format_are_clear(tmp_path):
    with pytest.raises(DistillError, match="data file not found"):
        read_table(str(tmp_path / "nope.csv"))
    (tmp_path / "x.dat").write_text("a")
    with pytest.raises(DistillError, match="set data.format"):
        read_table(str(tmp_path / "x.dat"))


def test_non_utf8_file_is_named(tmp_path):
    (tmp_path / "bad.csv").write_bytes(b"text,label\n\xff\xfe,positive\n")
    with pytest.raises(DistillError, match="not UTF-8"):
        read_table(str(tmp_path / "bad.csv"))


def test_missing_column_suggests_the_nearest():
    with pytest.raises(DistillError, match=r"column 'bdy' is missing.*did you mean 'body'"):
        canonicalize(_frame(), source="x.csv", text_column="bdy", label_column="y", id_column="rid", slice_columns=[])


def test_split_digest_ignores_row_order_but_not_content():
    df = canonicalize(_frame(), source="x.csv", text_column="body", label_column="y", id_column="rid", slice_columns=[])
    shuffled = df.sample(frac=1, random_state=0)
    changed = df.copy()
    changed.loc[3, "label"] = "neutral" if changed.loc[3, "label"] != "neutral" else "positive"
    assert split_digest(df) == split_digest(shuffled) != split_digest(changed)


def test_seeded_stratified_split_and_holdout(tmp_path):
    path = tmp_path / "all.csv"
    _frame(120).to_csv(path, index=False)
    cfg = DataConfig(train=str(path), text_column="body", label_column="y", id_column="rid", labels=LABELS,
                     slice_columns=["site"], holdout={"name": "site_b", "column": "site", "values": ["b"]})
    a, b = load_splits(cfg, seed=1), load_splits(cfg, seed=1)
    assert list(a.frames) == ["train", "validation", "test", "ood:site_b"]
    assert a.digests() == b.digests()
    assert (a["ood:site_b"]["site"] == "b").all() and not (a["train"]["site"] == "b").any()
    assert sum(len(df) for df in a.frames.values()) == 120
    assert set(a["test"]["label"]) == set(LABELS)  # stratified: every class in the test split
    assert load_splits(cfg, seed=2).digests()["test"] != a.digests()["test"]


def test_builtin_drugreview_demo_splits():
    from flows.config import load_config

    splits = load_splits(load_config("configs/demo.yaml").data, seed=13)
    assert set(splits.frames) == {"train", "validation", "test", "ood:not_drug_reviews", "ood:unseen_conditions"}
    assert len(splits["train"]) > 400 and len(splits["ood:unseen_conditions"]) > 100
    # validation: 0.12 of train and a fifth of test (configs/demo.yaml says why): ~2x the rows of train's share alone
    assert len(splits["validation"]) >= 120 and len(splits["test"]) >= 250
    assert not splits["train"]["condition"].isin(["Acne", "Obesity"]).any()
    assert "&#039;" not in " ".join(splits["train"]["text"])  # HTML entities decoded


def _ood_cfg(tmp_path, ood: pd.DataFrame) -> DataConfig:
    _frame(60).to_csv(tmp_path / "all.csv", index=False)
    ood.to_csv(tmp_path / "ood.csv", index=False)
    return DataConfig(train=str(tmp_path / "all.csv"), text_column="body", label_column="y", id_column="rid",
                      labels=LABELS, slice_columns=["site"], ood={"forum": str(tmp_path / "ood.csv")})


def test_ood_file_of_unseen_classes_loads_and_validates(tmp_path):
    from distill_gap.data.validation import validate_splits

    ood = _frame(6).assign(y=["great", "positive", None, "awful", "neutral", "great"])
    splits = load_splits(_ood_cfg(tmp_path, ood), seed=1)

    forum = splits["ood:forum"]
    assert forum["label"].tolist() == [None, "positive", None, None, "neutral", None]  # known classes only
    assert forum["label_raw"].tolist() == ["great", "positive", None, "awful", "neutral", "great"]
    assert forum["label"].map({l: i for i, l in enumerate(LABELS)}).isna().sum() == 4  # NaN label ids: no accuracy
    assert "label_raw" not in splits["train"].columns
    report = validate_splits(splits.frames, splits.labels, splits.slice_columns)
    assert report["splits"]["ood:forum"] == {"rows": 6, "passed": True, "failed": [], "source": str(tmp_path / "ood.csv")}

    # train, validation and test keep their strict checks: the same file as the test split is refused
    test = canonicalize(ood, source="t.csv", text_column="body", label_column="y", id_column="rid", slice_columns=["site"])
    with pytest.raises(DistillError, match=r"(?s)split 'test' \(t.csv\): column 'label' has values outside the label "
                                           r"set .*'great', 'awful'.*add the missing labels to data.labels"):
        validate_splits({**splits.frames, "test": test}, splits.labels, splits.slice_columns)


def test_ood_file_without_label_or_slice_column_loads_and_validates(tmp_path):
    from distill_gap.data.validation import validate_splits

    splits = load_splits(_ood_cfg(tmp_path, _frame(5)[["rid", "body"]]), seed=1)

    forum = splits["ood:forum"]
    assert forum["label"].isna().all() and forum["label_raw"].isna().all()
    assert (forum["site"] == "(missing)").all()  # slices are per test row; an OOD file need not have them
    assert validate_splits(splits.frames, splits.labels, splits.slice_columns)["passed"]
    # the text (and the declared id) column is still required
    with pytest.raises(DistillError, match="column 'body' is missing"):
        load_splits(_ood_cfg(tmp_path, _frame(5)[["rid", "y"]]), seed=1)


def test_far_ood_csv_loads_with_the_demo_columns(tmp_path):
    """configs/ood/not_drug_reviews.csv through the demo's own data settings (review_id, review, rating,
    condition, its holdout); small review files stand in for the 215k built-in reviews."""
    from distill_gap.data.validation import validate_splits
    from flows.config import load_config

    demo = load_config("configs/demo.yaml").data
    assert demo.ood == {"not_drug_reviews": "configs/ood/not_drug_reviews.csv"}
    reviews = pd.DataFrame({"review_id": [str(i) for i in range(60)], "review": [f"this drug helped {i}" for i in range(60)],
                            "rating": [LABELS[i % 3] for i in range(60)], "condition": ["Pain"] * 50 + ["Acne"] * 10})
    reviews.to_csv(tmp_path / "reviews.csv", index=False)
    data = demo.model_copy(update={"train": str(tmp_path / "reviews.csv"), "test": None, "validation_from_test": 0.0})

    splits = load_splits(data, seed=13)
    far = splits["ood:not_drug_reviews"]
    assert len(far) == 600 and far["label"].isna().all() and (far["condition"] == "(missing)").all()
    assert far["id"].str.match(r"^(debian|pypi):").all()
    assert validate_splits(splits.frames, splits.labels, splits.slice_columns)["passed"]


def test_validation_can_take_a_share_of_the_test_split_and_no_training_row(tmp_path):
    """data.validation_from_test (issue 19): validation = validation_fraction of train + a seeded, stratified share of
    test; the training rows are the same as without it, and no row is in two splits."""
    _frame(90).to_csv(tmp_path / "train.csv", index=False)
    _frame(60).assign(rid=lambda d: "t" + d["rid"]).to_csv(tmp_path / "test.csv", index=False)
    base = dict(train=str(tmp_path / "train.csv"), test=str(tmp_path / "test.csv"), text_column="body",
                label_column="y", id_column="rid", labels=LABELS, validation_fraction=0.2)
    plain = load_splits(DataConfig(**base), seed=3)
    more = load_splits(DataConfig(**base, validation_from_test=0.25), seed=3)
    assert more["train"]["id"].tolist() == plain["train"]["id"].tolist()
    assert (len(plain["validation"]), len(plain["test"])) == (18, 60)
    assert (len(more["validation"]), len(more["test"])) == (18 + 15, 45)
    moved = set(more["validation"]["id"]) - set(plain["validation"]["id"])
    assert len(moved) == 15 and moved <= set(plain["test"]["id"]) and not moved & set(more["test"]["id"])
    assert set(more["validation"].loc[more["validation"]["id"].isin(moved), "label"]) == set(LABELS)  # stratified
    assert more.digests() == load_splits(DataConfig(**base, validation_from_test=0.25), seed=3).digests()
