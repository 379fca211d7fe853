"""Model folders as MLflow models (pyfunc, from code) and data splits as MLflow run inputs.

`log_model_folder` logs a model folder (a transformers classifier or an edge folder) as an MLflow 3 logged
model with a signature and an input example, linked to the pipeline's run as an output. The folder is stored
byte for byte as the pyfunc artifact `model`; the registry version's source points at that folder, so
`distill_gap.registry.versions.fetch_model` downloads and digest-checks exactly the model files, while the MLflow
model around it (MLmodel, environment, this file as its code) serves `mlflow.pyfunc.load_model("models:/<model_id>")`.

This file is also the model's code (MLflow "models from code", no pickle): MLflow copies it into the logged
model and executes it under another module name, where the last line hands it the `DistillClassifier` to load.
Keep its top-level imports light and its top-level code free of side effects.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
from mlflow.pyfunc import PythonModel

from distill_gap.edge.folder import EDGE_FILE, read_manifest

ARTIFACT_KEY = "model"  # context.artifacts[ARTIFACT_KEY] is the model folder
TEXT_COLUMN = "text"
LABEL_COLUMN = "label"
PROB_PREFIX = "prob_"
MAX_EXAMPLES = 5  # texts in the input example
MODEL_TYPE = "text-classifier"


# ----------------------------------------------------------------------------------------------------------------
# the pyfunc model


def _texts(model_input) -> list[str]:
    """The texts of a pyfunc input: a DataFrame with a `text` column (or one column), a Series, texts, one text."""
    if isinstance(model_input, pd.DataFrame):
        if TEXT_COLUMN in model_input.columns:
            column = model_input[TEXT_COLUMN]
        elif model_input.shape[1] == 1:
            column = model_input.iloc[:, 0]
        else:
            raise ValueError(f"the input needs a '{TEXT_COLUMN}' column, got columns {list(model_input.columns)}")
        return [str(t) for t in column.tolist()]
    if isinstance(model_input, str):
        return [model_input]
    if isinstance(model_input, dict) and TEXT_COLUMN in model_input:
        return _texts(pd.DataFrame({TEXT_COLUMN: np.atleast_1d(model_input[TEXT_COLUMN]).tolist()}))
    if isinstance(model_input, (pd.Series, np.ndarray, list, tuple)):
        return [str(t[TEXT_COLUMN]) if isinstance(t, dict) else str(t) for t in list(model_input)]
    raise ValueError(f"cannot read texts from a {type(model_input).__name__}: pass a DataFrame with a "
                     f"'{TEXT_COLUMN}' column or a list of strings")


def predictions_frame(logits: np.ndarray, labels: Sequence[str]) -> pd.DataFrame:
    """`label` (argmax) and one `prob_<label>` column (softmax, float64) per label, from logits (N, C)."""
    logits = np.asarray(logits, dtype=np.float64).reshape(-1, len(labels))  # (N, C)
    shifted = logits - logits.max(axis=-1, keepdims=True) if len(logits) else logits
    probs = np.exp(shifted)
    probs /= probs.sum(axis=-1, keepdims=True) if len(probs) else 1.0  # (N, C), rows sum to 1
    out = pd.DataFrame({LABEL_COLUMN: pd.Series([labels[i] for i in probs.argmax(axis=-1)] if len(probs) else [],
                                                dtype=object)})
    for j, label in enumerate(labels):
        out[f"{PROB_PREFIX}{label}"] = probs[:, j]
    return out


class DistillClassifier(PythonModel):
    """A text classifier folder as a pyfunc: an edge folder (edge.json, its primary artifact) or a transformers one.

    model_config: `batch_size` (default 32) and, for a transformers folder, `max_length` (default 128; an edge
    folder carries its own in edge.json).
    """

    def load_context(self, context):
        folder = Path(context.artifacts[ARTIFACT_KEY])
        config = dict(context.model_config or {})
        self.batch_size = int(config.get("batch_size", 32))
        if (folder / EDGE_FILE).is_file():
            from distill_gap.edge.serving import load_edge

            self.edge = load_edge(folder)
            self.labels = list(self.edge.labels)
        else:
            self.edge = None
            from distill_gap.inference.predictor import load_predictor

            predictor = load_predictor(folder, runtime="transformers", max_length=int(config.get("max_length", 128)))
            self.labels = list(predictor.labels)

            def logits(texts, batch_size):
                return predictor.predict_logits(texts, batch_size=batch_size)

            self._logits = logits

    # pd.DataFrame: MLflow takes the schema from the signature and does not warn about a missing type hint
    def predict(self, context, model_input: pd.DataFrame, params=None) -> pd.DataFrame:
        """An edge folder answers as `distill predict` does: calibrated probabilities, `in_scope`, `scope_score`,
        `route`, and out-of-scope rows abstain (label None, route "fallback") unless params={"out_of_scope":
        "answer"}. A transformers folder gives label and raw probabilities."""
        texts = _texts(model_input)
        if self.edge is None:
            logits = self._logits(texts, self.batch_size) if texts else np.zeros((0, len(self.labels)))
            return predictions_frame(logits, self.labels)
        out_of_scope = str((params or {}).get("out_of_scope", "abstain"))
        column = self.edge.guard.region_column if self.edge.guard is not None else None
        regions = model_input[column].tolist() if isinstance(model_input, pd.DataFrame) and column \
            and column in model_input.columns else [None] * len(texts)  # a row's region: scope.json `regions`
        rows = self.edge.predict_rows([{"id": i, "text": t, "meta": {column: r} if isinstance(r, str) else {}}
                                       for i, (t, r) in enumerate(zip(texts, regions))], self.batch_size,
                                      out_of_scope=out_of_scope) if texts else []
        frame = pd.DataFrame({LABEL_COLUMN: pd.Series([r["label"] for r in rows], dtype=object)})
        for label in self.labels:
            frame[f"{PROB_PREFIX}{label}"] = pd.Series([r["probabilities"][label] for r in rows], dtype="float64")
        for key, dtype in (("in_scope", object), ("scope_score", "float64"), ("route", object)):
            frame[key] = pd.Series([r[key] for r in rows], dtype=dtype)
        return frame


# ----------------------------------------------------------------------------------------------------------------
# logging a model folder


@dataclass(frozen=True)
class LoggedModel:
    """Where a logged model folder went.

    source: the URI of the model folder inside the logged model (its last component is a folder holding
        exactly the files of the local folder): the `source` of a registry version, what fetch_model downloads.
    model_id: the MLflow 3 logged model id, for `create_model_version(..., model_id=model_id)`.
    model_uri: `models:/<model_id>`, the MLflow model (`mlflow.pyfunc.load_model(model_uri)`).
    """

    source: str
    model_id: str | None
    model_uri: str


def folder_labels(local_dir: str | Path) -> list[str]:
    """The label order of a model folder: edge.json's labels (manifest checked), else config.json's id2label."""
    from distill_gap.models.loading import config_labels

    folder = Path(local_dir)
    if (folder / EDGE_FILE).is_file():
        return list(read_manifest(folder)["labels"])
    return config_labels(folder)


def model_signature(labels: Sequence[str], *, edge: bool = False, region_column: str | None = None):
    """Input: a `text` string column; output: `label` (string) and `prob_<label>` (double) per label; an edge
    folder adds `in_scope`, `scope_score`, `route` and the `out_of_scope` parameter ("abstain" or "answer"), and
    an optional input column `region_column` when its scope guard has regions (scope.json `regions`)."""
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema

    outputs = [ColSpec("string", LABEL_COLUMN, required=not edge)] + \
        [ColSpec("double", f"{PROB_PREFIX}{l}") for l in labels]
    if not edge:
        return ModelSignature(inputs=Schema([ColSpec("string", TEXT_COLUMN)]), outputs=Schema(outputs))
    outputs += [ColSpec("boolean", "in_scope", required=False), ColSpec("double", "scope_score", required=False),
                ColSpec("string", "route")]
    inputs = [ColSpec("string", TEXT_COLUMN)] + ([ColSpec("string", region_column, required=False)]
                                                 if region_column else [])
    return ModelSignature(inputs=Schema(inputs), outputs=Schema(outputs),
                          params=ParamSchema([ParamSpec("out_of_scope", "string", "abstain")]))


def region_column(folder: Path) -> str | None:
    """The input column an edge folder's scope guard reads regions from (None: no regions, or not an edge folder)."""
    from distill_gap.edge.guard import read_guard
    from distill_gap.errors import DistillError

    try:
        guard = read_guard(folder) if (folder / EDGE_FILE).is_file() else None
    except DistillError:  # a damaged guard: serving refuses it by name; the signature just has no region column
        return None
    return guard.region_column if guard is not None else None


