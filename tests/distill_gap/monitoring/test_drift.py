"""Drift monitor statistics (distill_gap/monitoring/drift.py) on real drug-review rows: production reading (file, folder, moto S3),
hand-computed PSI / JS / chi-square / Holm, undrifted vs drifted samples, scope, slice accuracy, and a real tiny model."""

from __future__ import annotations

import json
import math
import zlib

import numpy as np
import pandas as pd
import pytest

from distill_gap.monitoring.drift import (DriftThresholds, drift_markdown, drift_report, holm, prediction_shift, psi,
                         read_production_rows, reference_profile, slice_columns, text_statistics)
from distill_gap.errors import DistillError
from distill_gap.evaluation.ood import msp_score, threshold_at_tpr

from tests.conftest import LABELS


@pytest.fixture(scope="module")
def halves(review_frame):
    """Two disjoint seeded halves of the 240 real rows: reference and a fresh production sample."""
    shuffled = review_frame.sample(frac=1.0, random_state=0).reset_index(drop=True)
    return shuffled.iloc[:120].reset_index(drop=True), shuffled.iloc[120:].reset_index(drop=True)


def oracle(frame: pd.DataFrame, wrong_condition: str | None = None):
    """A deterministic stand-in model: the true label of a known text, confidently (MSP 0.96-0.99); an unknown text
    gets a hash-chosen label at MSP ~0.45. Rows of `wrong_condition` are predicted wrong."""
    truth, condition = dict(zip(frame["text"], frame["label"])), dict(zip(frame["text"], frame["condition"]))

    def predict(texts: list[str]) -> np.ndarray:
        out = np.zeros((len(texts), len(LABELS)))
        for i, t in enumerate(texts):
            h = zlib.crc32(t.encode())
            if t in truth:
                k = (LABELS.index(truth[t]) + (condition[t] == wrong_condition)) % len(LABELS)
                out[i, k] = 4.0 + (h % 100) / 50
            else:
                out[i, h % len(LABELS)] = 0.5
        return out

    return predict


def profile(reference: pd.DataFrame, predict) -> tuple[dict, float]:
    logits = predict(reference["text"].tolist())
    threshold = threshold_at_tpr(msp_score(logits), 0.95)
    return reference_profile(reference["text"], logits, LABELS, scope_threshold=threshold), threshold


def write_jsonl(path, rows) -> str:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return str(path)


# ----------------------------------------------------------------------------------------------------------------
# statistics against hand-computed numbers


def test_psi_js_chi_square_match_hand_computed_values():
    # shares p = (.5, .3, .2) vs q = (.2, .3, .5): PSI = 2 * 0.3 * ln(2.5); M = (.35, .3, .35),
    # JSD = .5 log2(.5/.35) + .2 log2(.2/.35) = 0.095824; distance = sqrt(JSD); chi2: expected 35/30/35 per row
    shift = prediction_shift([50, 30, 20], [20, 30, 50])
    assert shift["psi"] == pytest.approx(0.6 * math.log(2.5), abs=1e-9)
    assert shift["psi"] == pytest.approx(0.549774, abs=1e-6)
    assert shift["js"] == pytest.approx(math.sqrt(0.5 * math.log2(0.5 / 0.35) + 0.2 * math.log2(0.2 / 0.35)), abs=1e-9)
    assert shift["js"] == pytest.approx(0.309541, abs=1e-6)
    assert shift["chi2"] == pytest.approx(2 * 2 * 15 ** 2 / 35, abs=1e-9)  # 25.714
    assert shift["p_value"] == pytest.approx(math.exp(-25.714286 / 2), rel=1e-4)  # chi2 with 2 dof: exp(-x/2)
    # an empty reference bin is floored at 1e-4: (.25 - .0001) ln(.25 / .0001) + (.25 - .5) ln(.25 / .5)
    assert psi([10, 0, 10], [5, 5, 10]) == pytest.approx(0.2499 * math.log(2500) + 0.25 * math.log(2), abs=1e-9)
    same = prediction_shift([40, 0, 60], [20, 0, 30])  # a label predicted by neither side is ignored
    assert same["psi"] == pytest.approx(0.0) and same["js"] == pytest.approx(0.0) and same["p_value"] == pytest.approx(1.0)


def test_holm_and_text_statistics():
    # sorted .005 (x4 = .02), .01 (x3 = .03), .03 (x2 = .06), .04 (x1 = .04 -> .06 by monotonicity)
    assert holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    stats = text_statistics(["Hello WORLD 42 café", "  two\twords\n"])
    assert stats["chars"].tolist() == [19, 12]
    assert stats["words"].tolist() == [4, 2]
    assert stats["non_ascii_share"] == pytest.approx([1 / 19, 0])
    assert stats["digit_share"] == pytest.approx([2 / 19, 0])
    assert stats["upper_share"] == pytest.approx([6 / 19, 0])


