"""The dossier: one signed document per edge version that a certifier reads instead of the registry (issue 19).

It is compiled from the records alone, never from a run's memory: the version's tags, the step Statements of its
pipeline run (each signature checked, each keyed by the step its signed payload names, never by its file name),
and the scope record that ships in the edge folder. Sections: intended use and scope (what it was evaluated on,
what it must not do on its own, the shipped guard and its measured detection), the evidence (every gate with its
interval and outcome, worst slices, known and inherited limitations), the lineage chain (teacher version, digest
and licence, data digests, soft-label key, each compression step with its technique, parameters and Statement),
governance (owner, review date, approver or waiver) and the exact command that verifies it all.

Published at registration and after every alias move as `dossier/dossier.dsse.json` (an in-toto Statement whose
subject is the edge digest, DSSE-signed with the pipeline key) and `dossier/dossier.html` (self-contained) on the
version's run; `distill dossier` compiles it afresh. The Hugging Face model card (README.md in the edge folder) is
written from the same compilation before the folder is signed.
"""

from __future__ import annotations

import json
import tempfile
from datetime import date, datetime, timezone
from pathlib import Path

from distill_gap.digest import sha256_file
from distill_gap.errors import DistillError, read_json_object
from distill_gap.evaluation.regions import summary as region_summary
from distill_gap.outcomes import FAIL, INSUFFICIENT, PASS, gate_outcome

PREDICATE_TYPE = "https://distill-gap.dev/dossier/v1"
DOSSIER_DIR = "dossier"
STEP_ORDER = ("soft-labels", "distill", "quantize", "export", "evaluate", "promote", "waiver")


def download(client, uri: str, dst: Path) -> Path:
    """An artifact (file or folder) of the client's store, downloaded under `dst`; its local path."""
    import mlflow

    return Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(dst),
                                                    tracking_uri=client._tracking_client.tracking_uri))


def load_statements(client, uri: str | None, keys: list[str], tmp: Path) -> tuple[dict[str, dict], list[str]]:
    """The step Statements under `uri` whose signature verifies with one of `keys`, keyed by the step their signed
    payload names: {step: {"statement", "file", "sha256", "uri"}}, and the problems (unsigned, renamed, missing)."""
    from distill_gap.signing import SignatureError, verify_statement

    if not uri:
        return {}, ["no attestation.uri tag: the version has no step Statements"]
    try:
        folder = download(client, uri, tmp / "attestations.d")
    except Exception as err:  # noqa: BLE001 - named in the dossier, not hidden
        return {}, [f"the step Statements are not downloadable from {uri}: {err}"]
    found, problems = {}, []
    for path in sorted(folder.glob("*.dsse.json")):
        try:
            stmt = verify_statement(json.loads(path.read_text()), [k for k in keys if k])
        except (SignatureError, ValueError) as err:
            problems.append(f"{path.name}: {getattr(err, 'problem', err)}")
            continue
        step = stmt.get("predicate", {}).get("step")
        if path.name != f"{step}.dsse.json":
            problems.append(f"{path.name} holds the signed Statement of step {step!r}: not used")
            continue
        found[step] = {"statement": stmt, "file": path.name, "sha256": sha256_file(path),
                       "uri": f"{uri.rstrip('/')}/{path.name}"}
    return found, problems


def _predicate(statements: dict, step: str) -> dict:
    return (statements.get(step) or {}).get("statement", {}).get("predicate", {})


def _inputs(pred: dict) -> dict[str, str]:
    return {i["name"]: i["digest"]["sha256"] for i in pred.get("inputs", [])}


def _scope(record: dict | None, problem: str | None) -> dict:
    if record is None:
        return {"shipped": False, "problem": problem or "no scope.json in the edge folder: predict refuses to serve "
                                                        "without --out-of-scope-answer"}
    keep = ("auroc", "ci", "fpr_at_tpr", "fpr_at_threshold", "n_out", "note")  # as scope.json records them
    detection = {suite.removeprefix("ood:"): {k: v for k, v in r.items() if k in keep}
                 for suite, r in (record.get("ood_sets") or {}).items()}
    return {"shipped": True, "detector": record.get("detector"), "threshold": record.get("threshold"),
            "in_scope_rate_on_validation": record.get("tpr"), "temperature": record.get("temperature"),
            "rule": record.get("rule"), "fitted_on": record.get("fitted_on"), "slices_evaluated": len(record.get(
                "slices") or []), "detection": detection, "calibration": record.get("calibration"),
            "regions": record.get("regions"), "regions_summary": region_summary(record.get("regions"))}


