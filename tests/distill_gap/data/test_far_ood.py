"""The far-OOD set (package descriptions): what the builder keeps and drops, that it is deterministic, and the
committed CSV the demo reads."""

from __future__ import annotations

import importlib.metadata
from pathlib import Path

from distill_gap.data.far_ood import MIN_CHARS, build_far_ood, debian_descriptions, main, write_far_ood
from distill_gap.data.splits import read_table

ROOT = Path(__file__).resolve().parents[3]
CSV = ROOT / "configs/ood/not_drug_reviews.csv"

STATUS = """\
Package: curl
Status: install ok installed
Section: web
Description: command line tool for transferring data with URL syntax
 curl is a command line tool for transferring data with URL syntax,
 supporting   FTP and HTTP.
 .
 This second paragraph is left out.

Package: gone
Status: deinstall ok config-files
Section: utils
Description: a package removed long ago, only its configuration left

Package: unrar
Status: install ok installed
Section: non-free/utils
Description: Unarchiver for .rar files (non-free version)

Package: tiny
Status: install ok installed
Section: utils
Description: short text

Package: curl-copy
Status: install ok installed
Section: web
Description: command line tool for transferring data with URL syntax
 curl is a command line tool for transferring data with URL syntax,
 supporting FTP and HTTP.

Package: pillbox
Status: install ok installed
Section: misc
Description: reminders for your drug doses at the right time of day
"""


def _dist(tmp_path: Path, name: str, summary: str, licence: str = "MIT") -> importlib.metadata.Distribution:
    """A real installed-distribution record (a .dist-info folder with METADATA), as importlib.metadata reads it."""
    folder = tmp_path / f"{name}-1.0.dist-info"
    folder.mkdir()
    (folder / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 1.0\nSummary: {summary}\n"
                                     f"License: {licence}\n")
    return importlib.metadata.PathDistribution(folder)


def _inputs(tmp_path: Path) -> dict:
    status = tmp_path / "status"
    status.write_text(STATUS)
    dists = [_dist(tmp_path, "Flask_Cors", "A Flask extension simplifying CORS support"),
             _dist(tmp_path, "secret-sdk", "The vendor's closed toolkit for its cloud service", "Proprietary"),
             _dist(tmp_path, "distill-gap", "Accountable distillation and quantization of transformer classifiers"),
             _dist(tmp_path, "six", "Python 2 and 3 compatibility utilities")]
    return {"status_file": status, "distributions": dists}


def test_builder_keeps_first_paragraphs_and_drops_short_in_domain_duplicated_and_non_free_text(tmp_path):
    frame = build_far_ood(**_inputs(tmp_path))

    assert frame.columns.tolist() == ["id", "text", "source"]
    assert frame.to_dict("records") == [
        {"id": "debian:curl", "source": "debian",
         "text": "command line tool for transferring data with URL syntax. curl is a command line tool for "
                 "transferring data with URL syntax, supporting FTP and HTTP."},
        {"id": "pypi:flask-cors", "text": "A Flask extension simplifying CORS support", "source": "pypi"},
        {"id": "pypi:six", "text": "Python 2 and 3 compatibility utilities", "source": "pypi"},
    ]
    assert debian_descriptions(tmp_path / "no-such-status-file") == []  # a machine without dpkg: PyPI rows only


def test_builder_is_deterministic_and_samples_the_sources_in_turn(tmp_path):
    inputs = _inputs(tmp_path)
    assert build_far_ood(rows=2, seed=5, **inputs).equals(build_far_ood(rows=2, seed=5, **inputs))
    assert build_far_ood(rows=2, seed=5, **inputs)["source"].tolist() == ["debian", "pypi"]  # one from each
    # and on this machine's real packages: same rows twice, sorted by id, capped
    a, b = build_far_ood(rows=50), build_far_ood(rows=50)
    assert a.equals(b) and len(a) <= 50 and a["id"].is_monotonic_increasing and a["id"].is_unique


def test_cli_writes_the_demo_columns_and_reads_back_the_same_rows(tmp_path):
    status = tmp_path / "status"
    status.write_text(STATUS)
    frame = build_far_ood(status_file=status, distributions=[])
    out = write_far_ood(tmp_path / "ood" / "far.csv", frame)
    back = read_table(str(out))
    assert back.columns.tolist() == ["review_id", "review", "source"]
    assert back.rename(columns={"review_id": "id", "review": "text"}).to_dict("records") == frame.to_dict("records")

    main([str(tmp_path / "cli.csv"), "--rows", "40"])
    assert len(read_table(str(tmp_path / "cli.csv"))) == 40


def test_committed_csv_is_clean_far_ood_text():
    """configs/ood/not_drug_reviews.csv: built once (the rows depend on the machine's packages), read everywhere."""
    csv = read_table(str(CSV))
    assert csv.columns.tolist() == ["review_id", "review", "source"]
    assert len(csv) == 600 and csv["review_id"].is_unique and csv["review"].is_unique
    assert csv["review_id"].tolist() == sorted(csv["review_id"])
    assert set(csv["source"]) == {"debian", "pypi"}
    assert (csv["review"].str.len() >= MIN_CHARS).all() and not csv["review"].str.contains("drug", case=False).any()
    assert (csv["review"] == csv["review"].str.strip()).all()
