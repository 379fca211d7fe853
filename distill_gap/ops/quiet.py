"""Library messages a user of `distill` cannot act on, silenced at the source (issue 23: output is for people).

Each is named exactly, so anything else a library says still shows:
- torch's pytree logger: "<enum ...> is an Enum subclass and is now natively supported by torch.compile ..."
  (torchao registers its enums at import; torch deprecates that, nothing for a user to change);
- torchao's "Failed to load .../torchao/_C_*.so" at import: the wheel ships CUDA and other-Python builds of its
  kernels beside the CPU ones, and says so for each one it cannot load;
- torch's TracerWarning "torch.tensor results are registered as constants in the trace" during the ONNX export of
  transformers' attention mask (it says itself it can be ignored), and "Converting a tensor to a Python boolean
  might cause the trace to be incorrect" from torch.nn.functional's embedding (RoBERTa and XLM-R teachers: the
  padding-index check, a constant); the exported graph's logits are compared with torch's on held-out texts anyway;
- torch's FutureWarning "`isinstance(treespec, LeafSpec)` is deprecated" (raised inside torch.export for INC);
- Intel Neural Compressor's own logger below ERROR ("Auto detect accelerator: CPU_Accelerator", "hw aligned
  scales not supported for device ..."): INC resets its logger's level and handlers from $LOGLEVEL when it first
  loads, so a filter on the logger (which it keeps) does the work;
- ONNX Runtime's quantizer: "Please consider (to run) pre-processing before quantization" (on the root logger; the
  project's graph is exported for it) and "... doesn't support int4 data type. Force to update it to ..." (it then
  does so itself);
- torchao's "Detected no triton" (CPU machines have none; the kernels that need it are not used);
- MLflow's INFO lines about its own bookkeeping ("Creating initial MLflow database tables...", "Updating database
  tables", "Validating input example against model signature").
- Prefect's traceback under "Task run failed with exception" / "Encountered exception during execution" when the
  exception is one of the project's own errors (DistillError: a failed gate, bad input): its message already names
  the problem and the fix, and the command ends with them; the line itself stays. Any other exception keeps its
  traceback (a bug must be readable).
LOGLEVEL=DEBUG shows everything.
"""

from __future__ import annotations

import logging
import os
import warnings

_DONE = False


class _Drop(logging.Filter):
    def __init__(self, *, below: int = 0, containing: str | None = None):
        super().__init__()
        self.below, self.containing = below, containing

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < self.below:
            return False
        return not (self.containing and self.containing in record.getMessage())


class _NoTracebackForKnownErrors(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        from distill_gap.errors import DistillError

        if record.exc_info and isinstance(record.exc_info[1], DistillError):
            record.exc_info, record.exc_text = None, None
        return True


def quiet_libraries() -> None:
    """Install the filters once per process (idempotent)."""
    global _DONE
    if _DONE or os.environ.get("LOGLEVEL", "").upper() == "DEBUG":
        return
    _DONE = True
    logging.getLogger("torch.utils._pytree").addFilter(
        _Drop(containing="is an Enum subclass and is now natively supported by torch.compile"))
    logging.getLogger("neural_compressor").addFilter(_Drop(below=logging.ERROR))
    logging.getLogger("torchao").addFilter(_Drop(containing="/torchao/_C"))
    logging.getLogger().addFilter(_Drop(containing="pre-processing before quantization"))
    logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer").addFilter(
        _Drop(containing="doesn't support int4 data type. Force to update"))
    logging.getLogger("torchao.kernel.intmm").addFilter(_Drop(containing="Detected no triton"))
    for name in ("prefect.task_runs", "prefect.flow_runs"):
        logging.getLogger(name).addFilter(_NoTracebackForKnownErrors())
    logging.getLogger("mlflow.store.db.utils").addFilter(_Drop(below=logging.WARNING))
    logging.getLogger("mlflow.pyfunc").addFilter(_Drop(containing="Validating input example against model signature"))
    warnings.filterwarnings("ignore", message="torch.tensor results are registered as constants in the trace")
    warnings.filterwarnings("ignore", message="Converting a tensor to a Python boolean might cause the trace",
                            module="torch.nn.functional")
    warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated",
                            category=FutureWarning)
