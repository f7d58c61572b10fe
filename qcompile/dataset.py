"""Calibration / input data: an .npz with one array per model input, validated against the model; for a model
with one input also an .npy of that input; for calibration also a folder of such files (samples dumped one or a
batch per file, e.g. text of different lengths), read in name order.

An array of the input's own rank is a batch along the batch axis (sample i is ``x[i:i+1]``); an array with one
axis more holds one whole input tensor per sample (``x[i]``): that is how scalars and inputs whose batch axis is
not first are given. Any other shape, a missing or extra key, a dtype that does not match, or a non-finite value
is one clear error, naming the file it came from.
"""
from __future__ import annotations

import logging
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

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


SINGLE_INPUT = ""  # the key of an .npy file's array: the model's only input


def _load_file(p: Path, what: str) -> dict[str, np.ndarray]:
    try:
        if p.suffix == ".npy":
            return {SINGLE_INPUT: np.load(p, allow_pickle=False)}
        with np.load(p, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as exc:
        raise CalibrationError(f"cannot read {what} file {p} as {p.suffix or '.npz'}: {exc}") from None


def load_npz(path: str | Path, what: str = "calibration") -> dict[str, np.ndarray]:
    """The arrays of an .npz file (by key) or an .npy file (key :data:`SINGLE_INPUT`)."""
    p = Path(path)
    if not p.is_file():
        raise CalibrationError(f"{what} file not found: {p}")
    return _load_file(p, what)


def load_data(path: str | Path, what: str = "calibration") -> dict[str, np.ndarray] | list[tuple[str, dict]]:
    """:func:`load_npz` of a file; of a folder, every .npz (or every .npy) in it by name: ``(file name, arrays)``
    chunks for :func:`split_samples`, which takes each file's samples in turn."""
    p = Path(path)
    if not p.is_dir():
        return load_npz(p, what)
    files = sorted(f for f in p.iterdir() if f.is_file() and f.suffix in (".npz", ".npy"))
    if not files:
        raise CalibrationError(f"{what} folder {p} holds no .npz or .npy files")
    if len({f.suffix for f in files}) > 1:
        raise CalibrationError(f"{what} folder {p} mixes .npz and .npy files: use one kind")
    return [(f.name, _load_file(f, what)) for f in files]


def _matches(shape: tuple, spec: tuple) -> bool:
    return len(shape) == len(spec) and all(not isinstance(s, int) or s == d for d, s in zip(shape, spec))


def split_samples(model: onnx.ModelProto, arrays: Mapping[str, np.ndarray] | Sequence[tuple[str, Mapping]],
                  what: str = "calibration", max_samples: int | None = None) -> list[dict[str, np.ndarray]]:
    """Validate `arrays` against the model inputs and split them into one feed dict per sample; `arrays` may be
    :func:`load_data`'s chunks (one per file, samples taken file after file)."""
    if not isinstance(arrays, Mapping):
        samples: list[dict[str, np.ndarray]] = []
        for name, chunk in arrays:
            if max_samples is not None and len(samples) >= max_samples:
                break
            try:
                samples += split_samples(model, chunk, what)
            except CalibrationError as exc:
                raise CalibrationError(f"{name}: {exc}") from None
        if not samples:
            raise CalibrationError(f"{what} data holds no samples")
        return samples[:max_samples]
    arrays = for_inputs(model, arrays, what)
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


def for_inputs(model: onnx.ModelProto, arrays: Mapping[str, np.ndarray], what: str = "input"
               ) -> Mapping[str, np.ndarray]:
    """``arrays`` with an .npy file's array (key :data:`SINGLE_INPUT`) under the model's only input's name."""
    if SINGLE_INPUT not in arrays:
        return arrays
    names = [s.name for s in input_specs(model)]
    if len(names) != 1 or len(arrays) != 1:
        raise CalibrationError(f"an .npy {what} file feeds a model with one input; this one has {len(names)} "
                               f"({', '.join(names)}): give an .npz with one array per input")
    return {names[0]: arrays[SINGLE_INPUT]}


def load_samples(model: onnx.ModelProto, path: str | Path, what: str = "calibration",
                 max_samples: int | None = None) -> list[dict[str, np.ndarray]]:
    return split_samples(model, load_data(path, what), what, max_samples)