def _limitations(gates: dict, flags: list, edge_model: str | None) -> list[str]:
    out = [f"inherited from the teacher: {k.removeprefix('noninferior:')}: {g.get('detail', '')}"
           for k, g in gates.items() if g.get("inherited")]
    out += [f"insufficient evidence: {k}: {g.get('detail', '')}" for k, g in gates.items()
            if gate_outcome(g) == INSUFFICIENT and not g.get("inherited")]
    out += [f"{f.get('suite')}: {f.get('model')} loses {abs(f.get('gap', 0)) * 100:.1f} accuracy points to the teacher"
            for f in flags if f.get("model") == edge_model and isinstance(f.get("gap"), (int, float))]
    return out


def _steps(statements: dict) -> list[dict]:
    steps = []
    for step in STEP_ORDER:
        s = statements.get(step)
        if s is None:
            continue
        p = s["statement"]["predicate"]
        params = {k: v for k, v in (p.get("parameters") or {}).items() if not isinstance(v, (dict, list))
                  or k in ("student_spec", "waived", "candidates", "vocab", "prune")}
        kept = (p.get("results") or {}).get("vocab")
        if kept:  # distill.vocab.trim: how far the vocabulary shrank (the mapping is in the model folder)
            params["vocab_kept"] = f"{kept['kept']} of the teacher's {kept['teacher_vocab_size']} tokens"
        pruned = (p.get("results") or {}).get("pruning")
        if pruned:  # distill.prune: the shapes after pruning
            width = pruned.get("hidden_width")  # distill.prune.hidden: a narrower residual stream
            params["pruned"] = ((f"width {width[0]} -> {width[1]}, " if width else "") +
                                f"heads kept per layer {pruned['heads_kept']}, FFN width {pruned['ffn_width'][0]} -> "
                                f"{pruned['ffn_width'][1]}")
        extra = (p.get("data") or {}).get("extra")
        if extra and step == "soft-labels":  # distill.augment / redistill: what else the teacher labelled, from where
            params["extra_rows"] = (f"{extra['rows']} ({', '.join(f'{k} {v}' for k, v in extra['by_source'].items())}"
                                    f"; {extra.get('answered', 0)} with a person's answer), key {extra['key'][:16]}")
            if extra.get("production"):
                params["production_sample"] = (f"{extra['production']['uri']} (sha256 "
                                               f"{extra['production']['sha256'][:16]})")
        steps.append({"step": step, "technique": p.get("technique"), "parameters": params,
                      "subjects": {x["name"]: x["digest"]["sha256"] for x in s["statement"].get("subject", [])},
                      "statement": s["uri"], "statement_sha256": s["sha256"]})
    return steps


def review_status(tags: dict, today: date | None = None) -> dict:
    """{"due", "overdue", "days_left"} from the version's review.due tag (no tag: overdue, nothing to go by)."""
    today = today or date.today()
    try:
        due = date.fromisoformat(tags.get("review.due", ""))
    except ValueError:
        return {"due": None, "overdue": True, "days_left": None}
    return {"due": due.isoformat(), "overdue": due < today, "days_left": (due - today).days}


