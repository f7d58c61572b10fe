"""String enums and frozen dataclasses shared by every layer."""
from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

import numpy as np


class QuantDType(str, Enum):
    INT8 = "int8"
    UINT8 = "uint8"

    @property
    def qmin(self) -> int:
        return -128 if self is QuantDType.INT8 else 0

    @property
    def qmax(self) -> int:
        return 127 if self is QuantDType.INT8 else 255

    @property
    def numpy(self) -> type:
        return np.int8 if self is QuantDType.INT8 else np.uint8

    def qrange(self, bits: int = 8) -> tuple[int, int]:
        """The b-bit integer range held in this 8-bit type: int8 [-2^(b-1), 2^(b-1)-1], uint8 [0, 2^b-1]."""
        if self is QuantDType.INT8:
            return -(1 << (bits - 1)), (1 << (bits - 1)) - 1
        return 0, (1 << bits) - 1

    @staticmethod
    def of(dtype) -> "QuantDType":
        """The QuantDType of a numpy integer dtype (int8 / uint8); ValueError for any other."""
        return QuantDType(np.dtype(dtype).name)


class WeightStorage(str, Enum):
    """How quantized weights are stored: ``auto`` = int8 (ORT 1.32 CPU forms no integer kernel from INT4 weights:
    15x slower); ``int8`` always; ``int4`` always (b <= 4 only; the model is upgraded to opset 21)."""

    AUTO = "auto"
    INT8 = "int8"
    INT4 = "int4"


class Granularity(str, Enum):
    PER_TENSOR = "per_tensor"
    PER_CHANNEL = "per_channel"
    PER_BLOCK = "per_block"  # one scale per `weight_block` input rows x output column (weight-only int4)
    PER_TOKEN = "per_token"  # activations quantized at run time, one scale per row of the GEMM (passes/_dynamic.py)


class WeightFormat(str, Enum):
    """How weight-only per-block weights are emitted: ``qdq`` = INT4 ``DequantizeLinear(block_size)`` (opset 21,
    standard ONNX; ORT's default optimizations fuse it with the MatMul into MatMulNBits) or ``matmulnbits`` =
    ``com.microsoft.MatMulNBits`` (ORT only; MatMul nodes with a 2-D weight, others keep the QDQ form)."""

    QDQ = "qdq"
    MATMULNBITS = "matmulnbits"


class Symmetry(str, Enum):
    SYMMETRIC = "symmetric"
    ASYMMETRIC = "asymmetric"


class PassKind(str, Enum):
    EQUIVALENCE = "equivalence"
    APPROXIMATE = "approximate"
    QUANTIZE = "quantize"
    ANALYSIS = "analysis"


@dataclass(frozen=True)
class QParams:
    """Quantization parameters of one tensor: `q = clamp(round(x / scale) + zero_point)`."""

    scale: np.ndarray  # float32, shape [] or [C] (per-block: the weight's rank, blocks along axis)
    zero_point: np.ndarray  # dtype of the quantized type, same shape as scale
    axis: int | None = None  # channel axis when per-channel; the blocked axis when block_size is set
    block_size: int | None = None  # per-block: scale has ceil(shape[axis] / block_size) entries along axis


def _coerce(name: str, typ, value):
    """Coerce a YAML value to a config field type (enums by value, tuples from lists); ConfigError if impossible."""
    from typing import get_args, get_origin

    from qcompile.errors import ConfigError

    if isinstance(typ, type) and issubclass(typ, Enum):
        try:
            return typ(value)
        except ValueError:
            raise ConfigError(f"{name}: {value!r} is not one of {[e.value for e in typ]}") from None
    origin = get_origin(typ)
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{name}: expected a list, got {value!r}")
        return tuple(value)
    if typ is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{name}: expected true/false, got {value!r}")
        return value
    if typ is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{name}: expected an integer, got {value!r}")
        return value
    if typ is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{name}: expected a number, got {value!r}")
        return float(value)
    if typ is str:
        if not isinstance(value, str):
            raise ConfigError(f"{name}: expected a string, got {value!r}")
        return value
    if origin is dict or typ is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{name}: expected a mapping, got {value!r}")
        return dict(value)
    args = get_args(typ)
    if type(None) in args and value is None:
        return None
    for a in args:
        if a is not type(None):
            return _coerce(name, a, value)
    return value


class ConfigBase:
    """Mixin for frozen config dataclasses: strict `from_dict` (unknown keys are errors) and `to_dict`."""

    @classmethod
    def from_dict(cls, data: dict | None, where: str = ""):
        import dataclasses
        import typing

        from qcompile.errors import ConfigError

        data = dict(data or {})
        hints = typing.get_type_hints(cls)
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - fields)
        if unknown:
            raise ConfigError(f"unknown key(s) {unknown} in {where or cls.__name__}; known: {sorted(fields)}")
        kwargs = {k: _coerce(f"{where}.{k}" if where else k, hints[k], v) for k, v in data.items()}
        obj = cls(**kwargs)
        validate = getattr(obj, "validate", None)
        if validate is not None:
            validate()
        return obj

    def to_dict(self) -> dict:
        import dataclasses

        out = {}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if isinstance(v, Enum):
                v = v.value
            elif isinstance(v, tuple):
                v = list(v)
            elif isinstance(v, dict):
                v = {k: (x.value if isinstance(x, Enum) else x) for k, x in v.items()}
            out[f.name] = v
        return out