# ----------------------------------------------------------------------------------------------------------------
# reports on real rows


def test_fresh_split_of_the_same_data_does_not_drift(halves):
    reference, production = halves
    predict = oracle(pd.concat([reference, production]))
    ref, threshold = profile(reference, predict)
    report = drift_report(json.loads(json.dumps(ref)), production, predict, LABELS,
                          thresholds=DriftThresholds(), scope_threshold=threshold)
    assert report["drifted"] is False and report["reasons"] == []
    assert report["rows"] == report["scored"] == 120
    assert not any(t["drifted"] for t in report["text"].values())
    assert report["prediction"]["psi"] < 0.05 and not report["scope"]["drifted"]
    assert report["accuracy"]["accuracy"] == 1.0 and report["accuracy"]["n"] == 120
    json.dumps(report, allow_nan=False)
    md = drift_markdown(report)
    assert md.startswith("## No drift: 120 production rows, 120 scored") and "| predicted labels: PSI |" in md


def test_rows_naming_a_region_outside_the_scope_count_as_out_of_scope(halves):
    """The same undrifted rows, a third of them from regions the model was never proven on (`outside`, from the
    guard's regions): the out-of-scope share rises and names the drift."""
    reference, production = halves
    predict = oracle(pd.concat([reference, production]))
    ref, threshold = profile(reference, predict)
    outside = np.arange(len(production)) % 3 == 0
    report = drift_report(ref, production, predict, LABELS, scope_threshold=threshold, outside=outside)
    assert report["drifted"] and report["scope"]["drifted"] and report["scope"]["share"] >= 40 / 120
    assert any(r.startswith("out-of-scope share rose") for r in report["reasons"]), report["reasons"]


def test_truncated_upper_cased_texts_drift_with_named_reasons(halves):
    reference, production = halves
    predict = oracle(pd.concat([reference, production]))
    ref, threshold = profile(reference, predict)
    shifted = production.assign(text=[" ".join(t.split()[:5]).upper() for t in production["text"]])
    report = drift_report(ref, shifted, predict, LABELS, thresholds=DriftThresholds(), scope_threshold=threshold)
    assert report["drifted"] is True
    for stat in ("chars", "words", "upper_share"):
        assert report["text"][stat]["drifted"], stat
        assert any(r.startswith(f"text statistic {stat} shifted: KS") for r in report["reasons"]), report["reasons"]
    assert not report["text"]["non_ascii_share"]["drifted"]
    # unknown texts get MSP ~0.45: (nearly) all of them fall below the 95%-TPR threshold
    assert report["scope"]["drifted"] and report["scope"]["share"] > 0.9
    assert any(r.startswith("out-of-scope share rose from") for r in report["reasons"])
    md = drift_markdown(report)
    assert md.startswith("## DRIFT: 120 production rows")
    assert md.index("- text statistic chars shifted") < md.index("| statistic |")


def test_shifted_label_mix_drifts_the_predictions(halves):
    reference, production = halves
    predict = oracle(pd.concat([reference, production]))
    ref, threshold = profile(reference, predict)
    negative = production[production["label"] == "negative"]
    mix = negative.sample(n=120, replace=True, random_state=1).reset_index(drop=True)  # all negative
    report = drift_report(ref, mix, predict, LABELS, thresholds=DriftThresholds(), scope_threshold=threshold)
    p = report["prediction"]
    assert p["drifted"] and p["shares"]["negative"] == 1.0 and p["psi"] > 0.2 and p["js"] > 0.1 and p["p_value"] < 0.01
    assert any(r.startswith("predicted labels shifted: PSI") for r in report["reasons"])
    assert not report["scope"]["drifted"]
    # the same shift, but with thresholds above its size: no prediction drift
    lenient = drift_report(ref, mix, predict, LABELS, thresholds=DriftThresholds(max_psi=50, max_js=1),
                           scope_threshold=threshold)
    assert not lenient["prediction"]["drifted"]


def test_slice_accuracy_names_the_failing_slice(halves):
    reference, production = halves
    predict = oracle(pd.concat([reference, production]), wrong_condition="Birth Control")
    ref, threshold = profile(reference, predict)
    th = DriftThresholds(min_accuracy=0.5, min_slice_rows=10, max_psi=10, max_js=1)  # only accuracy can fire
    report = drift_report(ref, production, predict, LABELS, thresholds=th, scope_threshold=threshold)
    worst = report["accuracy"]["slices"][0]
    assert (worst["column"], worst["value"], worst["accuracy"]) == ("condition", "Birth Control", 0.0)
    assert worst["n"] == int((production["condition"] == "Birth Control").sum()) >= 10
    assert report["reasons"] == [f"accuracy condition=Birth Control 0.000 < 0.5 (n={worst['n']} labelled rows)"]
    assert "| condition=Birth Control |" in drift_markdown(report)