def compile_dossier(*, name: str, version: int | None, tags: dict, statements: dict, problems: list[str],
                    scope_record: dict | None, aliases: list[str] | None = None, scope_problem: str | None = None,
                    tracking_uri: str | None = None, today: date | None = None) -> dict:
    """The dossier from the records: a version's tags, its verified step Statements (load_statements) and the scope
    record of its edge folder. `version` None: not registered yet (the model card written before signing)."""
    ev, quant = _predicate(statements, "evaluate"), _predicate(statements, "quantize")
    results = ev.get("results") or {}
    edge_model = results.get("edge_model") or (scope_record or {}).get("model")
    thin = set((tags.get("gates.insufficient") or "").split(","))  # Statements before issue 19 carry no outcome
    gates = {k: g if "outcome" in g or k not in thin else {**g, "outcome": INSUFFICIENT}
             for k, g in (results.get("gates") or {}).items()}
    if not gates:
        problems = [*problems, "no evaluate Statement with gates: the evidence is missing, nothing is shown passed"]
    outcomes = {k: gate_outcome(g) for k, g in gates.items()}
    outcome = (FAIL if FAIL in outcomes.values() or not gates else INSUFFICIENT if INSUFFICIENT in outcomes.values()
               else PASS)
    primary = tags.get("edge.primary")
    check = ((quant.get("results") or {}).get("checks") or {}).get(primary) or {}
    distill, soft = _predicate(statements, "distill"), statements.get("soft-labels")
    data_inputs = {k.removeprefix("data/"): v for k, v in {**_inputs(ev), **_inputs(distill)}.items()
                   if k.startswith("data/")}
    waiver = _predicate(statements, "waiver") if tags.get("promotion.waiver") else {}
    ref = f"models:/{name}/{version}" if version is not None else f"models:/{name}@champion"
    return {
        "format": 1,
        "model": {"name": name, "version": version, "digest": tags.get("model.digest"), "primary": primary,
                  "quantized": tags.get("edge.quantized") == "true", "size_bytes": check.get("size_bytes"),
                  "parent": tags.get("parent"), "edge_model": edge_model},
        "intended_use": {"use": tags.get("intended_use") or "not stated (governance.intended_use)",
                         "not_for": [x for x in (tags.get("not_for") or "").split("\n") if x.strip()]},
        "scope": _scope(scope_record, scope_problem),
        "evaluated_on": {split: (info or {}).get("rows") for split, info in (ev.get("data") or {}).items()},
        "evidence": {"outcome": outcome, "gates": gates,
                     "failed": [k for k, o in outcomes.items() if o == FAIL],
                     "insufficient": [k for k, o in outcomes.items() if o == INSUFFICIENT],
                     "rows_needed_max": max([g.get("rows_needed") or 0 for g in gates.values()] or [0]) or None,
                     "test": results.get("test") or {},
                     "worst_slices": (results.get("worst_slices") or {}).get(edge_model) or [],
                     "limitations": _limitations(gates, results.get("flags") or [], edge_model)},
        "lineage": {
            "teacher": {"name": tags.get("teacher.name"), "version": tags.get("teacher.version"),
                        "digest": tags.get("teacher.digest"), "license": tags.get("teacher.license") or "unknown",
                        "license_override": tags.get("license.override_reason"),
                        **({"replaces": {"version": tags["replaces.version"], "teacher": tags.get("replaces.teacher")}}
                           if tags.get("replaces.version") else {})},
            "student": tags.get("parent"), "data": {"digest": tags.get("data.digest"), "splits": data_inputs},
            "soft_labels": {"uri": tags.get("soft_labels.uri"), "key": tags.get("soft_labels.key"),
                            "digest": next(iter(((soft or {}).get("statement", {}).get("subject") or [{}])), {}
                                           ).get("digest", {}).get("sha256")},
            "steps": _steps(statements), "config_digest": tags.get("config.digest"),
            "code_version": tags.get("code.version"), "trigger": tags.get("trigger.reason"),
            "attestations": tags.get("attestation.uri"), "problems": list(problems)},
        "governance": {
            "owner": tags.get("owner"), "review": review_status(tags, today),
            "review_cadence_days": tags.get("review.cadence_days"),
            "approver": ({"name": tags["promotion.approver"], "at": tags.get("promotion.at"),
                          "comment": tags.get("promotion.comment")} if tags.get("promotion.approver") else None),
            "waiver": ({"gates": tags["promotion.waiver"].split(","), "approver": (waiver.get("approver") or {}).get(
                "approver"), "reason": (waiver.get("parameters") or {}).get("reason"),
                        "record": tags.get("promotion.waiver.uri")} if tags.get("promotion.waiver") else None),
            "rollback": ({"by": tags["rollback.by"], "reason": tags.get("rollback.reason")}
                         if tags.get("rollback.by") else None)},
        "status": {"aliases": sorted(aliases or []), "as_of": datetime.now(timezone.utc).isoformat()},
        "verify": f"distill verify {ref}" + (f" --tracking-uri {tracking_uri}" if tracking_uri else ""),
    }


