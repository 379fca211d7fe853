"""Signing with one local EC P-256 key: model folders and in-toto Statements, offline.

- Model folders: sigstore's `model_signing` (model-transparency) with its elliptic-key signer, so
  no Fulcio/Rekor is contacted. Every file is covered (git files too) and the bundle (a Sigstore
  bundle holding a DSSE envelope whose in-toto payload lists each file's sha256) lives outside the
  folder. On a mismatch we name the files from the signed manifest, after checking its signature.
- Statements: DSSE envelopes built with `securesystemslib` (dsse.Envelope + signer.CryptoSigner,
  the DSSE implementation sigstore's TUF client uses), not a hand-rolled PAE.
- keyid = sha256 hex of the DER SubjectPublicKeyInfo. (model_signing's own bundle "hint" is the
  sha256 of the public key's PEM text; error messages show both where they differ.)
"""

from __future__ import annotations

import base64
import copy
import hashlib
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from model_signing import hashing as ms_hashing
from model_signing import signing as ms_signing
from model_signing import verifying as ms_verifying
from securesystemslib import exceptions as sslib_exc
from securesystemslib.dsse import Envelope
from securesystemslib.signer import CryptoSigner, Signature, SSlibKey

from distill_gap.errors import DistillError

PRIVATE_KEY_NAME = "signing-key.pem"
PUBLIC_KEY_NAME = "signing-key.pub.pem"
PASSWORD_ENV = "DISTILL_SIGNING_KEY_PASSWORD"
PAYLOAD_TYPE = "application/vnd.in-toto+json"


class SignatureError(DistillError):
    """A signature does not verify: the signed content changed, or another key signed it."""


@dataclass(frozen=True)
class KeyPair:
    private_path: Path
    public_path: Path
    public_pem: str
    keyid: str


# ---------------------------------------------------------------- keys

def _password() -> bytes | None:
    value = os.environ.get(PASSWORD_ENV)
    return value.encode() if value else None


def _public_pem(public_key) -> str:
    return public_key.public_bytes(serialization.Encoding.PEM,
                                   serialization.PublicFormat.SubjectPublicKeyInfo).decode()


def _load_public(public_pem: str, source: str = "the public key"):
    """Parse a PEM public key, or raise DistillError naming where it came from."""
    try:
        key = serialization.load_pem_public_key(public_pem.encode())
    except (ValueError, TypeError, UnsupportedAlgorithm) as e:
        raise DistillError(f"{source} is not a PEM public key ({e})",
                           "pass the signer's signing-key.pub.pem (its content or its path)") from e
    if not isinstance(key, ec.EllipticCurvePublicKey):
        raise DistillError(f"{source} is not an elliptic-curve key", "use the EC key made by ensure_key_pair")
    return key


def keyid_of(public_pem: str) -> str:
    """sha256 hex of the DER SubjectPublicKeyInfo of a PEM public key."""
    der = _load_public(public_pem).public_bytes(serialization.Encoding.DER,
                                                 serialization.PublicFormat.SubjectPublicKeyInfo)
    return hashlib.sha256(der).hexdigest()


def _load_private(path: Path) -> ec.EllipticCurvePrivateKey:
    """Load the private key (decrypted with $DISTILL_SIGNING_KEY_PASSWORD if set) or raise DistillError."""
    fix = (f"restore {path} from a backup, or move it and {path.with_name(PUBLIC_KEY_NAME)} away to create "
           "a new key pair (signatures made with the old key will then only verify with the old public key)")
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), _password())
    except TypeError as e:  # encrypted without a password given, or a password for a plain key
        raise DistillError(f"cannot load the signing key {path}: {e}",
                           f"set {PASSWORD_ENV} to the key's password, or unset it for an unencrypted key") from e
    except (ValueError, UnsupportedAlgorithm) as e:
        raise DistillError(f"the signing key {path} cannot be read ({e})",
                           f"check {PASSWORD_ENV} if the key is encrypted; otherwise {fix}") from e
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise DistillError(f"the signing key {path} is not an elliptic-curve key", fix)
    return key