def test_model_runs_on_a_seeded_sample_only(halves):
    reference, production = halves
    predict, seen = oracle(pd.concat([reference, production])), []
    ref, threshold = profile(reference, predict)

    def counting(texts):
        seen.append(list(texts))
        return predict(texts)

    report = drift_report(ref, production, counting, LABELS, scope_threshold=threshold, sample_size=60, seed=3)
    again = drift_report(ref, production, counting, LABELS, scope_threshold=threshold, sample_size=60, seed=3)
    assert report["rows"] == 120 and report["scored"] == 60 and len(seen[0]) == 60 and seen[0] == seen[1]
    assert report["accuracy"]["n"] == 60 and report["prediction"] == again["prediction"]
    assert drift_report(ref, production, counting, LABELS, scope_threshold=None)["scope"] is None


def test_too_few_rows_and_a_foreign_profile_are_errors(halves):
    reference, production = halves
    predict = oracle(reference)
    ref, threshold = profile(reference, predict)
    with pytest.raises(DistillError, match="10 production rows.*too few to judge drift"):
        drift_report(ref, production.head(10), predict, LABELS, scope_threshold=threshold)
    with pytest.raises(DistillError, match="does not fit this model"):
        drift_report(ref, production, predict, ["bad", "good", "ok"], scope_threshold=threshold)
    with pytest.raises(DistillError, match="invalid drift thresholds: p_value=0"):
        DriftThresholds(p_value=0)


def test_real_tiny_model_end_to_end(halves, tiny_model_dir, tmp_path):
    from distill_gap.inference.batching import predict_logits
    from distill_gap.models.loading import load_classifier
    from tests.helpers import spread_classifier

    reference, production = halves
    model, tokenizer = load_classifier(spread_classifier(tiny_model_dir, reference["text"], tmp_path / "m"))

    def predict(texts):
        return predict_logits(model, tokenizer, texts, batch_size=32, max_length=64)

    logits = predict(reference["text"].tolist())
    assert len(set(logits.argmax(1))) > 1  # the model tells texts apart
    threshold = threshold_at_tpr(msp_score(logits), 0.95)
    ref = reference_profile(reference["text"], logits, LABELS, scope_threshold=threshold)
    path = write_jsonl(tmp_path / "prod.jsonl", production.to_dict("records"))
    report = drift_report(ref, read_production_rows(path), predict, LABELS, scope_threshold=threshold)
    assert report["drifted"] is False, report["reasons"]
    shifted = production.assign(text=[" ".join(t.split()[:4]).upper() for t in production["text"]])
    assert drift_report(ref, shifted, predict, LABELS, scope_threshold=threshold)["drifted"] is True
    json.dumps(report, allow_nan=False)


# ----------------------------------------------------------------------------------------------------------------
# reading production rows


def test_read_file_folder_timestamps_and_slices(tmp_path, review_frame):
    rows = [{"text": t, "label": l, "condition": c, "timestamp": "2026-11-20T10:00:00Z" if i % 2 else 1763805600 + i,
             "useful": i} for i, (t, l, c) in enumerate(zip(review_frame["text"], review_frame["label"],
                                                           review_frame["condition"]))][:60]
    rows[5].pop("label")
    write_jsonl(tmp_path / "a.jsonl", rows[:30] + [""])  # a blank last line is skipped
    (tmp_path / "day=2").mkdir()
    write_jsonl(tmp_path / "day=2" / "b.jsonl", rows[30:])
    (tmp_path / "notes.txt").write_text("not a sample")
    df = read_production_rows(str(tmp_path))
    assert len(df) == 60 and df["text"].tolist() == [r["text"] for r in rows]
    assert df["label"].isna().sum() == 1 and str(df["timestamp"].dtype) == "datetime64[ns, UTC]"
    assert df["timestamp"].min() == pd.Timestamp("2025-11-22T10:00:00Z")  # epoch seconds 1763805600
    assert len(read_production_rows(str(tmp_path / "a.jsonl"), max_rows=7)) == 7
    assert slice_columns(df) == ["condition"]  # label/text/timestamp are not slices, numbers neither