def dossier_statement(dossier: dict) -> dict:
    """The dossier as an in-toto Statement whose subject is the edge version's digest."""
    m = dossier["model"]
    return {"_type": "https://in-toto.io/Statement/v1",
            "subject": [{"name": f"{m['name']}/{m['version']}", "digest": {"sha256": m["digest"]}}],
            "predicateType": PREDICATE_TYPE, "predicate": dossier}


def _scope_of(client, mv, edge_folder: Path | None, tmp: Path) -> tuple[dict | None, str | None]:
    try:
        if edge_folder is None:
            from distill_gap.registry.versions import version_folder

            download(client, mv.source, tmp / "edge")
            edge_folder = version_folder(tmp / "edge", mv.source)
        path = Path(edge_folder) / "scope.json"
        return (read_json_object(path, "re-run the pipeline: the evaluate stage writes scope.json")
                if path.is_file() else None), None
    except Exception as err:  # noqa: BLE001 - a missing scope is a finding of the dossier
        return None, f"the edge folder is not readable: {getattr(err, 'problem', err)}"


def dossier_for(client, mv, *, keys: list[str] | None = None, edge_folder: Path | None = None,
                today: date | None = None) -> dict:
    """Compile the dossier of a registered edge version from the registry (keys: the trusted public keys of the
    step Statements; default the key the version records)."""
    tags = dict(mv.tags)
    keys = keys or [tags.get("signing.public_key", "")]
    from distill_gap.signing import statement_payload

    with tempfile.TemporaryDirectory() as t:
        statements, problems = load_statements(client, tags.get("attestation.uri"), keys, Path(t))
        waiver_uri = tags.get("promotion.waiver.uri")
        if waiver_uri:  # the waiver is signed by the approver's own key, checked by `distill verify`
            try:
                env = json.loads(download(client, waiver_uri, Path(t) / "waiver.d").read_text())
                statements["waiver"] = {"statement": statement_payload(env), "uri": waiver_uri, "sha256": None}
            except Exception as err:  # noqa: BLE001
                problems.append(f"the waiver at {waiver_uri} is not readable: {err}")
        scope, scope_problem = _scope_of(client, mv, edge_folder, Path(t))
    here = list(mv.aliases or [])  # the aliases pointing at this version now
    return compile_dossier(name=mv.name, version=int(mv.version), tags=tags, statements=statements,
                           problems=problems, scope_record=scope, aliases=here, scope_problem=scope_problem,
                           tracking_uri=_public_uri(client), today=today)


def _public_uri(client) -> str | None:
    uri = client._registry_uri or ""
    return uri if uri and "@" not in uri else None  # never a URI with credentials in it


def write_model_card(client, edge, *, name: str, tags: dict, governance) -> None:
    """README.md in the edge folder (Hugging Face model card), from the records the dossier is compiled from."""
    from distill_gap.governance.dossier_render import model_card
    from distill_gap.registry.versions import ownership_tags
    from distill_gap.signing import signing_key

    with tempfile.TemporaryDirectory() as tmp:
        statements, problems = load_statements(client, tags.get("attestation.uri"),
                                               [signing_key(governance).public_pem], Path(tmp))
    scope = Path(edge.path) / "scope.json"
    d = compile_dossier(name=name, version=None, tags={**ownership_tags(governance), **tags}, statements=statements,
                        problems=problems, scope_record=read_json_object(scope, "re-run the pipeline")
                        if scope.is_file() else None)
    (Path(edge.path) / "README.md").write_text(model_card(d, library=edge.artifacts[edge.primary].get("runtime")
                                                          or "transformers"))


