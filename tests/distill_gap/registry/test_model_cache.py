"""Issue 20: a registry version is served only after its model-signing signature verifies with a trusted key, the
check is remembered by digest in a marker beside the cached folder (later calls cost nothing), and each download
lands in a folder of its own, renamed into place whole. A real SQLite registry with file artifacts, a real tiny
edge folder signed with a real key pair (distill_gap.registry.versions.sign_and_log, as the pipeline signs)."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from urllib.parse import urlparse

import pytest

from distill_gap.errors import DistillError
from distill_gap.registry.model_cache import MARKER_SUFFIX, cached_version, read_marker
from distill_gap.registry.versions import fetch_model

from tests.conftest import LABELS
from tests.helpers import fresh_mlflow_db, log_model_dir


def _register(client, edge: Path, name: str, key_dir: Path | None, tracking) -> object:
    """`edge` logged as run artifacts and registered as a version of `name`, signed with the key pair in `key_dir`
    (None: unsigned), with its digest tag."""
    from flows.config import GovernanceConfig
    from distill_gap.digest import model_digest
    from distill_gap.registry.tracking import experiment_id
    from distill_gap.registry.versions import create_version, sign_and_log

    run_id = client.create_run(experiment_id(client, tracking)).info.run_id
    source = log_model_dir(client, run_id, edge, "edge")
    signed = sign_and_log(client, run_id, edge, "edge", GovernanceConfig(key_dir=str(key_dir))) if key_dir else {}
    return create_version(client, name, source=source, run_id=run_id, governance=GovernanceConfig(),
                          tags={"model.digest": model_digest(edge), **signed})


@pytest.fixture()
def registry(tiny_model_dir, review_frame, tmp_path, mlflow_db_template, monkeypatch):
    """(client, tracking URI, operator's public key PEM, the edge folder): x-edge v1, signed by the operator's key."""
    from flows.config import TrackingConfig
    from distill_gap.registry.tracking import client_for
    from tests.helpers import add_scope_guard

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    edge = tmp_path / "edge-src"
    shutil.copytree(tiny_model_dir, edge / "fp32")
    (edge / "edge.json").write_text(json.dumps({
        "format": 1, "primary": "fp32", "labels": LABELS, "max_length": 64, "quantized": False,
        "artifacts": {"fp32": {"path": "fp32", "runtime": "transformers", "ok": True}}}))
    add_scope_guard(edge, review_frame["text"].head(40).tolist())
    tracking = TrackingConfig(uri=fresh_mlflow_db(mlflow_db_template, tmp_path),
                              artifact_location=str(tmp_path / "artifacts"))
    client = client_for(tracking)
    _register(client, edge, "x-edge", tmp_path / "keys", tracking)
    return client, tracking, (tmp_path / "keys" / "signing-key.pub.pem").read_text(), edge


def _stored(client, name: str, version: int, rel: str = "") -> Path:
    return Path(urlparse(client.get_model_version(name, str(version)).source).path) / rel


def test_first_use_verifies_the_signature_and_later_uses_cost_nothing(registry, tmp_path):
    client, tracking, pem, _ = registry
    cache = tmp_path / "models"
    ref = fetch_model(client, "x-edge", version=1, cache_root=cache, public_keys=[pem])
    marker = read_marker(cache, ref.digest)
    assert marker["signature"]["uri"] == ref.tags["signature.uri"]
    assert marker["versions"] == [{"tracking_uri": tracking.uri, "name": "x-edge", "version": 1}]
    # the signature is not fetched or checked again: gone from the store, the cached copy still serves
    signature = Path(urlparse(ref.tags["signature.uri"]).path)
    signature.rename(signature.with_suffix(".moved"))
    started = time.monotonic()
    again = fetch_model(client, "x-edge", version=1, cache_root=cache, public_keys=[pem])
    assert again.path == ref.path and time.monotonic() - started < 2.0
    assert cached_version(cache, tracking.uri, "x-edge", 1)[0] == ref.path
    # a cached file that changed sends the folder back through every check: here the signature cannot be had
    (ref.path / "scope.json").write_text((ref.path / "scope.json").read_text() + " ")
    with pytest.raises(DistillError, match=r"signature .* cannot be downloaded"):
        fetch_model(client, "x-edge", version=1, cache_root=cache, public_keys=[pem])
    assert cached_version(cache, tracking.uri, "x-edge", 1) is None  # changed since: not served offline either
    signature.with_suffix(".moved").rename(signature)
    assert fetch_model(client, "x-edge", version=1, cache_root=cache, public_keys=[pem]).path == ref.path
    assert not [p.name for p in cache.iterdir() if p.name.startswith(".")]  # no download folder left


def test_a_version_edited_and_re_signed_with_another_key_is_refused(registry, tmp_path):
    """The issue's case: edge.json edited in the store (primary and scope), re-signed with the tamperer's key, and
    the model.digest, signature.uri and signing.public_key tags updated to match: the digest check alone passes."""
    from flows.config import GovernanceConfig
    from distill_gap.digest import model_digest
    from distill_gap.registry.versions import sign_and_log

    client, tracking, pem, _ = registry
    stored = _stored(client, "x-edge", 1)
    manifest = json.loads((stored / "edge.json").read_text())
    (stored / "edge.json").write_text(json.dumps({**manifest, "max_length": 8}))
    experiment = client.get_run(client.get_model_version("x-edge", "1").run_id).info.experiment_id
    run_id = client.create_run(experiment).info.run_id
    forged = sign_and_log(client, run_id, stored, "edge", GovernanceConfig(key_dir=str(tmp_path / "tamperer")))
    for key, value in {**forged, "model.digest": model_digest(stored)}.items():
        client.set_model_version_tag("x-edge", "1", key, value)

    assert fetch_model(client, "x-edge", version=1, cache_root=tmp_path / "a").digest  # digest only: fooled
    with pytest.raises(DistillError) as err:
        fetch_model(client, "x-edge", version=1, cache_root=tmp_path / "b", public_keys=[pem])
    assert "x-edge version 1: its signature does not verify with the trusted key" in err.value.problem
    assert "was not signed by this key" in err.value.problem
    assert "distill verify" in err.value.fix
    assert not (tmp_path / "b").exists() or not list((tmp_path / "b").glob(f"*{MARKER_SUFFIX}"))
    # trusting the key the registry records (--trust-registry-key) is what lets a tamperer through: the caller's choice
    assert fetch_model(client, "x-edge", version=1, cache_root=tmp_path / "c", public_keys=[]).version == 1


def test_an_unsigned_version_is_not_served(registry, tmp_path):
    client, tracking, pem, edge = registry
    _register(client, edge, "x-edge", None, tracking)  # v2, registered without a signature
    with pytest.raises(DistillError, match=r"x-edge version 2 is not signed \(no signature.uri tag\)"):
        fetch_model(client, "x-edge", version=2, cache_root=tmp_path / "models", public_keys=[pem])


def test_a_cached_copy_checked_only_by_digest_is_signature_checked_before_serving(registry, tmp_path):
    """The pipeline's own fetches check the digest only; predict's first use still checks the signature."""
    client, _, pem, _ = registry
    cache = tmp_path / "models"
    ref = fetch_model(client, "x-edge", version=1, cache_root=cache)
    assert read_marker(cache, ref.digest)["signature"] is None
    fetch_model(client, "x-edge", version=1, cache_root=cache, public_keys=[pem])
    assert read_marker(cache, ref.digest)["signature"]["public_key_sha256"]
    from distill_gap.signing import ensure_key_pair

    other_pem = ensure_key_pair(tmp_path / "other-keys").public_pem
    with pytest.raises(DistillError, match="does not verify with the trusted key"):  # another key: checked again
        fetch_model(client, "x-edge", version=1, cache_root=cache, public_keys=[other_pem])
