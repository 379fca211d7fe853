"""benchmarks/edge.py's workers: one artifact per process, loaded the lean way its runtime ships, driven by the
parent over stdin/stdout (JSON lines). `Proc` is the parent's handle; this file is also the worker's entry point:

    python benchmarks/edge_worker.py KIND PATH BATCH      (started by Proc, never by hand)
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from distill_gap.ops.runtime import apply_embedded_env  # noqa: E402

apply_embedded_env({"DISTILL_PROGRESS": "0"})

import numpy as np  # noqa: E402

THREADS = 2
MAX_LENGTH = 128
B32_BATCHES = 2        # timed batches of 32 per artifact and round (after one untimed call)
B1_CALLS = 20          # timed single-example calls per artifact and round (after one untimed call)


def _vm(field: str) -> float:
    """MB of a /proc/self/status field of THIS process (VmHWM: its own peak RSS; ru_maxrss would include the
    parent's memory image, which Linux carries into a child across fork + exec)."""
    kb = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith(field + ":"))
    return kb / 1024


class _Worker:
    """One artifact, loaded the lean way its runtime ships: torch + transformers for the eager models,
    distill_gap.inference.inc_int8.load_int8 for INC, onnxruntime + tokenizers (no torch,
    no transformers) for ONNX."""

    def __init__(self, kind: str, path: str, batch: int | None, texts: list[str], labels: list[str]):
        self.kind, self.path, self.batch, self.texts, self.labels = kind, path, batch, texts, labels

    # -- loading and first calls (warm-up / compile), reported apart from the steady state
    def load(self) -> dict:
        rec = {"rss_mb_start": _vm("VmRSS")}
        t0 = time.perf_counter()
        if self.kind == "torch":
            import torch

            from distill_gap.models.loading import load_classifier, model_labels

            torch.set_num_threads(THREADS)
            rec["import_s"], rec["rss_mb_after_imports"] = time.perf_counter() - t0, _vm("VmRSS")
            t0 = time.perf_counter()
            self.model, self.tok = load_classifier(self.path)
            self.model.eval()
            self.model_labels = model_labels(self.model)
            fixed = self.tok(self.texts, truncation=True, max_length=MAX_LENGTH, padding="max_length",
                             return_tensors="np")
        elif self.kind == "inc":
            import torch

            from distill_gap.inference.inc_int8 import load_int8

            torch.set_num_threads(THREADS)
            rec["import_s"], rec["rss_mb_after_imports"] = time.perf_counter() - t0, _vm("VmRSS")
            t0 = time.perf_counter()
            self.pred = load_int8(self.path, compile=True)
            self.tok, self.model_labels = self.pred.tokenizer, list(self.pred.labels)
            fixed = self.tok(self.texts, truncation=True, max_length=MAX_LENGTH, padding="max_length",
                             return_tensors="np")
        else:
            import onnxruntime as ort
            from tokenizers import Tokenizer

            rec["import_s"], rec["rss_mb_after_imports"] = time.perf_counter() - t0, _vm("VmRSS")
            t0 = time.perf_counter()
            # as distill_gap.inference.onnx_runtime.onnx_session(threads=2) does, with inter-op threads 1 too;
            # onnxruntime + tokenizers only: what a lean ONNX worker needs (no transformers).
            providers = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider")
                         if p in ort.get_available_providers()]
            so = ort.SessionOptions()
            so.intra_op_num_threads, so.inter_op_num_threads = THREADS, 1
            self.sess = ort.InferenceSession(str(Path(self.path) / "model.onnx"), so, providers=providers)
            self.names = [i.name for i in self.sess.get_inputs()]
            self.tok = Tokenizer.from_file(str(Path(self.path) / "tokenizer.json"))
            self.tok.enable_truncation(MAX_LENGTH)
            id2label = json.loads((Path(self.path) / "config.json").read_text())["id2label"]
            self.model_labels = [id2label[str(i)] for i in range(len(id2label))]
            fixed = self._ort_encode(pad_to=MAX_LENGTH)
        rec["load_s"] = time.perf_counter() - t0
        if self.model_labels != self.labels:
            raise SystemExit(f"{self.path}: label order {self.model_labels} != data labels {self.labels}")
        tt = fixed.get("token_type_ids")
        tt = tt if tt is not None else np.zeros_like(fixed["input_ids"])
        self.arrays = [np.asarray(a, dtype=np.int64) for a in (fixed["input_ids"], fixed["attention_mask"], tt)]
        import hashlib

        rec["inputs_sha256"] = hashlib.sha256(b"".join(a.tobytes() for a in self.arrays)).hexdigest()
        n = len(self.texts)
        self.b32 = [self._inputs(np.arange(32 * k, 32 * k + 32) % n) for k in range(n // 32)]
        self.b1 = [self._inputs(np.array([i % n])) for i in range(B1_CALLS + 2)]
        rec["real_tokens_share"] = float(self.arrays[1].mean())  # non-pad share of the 128-token inputs
        for b in ((1, 32) if self.kind != "inc" else (self.batch,)):
            t0 = time.perf_counter()
            if self.kind == "inc":
                import torch._dynamo.utils as du

                rec[f"compile_s_b{b}"] = self.pred.warm_up(b)  # the first (cold) inductor compile on (b, 128)
                self._frames0 = du.counters["frames"]["ok"]
            else:
                self._call(self.b1[0] if b == 1 else self.b32[0])
            rec[f"first_call_s_b{b}"] = time.perf_counter() - t0
            t0 = time.perf_counter()
            self._call(self.b1[1] if b == 1 else self.b32[1])
            rec[f"second_call_s_b{b}"] = time.perf_counter() - t0
        rec["rss_mb_after_warmup"] = _vm("VmRSS")
        return rec

    def _ort_encode(self, pad_to: int | None = None) -> dict:
        """What the HF fast tokenizer returns, from the `tokenizers` library alone."""
        encs = self.tok.encode_batch([str(t) for t in self.texts])
        if pad_to is None:
            return {"input_ids": [e.ids for e in encs], "attention_mask": [e.attention_mask for e in encs],
                    "token_type_ids": [e.type_ids for e in encs]}
        out = {k: np.zeros((len(encs), pad_to), dtype=np.int64) for k in ("input_ids", "attention_mask",
                                                                           "token_type_ids")}
        for i, e in enumerate(encs):  # pad id 0 = [PAD] (tokenizer_config pad_token, pad_token_type_id 0)
            out["input_ids"][i, :len(e.ids)] = e.ids
            out["attention_mask"][i, :len(e.ids)] = e.attention_mask
            out["token_type_ids"][i, :len(e.ids)] = e.type_ids
        return out

    def _inputs(self, rows):
        if self.kind == "ort":
            given = dict(zip(("input_ids", "attention_mask", "token_type_ids"), (a[rows] for a in self.arrays)))
            return {k: given[k] for k in self.names}
        import torch

        return tuple(torch.from_numpy(np.ascontiguousarray(a[rows])) for a in self.arrays)

    def _call(self, inputs):
        if self.kind == "ort":
            return self.sess.run(None, inputs)[0]
        import torch

        if self.kind == "torch":
            with torch.inference_mode():
                ids, mask, tt = inputs
                return self.model(input_ids=ids, attention_mask=mask, token_type_ids=tt).logits
        # the compiled INC module, called as Int8Predictor.warm_up/predict_logits call it (no_grad, freezing on)
        with torch.no_grad(), torch._inductor.config.patch(freezing=True):
            return self.pred.module(*inputs)

    # -- steady state
    def timed(self, batches: list) -> list[float]:
        self._call(batches[0])  # untimed: re-warms caches after the other workers ran
        out = []
        for b in batches:
            t0 = time.perf_counter()
            self._call(b)
            out.append(time.perf_counter() - t0)
        return out

    def b32_round(self) -> dict:
        if self.kind == "inc" and self.batch != 32:
            return {}
        k = self.round32 = getattr(self, "round32", -1) + 1
        batches = [self.b32[(k * B32_BATCHES + j) % len(self.b32)] for j in range(B32_BATCHES)]
        return {"b32_s": self.timed(batches)}

    def b1_round(self) -> dict:
        if self.kind == "inc" and self.batch != 1:
            return {}
        return {"b1_s": self.timed(self.b1[2:])}  # (self.b1[0], [1] serve the first/second-call timings)

    def accuracy(self, label_ids: list[int]) -> dict:
        """Test predictions of the artifact as the project runs it (batches of 32)."""
        t0 = time.perf_counter()
        if self.kind == "inc" and self.batch != 32:
            return {}
        if self.kind == "torch":
            from distill_gap.inference.batching import predict_logits

            logits = predict_logits(self.model, self.tok, self.texts, batch_size=32, max_length=MAX_LENGTH)
        elif self.kind == "inc":
            logits = self.pred.predict_logits(self.texts, batch_size=32)  # pads to the compiled (32, 128)
        else:  # the loop of distill_gap.inference.batching.run_batched (length-sorted batches, dynamic padding)
            from distill_gap.inference.batching import length_sorted_batches, pad_batch

            enc = self._ort_encode()
            logits = np.zeros((len(self.texts), len(self.labels)), dtype=np.float32)
            for idx in length_sorted_batches([len(ids) for ids in enc["input_ids"]], 32):
                logits[idx] = self.sess.run(None, pad_batch(enc, idx, 0, self.names))[0]
        pred = logits.argmax(-1)
        return {"accuracy": float((pred == np.asarray(label_ids)).mean()), "pred": pred.tolist(),
                "finite": bool(np.isfinite(logits).all()), "accuracy_pass_s": time.perf_counter() - t0}

    def memory(self) -> dict:
        rec = {"peak_rss_mb": _vm("VmHWM"), "rss_mb": _vm("VmRSS"),
               "torch_imported": "torch" in sys.modules, "prefect_imported": "prefect" in sys.modules}
        if self.kind == "inc":
            import torch._dynamo.utils as du

            rec["recompiles_after_warmup"] = du.counters["frames"]["ok"] - self._frames0
        return rec


def worker_main(argv: list[str]) -> None:
    kind, path, batch = argv[0], argv[1], int(argv[2]) or None
    proto = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)  # whatever a library prints goes to stderr; stdout carries the protocol only
    spec = json.loads(sys.stdin.readline())
    w = _Worker(kind, path, batch, spec["texts"], spec["labels"])
    label_ids = spec["label_ids"]
    for line in sys.stdin:
        cmd = json.loads(line)["cmd"]
        if cmd == "exit":
            break
        out = {"load": w.load, "b32": w.b32_round, "b1": w.b1_round, "memory": w.memory,
               "accuracy": lambda: w.accuracy(label_ids)}[cmd]()
        proto.write(json.dumps(out) + "\n")
        proto.flush()


class Proc:
    """The parent's handle on one worker process."""

    def __init__(self, name: str, kind: str, path: Path, batch: int, spec: dict, env: dict):
        self.name = name
        self.p = subprocess.Popen([sys.executable, __file__, kind, str(path), str(batch)],
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env, cwd=ROOT)
        self.send(spec)

    def send(self, obj) -> None:
        self.p.stdin.write(json.dumps(obj) + "\n")
        self.p.stdin.flush()

    def ask(self, cmd: str) -> dict:
        self.send({"cmd": cmd})
        line = self.p.stdout.readline()
        if not line:
            raise RuntimeError(f"worker {self.name} died (exit code {self.p.wait()}); see stderr above")
        return json.loads(line)

    def close(self) -> None:
        try:
            self.send({"cmd": "exit"})
            self.p.stdin.close()
        except BrokenPipeError:
            pass
        self.p.wait(timeout=60)


if __name__ == "__main__":
    worker_main(sys.argv[1:])
