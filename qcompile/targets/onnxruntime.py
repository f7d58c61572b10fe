"""ONNX Runtime target: the quantized graph as `model.qdq.onnx`, checked to load with all optimizations on
(the integer-kernel fusions happen at session creation)."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Sequence

import numpy as np
import onnx

from qcompile import numerics
from qcompile.errors import TargetError
from qcompile.ir import save_model

logger = logging.getLogger(__name__)

MODEL_FILE = "model.qdq.onnx"


class OnnxRuntimeTarget:
    name = "onnxruntime"

    def pipeline(self, spec: dict | None = None) -> list[str]:
        return []  # ORT fuses QDQ itself; no target-specific passes

    def build(self, model: onnx.ModelProto, out_dir: Path, example: dict[str, np.ndarray] | None = None
              ) -> dict[str, str]:
        path = Path(out_dir) / MODEL_FILE
        save_model(model, path)
        try:
            numerics.session(str(path), optimize=True)
        except Exception as exc:
            raise TargetError(f"ONNX Runtime cannot load the quantized model: {exc}") from None
        return {"model": MODEL_FILE}

    def run(self, out_dir: Path, samples: Sequence[dict[str, np.ndarray]], threads: int = 1
            ) -> list[dict[str, np.ndarray]]:
        path = Path(out_dir) / MODEL_FILE
        if not path.is_file():
            raise TargetError(f"{path} not found: compile with --target onnxruntime first")
        sess = numerics.session(str(path), optimize=True, threads=threads)
        return [numerics.run(sess, s) for s in samples]