def _write_atomic(path: Path, data: bytes, mode: int, *, overwrite: bool) -> None:
    """Write via a temp file in the same folder; without overwrite an existing file is kept (os.link)."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        if overwrite:
            os.replace(tmp, path)
        else:
            try:
                os.link(tmp, path)  # atomic create-if-absent: a concurrent first use keeps one key
            except FileExistsError:
                pass
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def ensure_key_pair(key_dir: str | Path) -> KeyPair:
    """Load the key pair in key_dir, creating an EC P-256 pair (private key 0600, folder 0700) on first use."""
    key_dir = Path(key_dir)
    private_path, public_path = key_dir / PRIVATE_KEY_NAME, key_dir / PUBLIC_KEY_NAME
    if not private_path.exists():
        if public_path.exists():
            raise DistillError(f"{public_path} exists but its private key {private_path} is missing",
                               f"restore {private_path}, or delete {public_path} to create a new key pair")
        key_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        password = _password()
        encryption = (serialization.BestAvailableEncryption(password) if password
                      else serialization.NoEncryption())
        pem = ec.generate_private_key(ec.SECP256R1()).private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption)
        _write_atomic(private_path, pem, 0o600, overwrite=False)
    private = _load_private(private_path)
    expected_pem = _public_pem(private.public_key())
    if not public_path.exists():  # first use, or a crash between the two writes
        _write_atomic(public_path, expected_pem.encode(), 0o644, overwrite=True)
    public_pem = public_path.read_text()
    if _public_pem(_load_public(public_pem, str(public_path))) != expected_pem:
        raise DistillError(f"the public key {public_path} does not match the private key {private_path}",
                           f"delete {public_path}; it is rewritten from the private key on next use")
    return KeyPair(private_path, public_path, expected_pem, keyid_of(expected_pem))


def key_dir(governance) -> Path:
    """Where the signing key pair lives: DISTILL_KEY_DIR, else governance.key_dir."""
    return Path(os.environ.get("DISTILL_KEY_DIR") or governance.key_dir)


def signing_key(governance) -> KeyPair:
    """The local signing key pair of the governance config (created on first use)."""
    return ensure_key_pair(key_dir(governance))


# ---------------------------------------------------------------- model folders

def _hashing_config() -> ms_hashing.Config:
    """sha256 per file over every file in the folder; git files are not skipped (the library's default is to)."""
    return ms_hashing.Config().use_file_serialization(hashing_algorithm="sha256").set_ignored_paths(
        paths=[], ignore_git_paths=False)


def sign_folder(folder: str | Path, key: KeyPair, signature_path: str | Path) -> Path:
    """Sign every file under folder with key; write the Sigstore bundle to signature_path (outside folder)."""
    folder, signature_path = Path(folder), Path(signature_path)
    if not folder.is_dir():
        raise DistillError(f"cannot sign {folder}: not a folder", "pass the saved model's folder")
    if signature_path.resolve().is_relative_to(folder.resolve()):
        raise DistillError(f"the signature {signature_path} is inside the folder it signs ({folder})",
                           f"write it next to the folder, e.g. {folder}.sig")
    signature_path.parent.mkdir(parents=True, exist_ok=True)
    config = (ms_signing.Config()
              .use_elliptic_key_signer(private_key=key.private_path, password=_password())
              .set_hashing_config(_hashing_config()))
    tmp = signature_path.with_name(f".{signature_path.name}.tmp{os.getpid()}")
    try:
        config.sign(folder, tmp)
        os.replace(tmp, signature_path)
    except ValueError as e:  # symlinks, special files
        raise DistillError(f"cannot sign {folder}: {e}", "replace symlinks and special files by regular files") from e
    finally:
        tmp.unlink(missing_ok=True)
    return signature_path


def _read_public(public_pem_or_path: str | Path) -> str:
    if isinstance(public_pem_or_path, str) and "-----BEGIN" in public_pem_or_path:
        return public_pem_or_path
    path = Path(public_pem_or_path)
    if not path.is_file():
        raise DistillError(f"public key {path} not found", "pass the signer's signing-key.pub.pem or its content")
    return path.read_text()


def _local_digests(folder: Path) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in folder.rglob("*") if p.is_file()}