def publish(client, mv, governance, *, edge_folder: Path | None = None, staged=None, log=print) -> str:
    """Compile, sign and log the dossier (JSON and HTML) on the version's run; tag the version `dossier.uri`."""
    from distill_gap.governance.dossier_render import render_dossier
    from distill_gap.signing import sign_statement, signing_key

    dossier = dossier_for(client, mv, edge_folder=edge_folder)
    envelope = sign_statement(dossier_statement(dossier), signing_key(governance))
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "dossier.dsse.json").write_text(json.dumps(envelope, indent=2))
        (Path(tmp) / "dossier.html").write_text(render_dossier(dossier))
        client.log_artifacts(mv.run_id, tmp, DOSSIER_DIR)
    if staged is not None:  # removed again when the registration rolls back
        staged.artifacts += [(mv.run_id, f"{DOSSIER_DIR}/dossier.dsse.json"), (mv.run_id, f"{DOSSIER_DIR}/dossier.html")]
    uri = f"{client.get_run(mv.run_id).info.artifact_uri.rstrip('/')}/{DOSSIER_DIR}"
    client.set_model_version_tag(mv.name, str(mv.version), "dossier.uri", uri)
    log(f"dossier of {mv.name} v{mv.version}: {uri}/dossier.html ({dossier['evidence']['outcome']})")
    return uri


def check_published(client, mv, trusted: list[str], tmp: Path,
                    edge_folder: Path | None = None) -> list[tuple[str, bool, str]]:
    """`distill verify`'s check of the published dossier: signed by a trusted key, about this version's digest, and
    saying what the signed records say (gates and outcome, teacher, data, soft labels). `edge_folder`: the version's
    folder when the caller has downloaded it already (else it is downloaded again for its scope.json)."""
    from distill_gap.signing import SignatureError, subject_digests, verify_statement

    uri = mv.tags.get("dossier.uri")
    if not uri:
        return [("dossier", False, "no dossier.uri tag: the version has no published dossier")]
    try:
        env = json.loads(download(client, f"{uri}/dossier.dsse.json", tmp / "dossier.d").read_text())
        stmt = verify_statement(env, [k for k in trusted if k])
    except (SignatureError, ValueError, OSError) as err:
        return [("dossier", False, f"not verifiable at {uri}: {getattr(err, 'problem', err)}")]
    except Exception as err:  # noqa: BLE001 - not downloadable
        return [("dossier", False, f"not downloadable from {uri}: {err}")]
    if stmt.get("predicateType") != PREDICATE_TYPE:
        return [("dossier", False, f"{uri}/dossier.dsse.json is not a dossier (predicateType "
                                   f"{stmt.get('predicateType')})")]
    published, fresh = stmt["predicate"], dossier_for(client, mv, keys=trusted, edge_folder=edge_folder)
    subject = subject_digests(stmt).get(f"{mv.name}/{mv.version}")
    differ = [k for k, a, b in (
        ("subject", subject, mv.tags.get("model.digest")),
        ("gates", published["evidence"]["gates"], fresh["evidence"]["gates"]),
        ("outcome", published["evidence"]["outcome"], fresh["evidence"]["outcome"]),
        ("teacher", published["lineage"]["teacher"], fresh["lineage"]["teacher"]),
        ("data", published["lineage"]["data"], fresh["lineage"]["data"]),
        ("soft labels", published["lineage"]["soft_labels"], fresh["lineage"]["soft_labels"]),
        ("scope", published["scope"], fresh["scope"])) if a != b]
    if differ:
        return [("dossier", False, f"the published dossier differs from the signed records in: {', '.join(differ)}")]
    return [("dossier", True, f"signed, about digest {str(subject)[:12]}, and agrees with the signed records "
                              f"({published['evidence']['outcome']}, {len(published['evidence']['gates'])} gates)")]


def require_current_review(tags: dict, name: str, version: int, today: date | None = None) -> None:
    """Refuse to promote a version whose review date has passed: its evidence is due for a fresh look."""
    review = review_status(tags, today)
    if review["overdue"]:
        raise DistillError(f"{name} v{version}'s review was due {review['due'] or '(no review.due tag)'}: an expired "
                           "review cannot be promoted or waived", "re-run the pipeline for a fresh version with fresh "
                           "evidence (`distill run`), or roll back to a version whose review is current")
