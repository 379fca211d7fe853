"""distill_gap.signing: local EC key pair, model folders signed with sigstore's model_signing, DSSE statements."""

from __future__ import annotations

import base64
import json
import os
import stat

import pytest

from distill_gap.errors import DistillError
from distill_gap.signing import (PASSWORD_ENV, SignatureError, ensure_key_pair, keyid_of, sign_folder, sign_statement,
                           subject_digests, verify_folder, verify_statement)

STATEMENT = {"_type": "https://in-toto.io/Statement/v1",
             "subject": [{"name": "student-int8.onnx", "digest": {"sha256": "ab" * 32}}],
             "predicateType": "https://distill-gap/step/v1",
             "predicate": {"step": "quantize", "accuracy": 0.871, "note": "ünïcode"}}


@pytest.fixture(autouse=True)
def _no_password(monkeypatch):
    monkeypatch.delenv(PASSWORD_ENV, raising=False)


@pytest.fixture
def key(tmp_path):
    return ensure_key_pair(tmp_path / "keys")


@pytest.fixture
def other_key(tmp_path):
    return ensure_key_pair(tmp_path / "other-keys")


@pytest.fixture
def model(tmp_path):
    folder = tmp_path / "student"
    (folder / "onnx").mkdir(parents=True)
    (folder / "model.safetensors").write_bytes(os.urandom(64 * 1024))
    (folder / "config.json").write_text(json.dumps({"num_labels": 3}))
    (folder / "onnx" / "model.onnx").write_bytes(os.urandom(4096))
    return folder


@pytest.fixture
def signed(model, key, tmp_path):
    return model, sign_folder(model, key, tmp_path / "student.sig")


def _flip_byte(path, at=100):
    data = bytearray(path.read_bytes())
    data[at] ^= 0x01
    path.write_bytes(bytes(data))


# ---------------------------------------------------------------- keys

def test_key_pair_created_once_with_private_permissions(tmp_path):
    key_dir = tmp_path / "keys"
    first = ensure_key_pair(key_dir)
    assert first.private_path == key_dir / "signing-key.pem" and first.public_path == key_dir / "signing-key.pub.pem"
    assert stat.S_IMODE(first.private_path.stat().st_mode) == 0o600
    assert stat.S_IMODE(key_dir.stat().st_mode) == 0o700
    assert "BEGIN PRIVATE KEY" in first.private_path.read_text()  # PKCS8, unencrypted
    assert first.public_pem == first.public_path.read_text() and "BEGIN PUBLIC KEY" in first.public_pem
    assert len(first.keyid) == 64 and first.keyid == keyid_of(first.public_pem)
    private_bytes = first.private_path.read_bytes()
    second = ensure_key_pair(key_dir)
    assert second.keyid == first.keyid and second.private_path.read_bytes() == private_bytes
    assert sorted(p.name for p in key_dir.iterdir()) == ["signing-key.pem", "signing-key.pub.pem"]  # no temp files


def test_corrupted_private_key_names_the_file(tmp_path):
    key_dir = tmp_path / "keys"
    ensure_key_pair(key_dir)
    (key_dir / "signing-key.pem").write_text("-----BEGIN PRIVATE KEY-----\nnot a key\n-----END PRIVATE KEY-----\n")
    with pytest.raises(DistillError) as err:
        ensure_key_pair(key_dir)
    assert str(key_dir / "signing-key.pem") in str(err.value) and err.value.fix


def test_public_key_of_another_pair_is_refused(tmp_path):
    mine, theirs = ensure_key_pair(tmp_path / "a"), ensure_key_pair(tmp_path / "b")
    mine.public_path.write_text(theirs.public_pem)
    with pytest.raises(DistillError, match="does not match the private key") as err:
        ensure_key_pair(tmp_path / "a")
    assert str(mine.public_path) in str(err.value)


def test_encrypted_key_with_password(tmp_path, monkeypatch, model):
    monkeypatch.setenv(PASSWORD_ENV, "s3cret")
    key = ensure_key_pair(tmp_path / "keys")
    assert "ENCRYPTED PRIVATE KEY" in key.private_path.read_text()
    verify_folder(model, key.public_pem, sign_folder(model, key, tmp_path / "m.sig"))
    verify_statement(sign_statement(STATEMENT, key), [key.public_pem])
    monkeypatch.delenv(PASSWORD_ENV)
    with pytest.raises(DistillError, match=PASSWORD_ENV):
        ensure_key_pair(tmp_path / "keys")


# ---------------------------------------------------------------- model folders

def test_sign_and_verify_folder(signed, key):
    model, signature = signed
    assert signature.is_file() and not (model / signature.name).exists()
    names = {r["name"] for r in json.loads(base64.b64decode(
        json.loads(signature.read_text())["dsseEnvelope"]["payload"]))["predicate"]["resources"]}
    assert names == {"model.safetensors", "config.json", "onnx/model.onnx"}
    verify_folder(model, key.public_pem, signature)
    verify_folder(model, key.public_path, signature)  # a path works as well as the PEM text