def pip_requirements() -> list[str]:
    """Pinned explicitly, so MLflow does not load the model in a subprocess to infer them."""
    from importlib.metadata import version

    return [f"distill-gap=={version('distill-gap')}", f"mlflow=={version('mlflow')}"]


@contextlib.contextmanager
def _tracking_uri(uri: str):
    """mlflow.log_model writes to the fluent tracking URI: point it at the client's store meanwhile."""
    import mlflow
    from mlflow.tracking._tracking_service import utils

    if mlflow.get_tracking_uri() == uri:
        yield
        return
    saved, saved_env = utils._tracking_uri, os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(uri)
    try:
        yield
    finally:
        utils._tracking_uri = saved
        if saved_env is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = saved_env


def log_model_folder(client, run_id: str, local_dir: str | Path, name: str, *, example_texts: Sequence[str],
                     labels: Sequence[str], max_length: int = 128, batch_size: int = 32,
                     tags: dict[str, str] | None = None) -> LoggedModel:
    """Log `local_dir` as an MLflow pyfunc model named `name`, an output of run `run_id` (whose status is kept).

    The model has a signature (`text` in; `label` and `prob_<label>` out), an input example of the first few
    `example_texts`, and explicit pip requirements. `labels` must be the folder's label order. The logged model
    is tagged `model.digest` (distill_gap.digest.model_digest of the folder) and with `tags`.

    Register it with `create_model_version(name, source=logged.source, run_id=run_id, model_id=logged.model_id)`:
    fetch_model then downloads exactly the folder. A SQLite/file registry does not store the version's model_id
    (MLflow 3.17), and `models:/<name>/<version>` resolves to the folder, not to an MLflow model: load the pyfunc
    with `mlflow.pyfunc.load_model(logged.model_uri)`, and keep that URI on the version (a tag) to find it again.
    """
    import mlflow
    from mlflow.entities import LoggedModelOutput

    from distill_gap.digest import model_digest
    from distill_gap.errors import DistillError

    folder = Path(local_dir)
    if not folder.is_dir():
        raise DistillError(f"model folder {folder} does not exist", "log the folder the stage wrote")
    labels = [str(label) for label in labels]
    found = folder_labels(folder)
    if found != labels:
        raise DistillError(f"{folder} predicts labels {found}, but {labels} were given for its signature",
                           "pass the folder's labels in the order of its logits (data.labels)")
    examples = [str(t) for t in example_texts if isinstance(t, str) and t.strip()][:MAX_EXAMPLES]
    if not examples:
        raise DistillError("no example texts for the model's input example", "pass a few texts of the data")
    active = mlflow.active_run()
    if active is not None and active.info.run_id != run_id:
        # mlflow.pyfunc.log_model links the model to the thread's active run, if any
        raise DistillError(f"an MLflow run ({active.info.run_id}) is active in this thread, not {run_id}",
                           "end the active run, or log into it")
    tags = {"model.digest": model_digest(folder), **{k: str(v) for k, v in (tags or {}).items()}}
    run = client.get_run(run_id)
    with _tracking_uri(client._tracking_client.tracking_uri):
        logged = client.create_logged_model(run.info.experiment_id, name=name, source_run_id=run_id, tags=tags,
                                            model_type=MODEL_TYPE)
        info = mlflow.pyfunc.log_model(
            python_model=__file__,
            artifacts={ARTIFACT_KEY: str(folder.resolve())},
            signature=model_signature(labels, edge=(folder / EDGE_FILE).is_file(), region_column=region_column(folder)),
            input_example=pd.DataFrame({TEXT_COLUMN: examples}),
            pip_requirements=pip_requirements(),
            model_config={"max_length": int(max_length), "batch_size": int(batch_size)},
            model_id=logged.model_id,
        )
        if active is None:  # with run_id active, log_model has linked it already
            client.log_outputs(run_id, [LoggedModelOutput(logged.model_id, step=0)])
    inner = info.flavors["python_function"]["artifacts"][ARTIFACT_KEY]["path"]  # artifacts/<folder name>
    source = f"{logged.artifact_location.rstrip('/')}/{inner}"
    return LoggedModel(source=source, model_id=logged.model_id, model_uri=f"models:/{logged.model_id}")


