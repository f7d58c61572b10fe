"""ONNX Runtime target: the quantized graph as ``model.qdq.onnx`` (written by the driver for every target,
:func:`~.base.write_model`), run by ONNX Runtime with all optimizations on (its integer-kernel fusions happen at
session creation)."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Sequence

import numpy as np
import onnx

from qcompile import numerics
from qcompile.errors import TargetError
from qcompile.targets.base import MODEL_FILE, write_model

logger = logging.getLogger(__name__)


class OnnxRuntimeTarget:
    name = "onnxruntime"

    def pipeline(self, spec: dict | None = None) -> list:
        return []  # ORT fuses QDQ itself; no target-specific passes

    def build(self, model: onnx.ModelProto, out_dir: Path, example: dict[str, np.ndarray] | None = None
              ) -> dict[str, str]:
        """Nothing beyond the QDQ model: written here when the driver has not written it already."""
        if not (Path(out_dir) / MODEL_FILE).is_file():
            return write_model(model, out_dir)
        return {"model": MODEL_FILE}

    def run(self, out_dir: Path, samples: Sequence[dict[str, np.ndarray]], threads: int = 1
            ) -> list[dict[str, np.ndarray]]:
        path = Path(out_dir) / MODEL_FILE
        if not path.is_file():
            raise TargetError(f"{path} not found: compile with --target onnxruntime first")
        sess = numerics.session(str(path), optimize=True, threads=threads)
        return [numerics.run(sess, s) for s in samples]