def test_one_byte_changed_in_weights_is_named(signed, key):
    model, signature = signed
    _flip_byte(model / "model.safetensors")
    with pytest.raises(SignatureError) as err:
        verify_folder(model, key.public_pem, signature)
    assert "model.safetensors: digest differs from the signature" in str(err.value)
    assert "config.json" not in str(err.value) and "onnx/model.onnx" not in str(err.value)


def test_changed_file_in_subfolder_is_named(signed, key):
    model, signature = signed
    _flip_byte(model / "onnx" / "model.onnx", at=0)
    with pytest.raises(SignatureError, match="onnx/model.onnx: digest differs") as err:
        verify_folder(model, key.public_pem, signature)
    assert "model.safetensors" not in str(err.value)


def test_added_file_fails(signed, key):
    model, signature = signed
    (model / ".gitattributes").write_text("*.safetensors filter=lfs\n")  # git files are covered too
    with pytest.raises(SignatureError, match=r"\.gitattributes: extra file"):
        verify_folder(model, key.public_pem, signature)


def test_removed_file_fails(signed, key):
    model, signature = signed
    (model / "config.json").unlink()
    with pytest.raises(SignatureError, match="config.json: missing"):
        verify_folder(model, key.public_pem, signature)


def test_other_key_fails(signed, key, other_key):
    model, signature = signed
    with pytest.raises(SignatureError, match="not signed by this key") as err:
        verify_folder(model, other_key.public_pem, signature)
    assert other_key.keyid in str(err.value)


def test_tampered_signature_bundle_fails(signed, key):
    model, signature = signed
    bundle = json.loads(signature.read_text())
    statement = json.loads(base64.b64decode(bundle["dsseEnvelope"]["payload"]))
    _flip_byte(model / "model.safetensors")  # re-point the manifest at the changed weights
    digest = __import__("hashlib").sha256((model / "model.safetensors").read_bytes()).hexdigest()
    for resource in statement["predicate"]["resources"]:
        if resource["name"] == "model.safetensors":
            resource["digest"] = digest
    bundle["dsseEnvelope"]["payload"] = base64.b64encode(json.dumps(statement).encode()).decode()
    signature.write_text(json.dumps(bundle))
    with pytest.raises(SignatureError, match="does not verify with key"):
        verify_folder(model, key.public_pem, signature)


def test_signature_inside_folder_is_refused(model, key):
    with pytest.raises(DistillError, match="inside the folder"):
        sign_folder(model, key, model / "student.sig")


# ---------------------------------------------------------------- statements

def test_statement_round_trip(key, other_key):
    envelope = sign_statement(STATEMENT, key)
    assert envelope["payloadType"] == "application/vnd.in-toto+json"
    assert envelope["signatures"] == [{"keyid": key.keyid, "sig": envelope["signatures"][0]["sig"]}]
    assert json.loads(json.dumps(envelope)) == envelope
    assert verify_statement(envelope, [other_key.public_pem, key.public_pem]) == STATEMENT
    assert subject_digests(STATEMENT) == {"student-int8.onnx": "ab" * 32}


def test_tampered_statement_payload_fails(key):
    envelope = sign_statement(STATEMENT, key)
    changed = json.loads(base64.b64decode(envelope["payload"]))
    changed["predicate"]["accuracy"] = 0.99
    envelope["payload"] = base64.b64encode(json.dumps(changed).encode()).decode()
    with pytest.raises(SignatureError, match="does not verify"):
        verify_statement(envelope, [key.public_pem])


def test_statement_signed_by_other_key_fails(key, other_key):
    envelope = sign_statement(STATEMENT, other_key)
    with pytest.raises(SignatureError, match="unknown key") as err:
        verify_statement(envelope, [key.public_pem])
    assert other_key.keyid in str(err.value)
    envelope["signatures"][0]["keyid"] = key.keyid  # claiming the trusted keyid does not help
    with pytest.raises(SignatureError, match="does not verify"):
        verify_statement(envelope, [key.public_pem])


def test_wrong_payload_type_and_malformed_envelopes_fail(key):
    envelope = sign_statement(STATEMENT, key)
    with pytest.raises(SignatureError, match="payloadType"):
        verify_statement({**envelope, "payloadType": "application/json"}, [key.public_pem])
    with pytest.raises(SignatureError, match="no signature"):
        verify_statement({**envelope, "signatures": []}, [key.public_pem])
    with pytest.raises(SignatureError, match="malformed"):
        verify_statement({**envelope, "signatures": [{"sig": "AA=="}]}, [key.public_pem])
    with pytest.raises(SignatureError, match="malformed"):
        verify_statement({k: v for k, v in envelope.items() if k != "payload"}, [key.public_pem])