def _explain(folder: Path, public_pem: str, signature_path: Path, error: Exception) -> SignatureError:
    """Say why model_signing rejected folder: unreadable bundle, other key, altered bundle, or which files differ."""
    fix = "restore the signed files, or re-sign the folder if the change is intended"
    try:
        bundle = json.loads(signature_path.read_text())
        envelope = bundle["dsseEnvelope"]
        hint = bundle["verificationMaterial"]["publicKey"].get("hint")
        payload = base64.b64decode(envelope["payload"])
        sig = base64.b64decode(envelope["signatures"][0]["sig"])
    except (ValueError, KeyError, IndexError, TypeError, AttributeError) as e:
        return SignatureError(f"{signature_path} is not a readable model signature ({e}; model_signing: {error})",
                              "sign the folder again with sign_folder")
    keyid = keyid_of(public_pem)
    pem_hint = hashlib.sha256(_public_pem(_load_public(public_pem)).encode()).hexdigest()
    if hint and hint != pem_hint:
        return SignatureError(
            f"{folder} was not signed by this key: {signature_path} names the signer's key by PEM sha256 {hint}; "
            f"the key given is keyid {keyid} (PEM sha256 {pem_hint})",
            "verify with the signer's public key, or sign the folder again with this key")
    sslib_key = SSlibKey.from_crypto(_load_public(public_pem), keyid=keyid)
    dsse = Envelope(payload, PAYLOAD_TYPE, {keyid: Signature(keyid, sig.hex())})
    try:
        dsse.verify([sslib_key], 1)
    except sslib_exc.VerificationError:
        return SignatureError(f"the signature {signature_path} does not verify with key {keyid}: the signature "
                              "file was altered, or made by another key", "sign the folder again")
    try:
        predicate = json.loads(payload)["predicate"]
        signed = {r["name"]: r["digest"] for r in predicate["resources"] if r["algorithm"] == "sha256"}
        assert predicate["serialization"]["method"] == "files" and len(signed) == len(predicate["resources"])
    except (ValueError, KeyError, TypeError, AssertionError):
        return SignatureError(f"{folder} does not match its signature {signature_path}: {error}", fix)
    local = _local_digests(folder)
    problems = [f"{name}: digest differs from the signature" for name in sorted(signed.keys() & local.keys())
                if signed[name] != local[name]]
    problems += [f"{name}: missing (signed, not in the folder)" for name in sorted(signed.keys() - local.keys())]
    problems += [f"{name}: extra file (not in the signature)" for name in sorted(local.keys() - signed.keys())]
    detail = "; ".join(problems) if problems else str(error)
    return SignatureError(f"{folder} does not match its signature {signature_path}: {detail}", fix)


def verify_folder(folder: str | Path, public_pem_or_path: str | Path, signature_path: str | Path) -> None:
    """Verify folder against its bundle with model_signing; SignatureError names changed, extra and missing files."""
    folder, signature_path = Path(folder), Path(signature_path)
    public_pem = _read_public(public_pem_or_path)
    _load_public(public_pem)
    if not folder.is_dir():
        raise SignatureError(f"cannot verify {folder}: not a folder", "pass the signed model's folder")
    if not signature_path.is_file():
        raise SignatureError(f"signature {signature_path} not found", "sign the folder with sign_folder first")
    with tempfile.TemporaryDirectory(prefix="distill-verify-") as tmp:
        public_path = Path(tmp) / PUBLIC_KEY_NAME
        public_path.write_text(public_pem)
        config = (ms_verifying.Config().use_elliptic_key_verifier(public_key=public_path)
                  .set_hashing_config(_hashing_config()))
        try:
            config.verify(folder, signature_path)
        except (ValueError, KeyError, TypeError, InvalidSignature) as e:
            raise _explain(folder, public_pem, signature_path, e) from e


