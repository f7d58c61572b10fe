"""Calibration / input data: an .npz with one array per model input, validated against the model.

An array of the input's own rank is a batch along the batch axis (sample i is ``x[i:i+1]``); an array with one
axis more holds one whole input tensor per sample (``x[i]``): that is how scalars and inputs whose batch axis is
not first are given. Any other shape, a missing or extra key, a dtype that does not match, or a non-finite value
is one clear error.
"""
from __future__ import annotations

import logging
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import numpy as np
import onnx

from qcompile.errors import CalibrationError

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class InputSpec:
    name: str
    dtype: np.dtype
    shape: tuple | None  # ints for static dims, str/None for dynamic; None: rank unknown (no shape declared)


def _dim(d: onnx.TensorShapeProto.Dimension) -> int | str | None:
    """A declared dim as ONNX Runtime reads it: a positive dim_value is fixed; a negative or zero dim_value, a
    dim_param (named or empty) or no value at all is dynamic."""
    if d.HasField("dim_value") and d.dim_value > 0:
        return d.dim_value
    return d.dim_param or None


def input_specs(model: onnx.ModelProto) -> list[InputSpec]:
    inits = {i.name for i in model.graph.initializer}
    specs = []
    for vi in model.graph.input:
        if vi.name in inits:
            continue
        tt = vi.type.tensor_type
        dims = tuple(_dim(d) for d in tt.shape.dim) if tt.HasField("shape") else None
        specs.append(InputSpec(vi.name, np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tt.elem_type)), dims))
    return specs


def load_npz(path: str | Path, what: str = "calibration") -> dict[str, np.ndarray]:
    p = Path(path)
    if not p.is_file():
        raise CalibrationError(f"{what} file not found: {p}")
    try:
        with np.load(p, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as exc:
        raise CalibrationError(f"cannot read {what} file {p} as .npz: {exc}") from None


def _matches(shape: tuple, spec: tuple) -> bool:
    return len(shape) == len(spec) and all(not isinstance(s, int) or s == d for d, s in zip(shape, spec))


def split_samples(model: onnx.ModelProto, arrays: Mapping[str, np.ndarray], what: str = "calibration",
                  max_samples: int | None = None) -> list[dict[str, np.ndarray]]:
    """Validate `arrays` against the model inputs and split them into one feed dict per sample."""
    specs = input_specs(model)
    names = [s.name for s in specs]
    missing = [n for n in names if n not in arrays]
    extra = [k for k in arrays if k not in names]
    if missing or extra:
        raise CalibrationError(f"{what} keys do not match the model inputs {names}: "
                               f"missing {missing}, unexpected {extra}")
    counts = set()
    per_input: dict[str, tuple[np.ndarray, bool]] = {}
    for s in specs:
        x = arrays[s.name]
        if x.dtype != s.dtype:
            raise CalibrationError(f"{what} input {s.name!r} has dtype {x.dtype}, the model expects {s.dtype}")
        if np.issubdtype(x.dtype, np.floating) and not np.all(np.isfinite(x)):
            raise CalibrationError(f"{what} input {s.name!r} holds non-finite values (NaN or inf)")
        if s.shape is None:  # rank unknown: the input's own rank cannot be told apart, so samples are x[i]
            if x.ndim == 0:
                raise CalibrationError(f"{what} input {s.name!r} has no sample axis (shape [])")
            per_input[s.name] = (x, True)
            counts.add(x.shape[0])
        elif x.ndim == len(s.shape) + 1 and _matches(x.shape[1:], s.shape):
            per_input[s.name] = (x, True)
            counts.add(x.shape[0])
        elif x.ndim == len(s.shape) and len(s.shape) > 0 and _matches((1,) + x.shape[1:], s.shape):
            per_input[s.name] = (x, False)
            counts.add(x.shape[0])
        else:
            raise CalibrationError(f"{what} input {s.name!r} has shape {list(x.shape)}, which fits neither a batch "
                                   f"of {list(s.shape)} along axis 0 nor one tensor per sample")
    if len(counts) != 1:
        raise CalibrationError(f"{what} inputs disagree on the number of samples: {sorted(counts)}")
    n = counts.pop()
    if n == 0:
        raise CalibrationError(f"{what} data holds no samples")
    if max_samples is not None:
        n = min(n, max_samples)
    return [{k: (np.asarray(x[i]) if whole else x[i:i + 1]) for k, (x, whole) in per_input.items()}
            for i in range(n)]


def load_samples(model: onnx.ModelProto, path: str | Path, what: str = "calibration",
                 max_samples: int | None = None) -> list[dict[str, np.ndarray]]:
    return split_samples(model, load_npz(path, what), what, max_samples)