def test_malformed_json_and_missing_text_name_the_lines(tmp_path):
    good = json.dumps({"text": "fine"})
    path = write_jsonl(tmp_path / "bad.jsonl", [good, good, '{"text": "broken', "", good, "[1, 2]", good])
    with pytest.raises(DistillError, match=r"2 malformed lines: .*bad.jsonl line 3: not valid JSON.*line 6: expected a JSON object") as err:
        read_production_rows(path)
    assert "fix:" in str(err.value)
    rows = [good, json.dumps({"label": "positive"}), json.dumps({"text": ""}), good, json.dumps({"text": "  "}),
            json.dumps({"text": 3}), json.dumps({"text": None}), json.dumps({"text": "x", "label": 1}),
            json.dumps({"text": []})]
    with pytest.raises(DistillError, match=r"6 rows without a text: .*line 2: no \"text\".*line 3: \"text\" must be a "
                                           r"non-empty string.*line 5.*line 6.*line 7: no \"text\" \(and 1 more\)"):
        read_production_rows(write_jsonl(tmp_path / "notext.jsonl", rows))
    with pytest.raises(DistillError, match="neither ISO 8601 nor an epoch number.*line 2: 'yesterday'"):
        read_production_rows(write_jsonl(tmp_path / "ts.jsonl", [json.dumps({"text": "a", "timestamp": "2026-01-01"}),
                                                                 json.dumps({"text": "b", "timestamp": "yesterday"})]))


def test_empty_and_missing_inputs_are_errors(tmp_path):
    (tmp_path / "empty.jsonl").write_text("")
    (tmp_path / "blank.jsonl").write_text("\n  \n")
    for name in ("empty.jsonl", "blank.jsonl"):
        with pytest.raises(DistillError, match="holds no rows"):
            read_production_rows(str(tmp_path / name))
    with pytest.raises(DistillError, match="does not exist"):
        read_production_rows(str(tmp_path / "missing.jsonl"))
    (tmp_path / "none").mkdir()
    with pytest.raises(DistillError, match="no \\*.jsonl files under"):
        read_production_rows(str(tmp_path / "none"))


def test_s3_prefix_through_moto(s3_bucket, review_frame):
    import boto3

    s3 = boto3.client("s3")  # AWS_ENDPOINT_URL points at the moto server
    rows = [{"text": t, "label": l} for t, l in zip(review_frame["text"], review_frame["label"])]
    body = lambda rs: "".join(json.dumps(r) + "\n" for r in rs).encode()  # noqa: E731
    s3.put_object(Bucket=s3_bucket, Key="prod/2026-11-21.jsonl", Body=body(rows[:50]))
    s3.put_object(Bucket=s3_bucket, Key="prod/2026-11-22.jsonl", Body=body(rows[50:80]))
    s3.put_object(Bucket=s3_bucket, Key="prod/README.md", Body=b"not a sample")
    s3.put_object(Bucket=s3_bucket, Key="other/x.jsonl", Body=body(rows[80:90]))
    df = read_production_rows(f"s3://{s3_bucket}/prod/")
    assert df["text"].tolist() == [r["text"] for r in rows[:80]]
    with pytest.raises(DistillError, match="no \\*.jsonl objects under"):
        read_production_rows(f"s3://{s3_bucket}/nothing/")
    s3.put_object(Bucket=s3_bucket, Key="bad/x.jsonl", Body=b'{"text": "a"}\n{oops\n')
    with pytest.raises(DistillError, match=f"s3://{s3_bucket}/bad/x.jsonl line 2: not valid JSON"):
        read_production_rows(f"s3://{s3_bucket}/bad")
    with pytest.raises(DistillError, match="bucket 'no-such-bucket-here' does not exist at http://127.0.0.1:"):
        read_production_rows("s3://no-such-bucket-here/prod")


def test_rows_that_only_the_fast_parser_refuses_are_read(tmp_path):
    """orjson refuses NaN and Infinity, which Python's json writes (json.dumps of a pandas NaN) and reads: such a
    sample is read, not reported as '0 malformed lines'."""
    path = write_jsonl(tmp_path / "nan.jsonl", [json.dumps({"text": "fine", "condition": float("nan")}),
                                                json.dumps({"text": "also fine", "score": float("inf")})])
    df = read_production_rows(path)
    assert df["text"].tolist() == ["fine", "also fine"] and math.isnan(df["condition"].iloc[0])


def test_the_monitor_looks_up_regions_only_where_the_guard_has_them_and_the_rows_name_them():
    """watches._outside_regions: which production rows name a region outside the champion's proven scope (a row
    without one, NaN in a DataFrame, is judged by its score alone); nothing to look up without regions or the column."""
    from distill_gap.edge.guard import ScopeGuard
    from distill_gap.monitoring.watches import _outside_regions

    regions = {"column": "condition", "trained": ["Pain"], "added": [{"region": "Acne"}], "refused": []}
    guard = ScopeGuard("msp", threshold=0.0, tpr=0.95, info={"regions": regions})
    rows = pd.DataFrame({"text": ["a", "b", "c", "d"], "condition": ["Pain", "Migraine", None, "Acne"]})
    assert _outside_regions(guard, rows) == [False, True, False, False]
    assert _outside_regions(guard, rows[["text"]]) is None
    assert _outside_regions(ScopeGuard("msp", threshold=0.0, tpr=0.95), rows) is None and \
        _outside_regions(None, rows) is None
