"""Library messages a user cannot act on are dropped by name; everything else the same libraries say still shows
(issue 23: output is for people)."""

import logging
import warnings

import flows  # noqa: F401  (installs the filters, as every `distill` command does)


class _Keep(logging.Handler):
    def __init__(self):
        super().__init__()
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def _said(logger_name: str, *calls) -> list[str]:
    logger, keep = logging.getLogger(logger_name), _Keep()
    level = logger.level
    logger.addHandler(keep)
    logger.setLevel(logging.DEBUG)  # what the level lets through is not the question: the filters are
    try:
        for at, message in calls:
            logger.log(at, message)
    finally:
        logger.removeHandler(keep)
        logger.setLevel(level)
    return keep.messages


def test_the_named_messages_are_dropped_and_the_rest_still_shows():
    enum = ("<enum 'KernelPreference'> is an Enum subclass and is now natively supported by torch.compile as an "
            "opaque value type.")
    assert _said("torch.utils._pytree", (logging.WARNING, enum), (logging.WARNING, "another pytree warning")) == [
        "another pytree warning"]
    assert _said("torchao", (logging.WARNING, "Failed to load /x/site-packages/torchao/_C_mxfp8.cpython-310-x86_64-"
                                              "linux-gnu.so: Could not load this library"),
                 (logging.WARNING, "another torchao warning")) == ["another torchao warning"]
    assert _said("", (logging.WARNING, "Please consider to run pre-processing before quantization. Refer to ..."),
                 (logging.WARNING, "a root warning")) == ["a root warning"]
    assert _said("onnxruntime.quantization.matmul_nbits_quantizer",
                 (logging.WARNING, "The opset of the input model is under 21 and doesn't support int4 data type. "
                                   "Force to update it to opset 21"), (logging.WARNING, "other")) == ["other"]
    assert _said("torchao.kernel.intmm", (logging.WARNING, "Warning: Detected no triton, on systems without ..."),
                 (logging.WARNING, "other")) == ["other"]
    from neural_compressor.common.utils.logger import Logger

    inc = Logger().get_logger()  # INC resets its logger's level and handlers here; the filter stays
    assert inc.name == "neural_compressor"
    assert _said("neural_compressor", (logging.WARNING, "Auto detect accelerator: CPU_Accelerator."),
                 (logging.ERROR, "quantization failed")) == ["quantization failed"]
    assert _said("mlflow.store.db.utils", (logging.INFO, "Creating initial MLflow database tables..."),
                 (logging.WARNING, "database is locked")) == ["database is locked"]
    assert _said("mlflow.pyfunc", (logging.INFO, "Validating input example against model signature"),
                 (logging.INFO, "another pyfunc line")) == ["another pyfunc line"]
    _a_known_error_is_logged_without_its_traceback_and_a_bug_with_it()
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("default")
        from distill_gap.ops.quiet import quiet_libraries
        import distill_gap.ops.quiet as quiet

        quiet._DONE = False  # catch_warnings reset the filters: install them again inside it
        quiet_libraries()
        warnings.warn("`isinstance(treespec, LeafSpec)` is deprecated, use ...", FutureWarning)
        warnings.warn("torch.tensor results are registered as constants in the trace. You can safely ignore ...")
        warnings.warn("something else is deprecated", FutureWarning)
    assert [str(w.message) for w in seen] == ["something else is deprecated"]


def _a_known_error_is_logged_without_its_traceback_and_a_bug_with_it():
    """Prefect logs a failed task or flow with exc_info; a DistillError (a failed gate: its message names the
    problem and the fix) keeps the line and loses the traceback, anything else keeps both."""
    import io

    from distill_gap.evaluation.gates import GatesFailed

    for name in ("prefect.task_runs", "prefect.flow_runs"):
        logger, out = logging.getLogger(name), io.StringIO()
        saved = logger.handlers[:], logger.propagate
        logger.handlers, logger.propagate = [logging.StreamHandler(out)], False  # not Prefect's API log handler
        try:
            for exc in (GatesFailed("demo-edge: gates failed (recall:negative)", "read the gap report"),
                        KeyError("a bug")):
                try:
                    raise exc
                except Exception as err:
                    logger.error("Task run failed with exception: %r", err, exc_info=True)
        finally:
            logger.handlers, logger.propagate = saved
        text = out.getvalue()
        assert "Task run failed with exception: GatesFailed(" in text and "Task run failed with exception: KeyError(" in text
        assert text.count("Traceback (most recent call last)") == 1 and "KeyError: 'a bug'" in text