def link_version(client, logged: LoggedModel, name: str, version: int | str) -> None:
    """Record registry version `name`/`version` on its logged model, as mlflow.register_model does.

    The `mlflow.modelVersions` tag is what the MLflow UI lists as the logged model's registered versions;
    MlflowClient.create_model_version does not set it.
    """
    import json

    from mlflow.utils.mlflow_tags import MLFLOW_MODEL_VERSIONS

    if logged.model_id is None:
        return
    model = client.get_logged_model(logged.model_id)
    versions = json.loads(model.tags.get(MLFLOW_MODEL_VERSIONS) or "[]")
    entry = {"name": name, "version": str(version)}
    if entry not in versions:
        client.set_logged_model_tags(logged.model_id, {MLFLOW_MODEL_VERSIONS: json.dumps(versions + [entry])})


# ----------------------------------------------------------------------------------------------------------------
# data splits as run inputs

DATASET_DIGEST_CHARS = 16  # of split_digest, as MLflow's dataset digest (a column of at most 36 characters)
_COLSPEC_TYPES = {"string": "string", "empty": "string", "integer": "long", "floating": "double",
                  "mixed-integer-float": "double", "boolean": "boolean", "datetime64": "datetime",
                  "datetime": "datetime", "bytes": "binary"}


def _frame_schema(df: pd.DataFrame) -> str | None:
    """The dataset schema MLflow shows, from pandas' C-level type inference.

    (mlflow.data.from_pandas infers it value by value in Python: about 2.5 s per 160k rows of 4 columns.)
    A column of mixed types gives no schema at all: validation reports such rows.
    """
    import json

    from mlflow.types import ColSpec, Schema

    specs = []
    for name in df.columns:
        kind = _COLSPEC_TYPES.get(pd.api.types.infer_dtype(df[name], skipna=True))
        if kind is None:
            return None
        specs.append(ColSpec(kind, str(name), required=not bool(df[name].isna().any())))
    return json.dumps({"mlflow_colspec": Schema(specs).to_dict()})


