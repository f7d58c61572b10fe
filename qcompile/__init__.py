"""qcompile: an ONNX graph-level quantization compiler."""
from __future__ import annotations

__version__ = "0.1.0"


def compile(model, *, calib=None, recipe="w8a8", target="onnxruntime", out_dir=None, **kwargs):  # noqa: A001
    """Compile `model` (path or ModelProto) with `recipe` for `target`; see :func:`qcompile.driver.compile`."""
    from qcompile.driver import compile as _compile

    return _compile(model, calib=calib, recipe=recipe, target=target, out_dir=out_dir, **kwargs)


def quantize(model, *, calib=None, recipe="w8a8", target="onnxruntime", **kwargs):
    """The QDQ model (onnx.ModelProto) `recipe` makes of `model` for `target`, without files or report; see
    :func:`qcompile.driver.quantize`."""
    from qcompile.driver import quantize as _quantize

    return _quantize(model, calib=calib, recipe=recipe, target=target, **kwargs)
