"""Attestations: one signed in-toto Statement per compression step (DESIGN.md, accountability 2).

Each step (soft-labels, distill, quantize, export, evaluate, promote) is its own point of accountability:
its Statement's subjects are the step's output digests and its predicate holds the technique, parameters,
input digests, a summary of the data distribution, thresholds, measured results and the approver. The
Statements are signed (DSSE, distill_gap.signing) with the local key and logged to the pipeline's MLflow run
under `attestations/<step>.dsse.json`; `distill verify` checks them offline.
"""

from __future__ import annotations

import json
import tempfile
from datetime import datetime, timezone
from pathlib import Path

from distill_gap.digest import sha256_json
from distill_gap.registry.tracking import code_version

STEPS = ("soft-labels", "distill", "quantize", "export", "evaluate", "promote", "waiver", "approval")
PREDICATE_TYPE = "https://distill-gap.dev/attestation/v1"
ATTESTATION_DIR = "attestations"


def statement(step: str, subjects: dict[str, str], *, technique: str, parameters: dict, inputs: dict[str, str],
              data: dict | None = None, thresholds: dict | None = None, results: dict | None = None,
              approver: dict | None = None, context: dict | None = None) -> dict:
    """An in-toto Statement v1 for one step; `subjects` and `inputs` map names to sha256 digests."""
    assert step in STEPS, step
    return {
        "_type": "https://in-toto.io/Statement/v1",
        "subject": [{"name": n, "digest": {"sha256": d}} for n, d in subjects.items()],
        "predicateType": PREDICATE_TYPE,
        "predicate": {
            "step": step, "technique": technique, "parameters": parameters,
            "inputs": [{"name": n, "digest": {"sha256": d}} for n, d in inputs.items()],
            "data": data or {}, "thresholds": thresholds or {}, "results": results or {},
            "approver": approver,
            "produced_by": {"code_version": code_version(), "created_at": datetime.now(timezone.utc).isoformat(),
                            **(context or {})},
        },
    }


def record(client, run_id: str, governance, stmt: dict) -> str:
    """Sign a Statement and log it to the run; return the artifact URI of the envelope."""
    from distill_gap.signing import sign_statement, signing_key

    envelope = sign_statement(stmt, signing_key(governance))
    step = stmt["predicate"]["step"]
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / f"{step}.dsse.json").write_text(json.dumps(envelope, indent=2))
        client.log_artifacts(run_id, tmp, ATTESTATION_DIR)
    return f"{client.get_run(run_id).info.artifact_uri.rstrip('/')}/{ATTESTATION_DIR}/{step}.dsse.json"


# ---------------------------------------------------------------------------------------------
# the Statement of each step


def soft_labels_digest(soft) -> str:
    """The soft labels' identity: the digest of their manifest (which lists every shard's sha256)."""
    return sha256_json(soft.manifest)


def soft_labels_statement(sl, *, max_length: int, soft, teacher, splits, context: dict) -> dict:
    """The teacher's logits for every training row (`sl`: the soft_labels config section)."""
    aug = getattr(soft, "extra", None)  # distill.augment / redistill: the extra rows' own entry, a second subject
    subjects = {f"soft-labels/{soft.key}": soft_labels_digest(soft)}
    inputs = {f"{teacher.name}/{teacher.version}": teacher.digest, "data/train": splits.digests()["train"]}
    if aug is not None:
        subjects[f"soft-labels/{aug.soft.key}"] = soft_labels_digest(aug.soft)
        inputs["extra-rows"] = aug.digest  # not data/: those are the splits
        if aug.production:
            inputs["production-sample"] = aug.production["sha256"]
    return statement(
        "soft-labels", subjects,
        technique="teacher logits for every training example, raw (temperature applied at training time)"
                  + ("; and for the extra rows (edited training texts, unlabelled in-domain texts, production rows, "
                     "feedback answers) under their own key" if aug is not None else ""),
        parameters={"max_length": max_length, "dtype": sl.dtype, "top_k": sl.top_k, "engine": sl.engine,
                    "shard_size": sl.shard_size, "store": soft.uri, "key": soft.key},
        inputs=inputs,
        data={"train": splits.summary()["train"], **({"extra": aug.summary()} if aug is not None else {})},
        results={"examples": len(soft.ids), "cache_hit": soft.hit, "labelled": soft.labelled,
                 "seconds": round(soft.seconds, 2), "repaired_shards": soft.repaired,
                 **({"extra_examples": len(aug.soft.ids), "extra_cache_hit": aug.soft.hit}
                    if aug is not None else {})},
        context=context)