def _dataset_source(uri: str | None, split: str):
    """A DatasetSource for a data URI (path, file://, s3://, https://); anything else is described by tags."""
    import warnings

    from mlflow.data.code_dataset_source import CodeDatasetSource
    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.exceptions import MlflowException

    if uri:
        try:
            with warnings.catch_warnings():  # a local path matches MLflow's two local-artifact sources (same class
                # name, same result: it takes the last); the warning says nothing a user could act on
                warnings.filterwarnings("ignore", message="The specified dataset source can be interpreted in")
                return resolve_dataset_source(uri)
        except MlflowException:  # e.g. builtin:drugreview/train
            pass
    return CodeDatasetSource({"distill.split": split, **({"distill.data.uri": uri} if uri else {})})


def split_dataset_input(name: str, df: pd.DataFrame, *, columns: Sequence[str], source: str | None = None,
                        digest: str | None = None, context: str = "training"):
    """The DatasetInput of split `name`: its canonical columns, our digest over all rows, its row count."""
    import json

    from mlflow.entities import Dataset, DatasetInput, InputTag
    from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

    from distill_gap.data.splits import split_digest

    frame = df[[c for c in columns if c in df.columns]]
    digest = digest or split_digest(frame)
    src = _dataset_source(source, name)
    dataset = Dataset(name=name, digest=digest[:DATASET_DIGEST_CHARS], source_type=src._get_source_type(),
                      source=src.to_json(), schema=_frame_schema(frame),
                      profile=json.dumps({"num_rows": len(frame), "num_elements": int(frame.size)}))
    return DatasetInput(dataset, tags=[InputTag(MLFLOW_DATASET_CONTEXT, name), InputTag("distill.sha256", digest),
                                       InputTag("distill.rows", str(len(frame))), InputTag("distill.context", context)])


def log_split_inputs(client, run_id: str, splits, *, context: str = "training", sources: dict[str, str] | None = None,
                     digests: dict[str, str] | None = None) -> None:
    """Log every split of `splits` (a tasks.data.Splits) as a dataset input of run `run_id`.

    Each input is named after its split ("train", "validation", "test", "ood:<name>"), with the tags
    `mlflow.data.context` (the split name), `distill.sha256` (tasks.data.split_digest over all rows; MLflow's own
    dataset digest samples rows, so the dataset's digest is a prefix of ours instead), `distill.rows` and
    `distill.context` (`context`, the stage that used the data). `sources` maps split names to their data URIs;
    `digests` (split name -> split_digest), when already computed, saves hashing the rows again.
    Only the canonical columns (id, text, label) and the slice columns are described, never the rows.
    """
    from distill_gap.data.splits import CANONICAL

    columns = list(CANONICAL) + [c for c in splits.slice_columns if c not in CANONICAL]
    inputs = [split_dataset_input(name, df, columns=columns, source=(sources or {}).get(name),
                                  digest=(digests or {}).get(name), context=context)
              for name, df in splits.frames.items()]
    client.log_inputs(run_id, datasets=inputs)


# ----------------------------------------------------------------------------------------------------------------
# the model code's entry point: only when MLflow executes this file as the model (not on `import tasks...`)

if __name__ != "distill_gap.registry.pyfunc":
    import mlflow.models

    mlflow.models.set_model(DistillClassifier())