# ---------------------------------------------------------------- in-toto statements in DSSE

def _sslib_key(public_pem: str) -> SSlibKey:
    return SSlibKey.from_crypto(_load_public(public_pem), keyid=keyid_of(public_pem))


def sign_statement(statement: dict, key: KeyPair) -> dict:
    """DSSE envelope (JSON-able dict) over the canonical JSON of an in-toto Statement, signed with key."""
    payload = json.dumps(statement, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()
    try:
        signer = CryptoSigner(_load_private(key.private_path), _sslib_key(key.public_pem))
    except ValueError as e:  # KeyMismatchError: the KeyPair's public key is not the private key's
        raise DistillError(f"{key.private_path} does not match the public key of {key.public_path} ({e})",
                           "get the KeyPair from ensure_key_pair") from e
    envelope = Envelope(payload, PAYLOAD_TYPE, {})
    envelope.sign(signer)
    return envelope.to_dict()


def verify_statement(envelope: dict, public_pems: Iterable[str]) -> dict:
    """Check that one of public_pems signed the DSSE envelope; return the decoded in-toto Statement."""
    keys = [_sslib_key(pem) for pem in public_pems]
    if not keys:
        raise SignatureError("no public key given to verify the statement with", "pass the signer's public key")
    if not isinstance(envelope, dict) or envelope.get("payloadType") != PAYLOAD_TYPE:
        got = envelope.get("payloadType") if isinstance(envelope, dict) else type(envelope).__name__
        raise SignatureError(f"not an in-toto DSSE envelope: payloadType is {got!r}, expected {PAYLOAD_TYPE!r}",
                             "pass an envelope made by sign_statement")
    try:
        dsse = Envelope.from_dict(copy.deepcopy(envelope))  # from_dict consumes the dicts it is given
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise SignatureError(f"malformed DSSE envelope ({type(e).__name__}: {e})",
                             "pass an envelope made by sign_statement") from e
    trusted = {k.keyid for k in keys}
    if not dsse.signatures:
        raise SignatureError("the DSSE envelope has no signature", "sign the statement with sign_statement")
    if not trusted & dsse.signatures.keys():
        raise SignatureError(f"the statement is signed by unknown key(s) {sorted(dsse.signatures)}; "
                             f"trusted: {sorted(trusted)}", "verify with the signer's public key")
    try:
        dsse.verify(keys, 1)
    except (sslib_exc.VerificationError, ValueError) as e:
        raise SignatureError(f"the statement's signature does not verify with key(s) {sorted(trusted)}: "
                             "the payload or the signature was altered", "re-create and re-sign the statement") from e
    try:
        statement = json.loads(dsse.payload)
    except ValueError as e:
        raise SignatureError(f"the signed payload is not JSON ({e})", "sign a JSON in-toto Statement") from e
    if not isinstance(statement, dict):
        raise SignatureError("the signed payload is not a JSON object", "sign an in-toto Statement (a dict)")
    return statement


def statement_payload(envelope: dict) -> dict:
    """The Statement inside a DSSE envelope, NOT verified: for reading what an envelope claims (to name it, or to
    show it beside records that are verified elsewhere). Raises KeyError, TypeError or ValueError on a malformed one."""
    return json.loads(base64.b64decode(envelope["payload"]))


def subject_digests(statement: dict) -> dict[str, str]:
    """Map each subject name of an in-toto Statement to its sha256 digest."""
    try:
        return {s["name"]: s["digest"]["sha256"] for s in statement["subject"]}
    except (KeyError, TypeError) as e:
        raise DistillError(f"the statement's subjects lack a name or a sha256 digest ({e!r})",
                           "give every subject a name and digest.sha256") from e