def distill_statement(d, *, seed: int, student_model_name: str, student, soft, teacher, splits,
                      context: dict, sweep: dict | None = None) -> dict:
    """The student trained on the soft labels (`d`: the distill config section; `seed`: the one it trained with). A
    student chosen by the size sweep (`sweep`: the candidates and the choice) also names the test split, on which the
    choice was made."""
    vocab = getattr(student, "vocab", None)  # distill.vocab.trim: tokens kept (the mapping is in the folder)
    pruning = getattr(student, "pruning", None)  # distill.prune: what was removed before training
    aug = getattr(soft, "extra", None)  # extra rows: distill.augment's, redistill's
    return statement(
        "distill", {student_model_name: student.digest},
        technique=(f"knowledge distillation: alpha*CE(hard) + (1-alpha)*T^2*{d.divergence}(teacher_T || student_T)"
                   + (f" + {d.hidden_loss} hidden-state loss" if d.hidden_loss != "none" else "")
                   + (" + attention KL" if d.attention_loss else "")
                   + ("; vocabulary trimmed to the pieces the training texts use" if vocab else "")
                   + ("; attention heads and FFN neurons pruned by importance before training" if pruning else "")
                   + (f"; chosen by the size sweep from {len(sweep['candidates'])} candidates" if sweep else "")
                   + (f"; {len(aug.frame)} extra teacher-labelled rows (KD term; a person's answer as the hard label where "
                         "there is one)" if aug is not None
                      else "")),
        parameters={**d.model_dump(mode="json"), "student_spec": student.spec, "seed": seed},
        inputs={f"{teacher.name}/{teacher.version}": teacher.digest, f"soft-labels/{soft.key}": soft_labels_digest(soft),
                "data/train": splits.digests()["train"], "data/validation": splits.digests()["validation"],
                **({"data/test": splits.digests()["test"]} if sweep else {}),
                **({f"soft-labels/{aug.soft.key}": soft_labels_digest(aug.soft), "extra-rows": aug.digest}
                   if aug is not None else {})},
        data={**{k: v for k, v in splits.summary().items() if k in ("train", "validation")},
              **({"extra": aug.summary()} if aug is not None else {})},
        results={"parameters": student.parameters, "best_epoch": student.best_epoch,
                 f"best_val_{d.select_metric}": student.best_val_metric, "seconds": round(student.seconds, 1),
                 "history": student.history, **({"vocab": vocab} if vocab else {}),
                 **({"pruning": pruning} if pruning else {}), **({"sweep": sweep} if sweep else {})},
        context=context)


def quantize_statement(q, *, min_edge_agreement: float, student_model_name: str, edge, student, splits,
                       context: dict) -> dict:
    """INT8 artifacts: INC autotune (every trial) and ONNX Runtime INT8, checked against the fp32 student."""
    subjects = {f"edge/{n}": a["digest"] for n, a in edge.artifacts.items() if n in ("int8", "onnx-int8")}
    if not subjects:  # quantization impossible: the edge model is the fp32 student, and the Statement says so
        subjects = {f"edge/{edge.primary}": edge.artifacts[edge.primary]["digest"]}
    return statement(
        "quantize", subjects,
        technique="Intel Neural Compressor accuracy-aware autotune (PT2E INT8) and ONNX Runtime INT8 MatMuls "
                  f"with static activation scales + {q.onnx_embedding_bits}-bit embeddings",
        parameters=q.model_dump(mode="json"),
        inputs={student_model_name: student.digest, "data/train (calibration, agreement sample)": splits.digests()["train"],
                "data/validation (tuning)": splits.digests()["validation"]},
        data={"validation": splits.summary()["validation"]},
        thresholds={"tolerable_loss": q.tolerable_loss, "min_edge_agreement": min_edge_agreement},
        results={"primary": edge.primary, "quantized": edge.quantized, "reason": edge.reason, "errors": edge.errors,
                 "tuning": edge.tuning,
                 "checks": {n: {k: a.get(k) for k in ("parity", "validation", "ok", "check", "size_bytes")}
                            for n, a in edge.artifacts.items()}},
        context=context)


def export_statement(*, max_length: int, min_edge_agreement: float, student_model_name: str, edge, student,
                     context: dict) -> dict | None:
    """The fp32 ONNX export (optimum); None when nothing was exported."""
    if "onnx" not in edge.artifacts:
        return None
    a = edge.artifacts["onnx"]
    return statement(
        "export", {"edge/onnx": a["digest"]},
        technique="optimum ONNX export of the fp32 student (dynamic batch and sequence axes)",
        parameters={"max_length": max_length, "runtime": a.get("runtime")},
        inputs={student_model_name: student.digest},
        thresholds={"min_edge_agreement": min_edge_agreement},
        results={k: a.get(k) for k in ("parity", "validation", "ok", "check", "size_bytes")}, context=context)


def evaluate_statement(ev, scope_cfg, *, critical_slices: dict, edge_model_name: str, report, gates: dict,
                       edge_digest: str, model_digests: dict[str, str], splits, context: dict,
                       edge_report_name: str | None = None) -> dict:
    """Every model evaluated on its own; the gates with their thresholds and measured values (`ev`: the evaluate
    config section; `scope_cfg`: the scope section, whose guard ships)."""
    test = report.suites.get("test", {})
    return statement(
        "evaluate", {edge_model_name: edge_digest},
        technique="evaluation parity: each model on test, slices, OOD sets, stress variants, calibration",
        parameters={"bootstrap_samples": ev.bootstrap_samples, "stress_rows": ev.stress_rows,
                    "scope": scope_cfg.model_dump(), "critical_slices": critical_slices},
        inputs={**{f"model/{m}": d for m, d in model_digests.items()},
                **{f"data/{s}": d for s, d in splits.digests().items()}},
        data=splits.summary(),
        thresholds={k: v for k, v in ev.model_dump().items() if k.startswith(("max_", "min_"))},
        results={"edge_model": edge_report_name,  # the edge model's name in the report (its primary artifact)
                 "test": {m: {k: v for k, v in r.items() if k in ("accuracy", "macro_f1", "fidelity", "n")}
                          for m, r in test.items()},
                 "gates": gates,  # every gate whole: value, threshold, outcome, interval, rows needed, evidence
                 "worst_slices": {m: report.worst_slices(m) for m in report.models if m != "teacher"},
                 "flags": report.flags},
        context=context)


def promote_statement(*, name: str, version: int, digest: str, action: str, approver: dict | None,
                      aliases_before: dict, aliases_after: dict, gates: dict | None, reason: str,
                      context: dict) -> dict:
    """Who moved which alias to which version, and on what evidence."""
    return statement(
        "promote", {f"{name}/{version}": digest},
        technique=f"registry alias move ({action})", parameters={"action": action, "reason": reason},
        inputs={f"{name}/{version}": digest}, thresholds={}, results={"aliases_before": aliases_before,
                                                                     "aliases_after": aliases_after,
                                                                     "gates": gates or {}},
        approver=approver, context=context)
