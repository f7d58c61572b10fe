"""Instruments: cross-cutting checks run by the PassManager around every pass.

- CheckerInstrument: ONNX checker + strict shape inference after every pass, then an ONNX Runtime session is created
  on the model (no run): ORT refuses models the checker passes (a subgraph output that is an outer-scope value
  returned directly, for one), and a pass that makes an unloadable model must fail at that pass, with its name.
- NumericsInstrument: after every EQUIVALENCE pass, run the graph before and after in ONNX Runtime (all graph
  optimizations off) on the same inputs and require fp32 agreement: |a-b| <= 1e-6*max(1,max|a|) + 1e-5*|a|.
  Deep networks reach that bound by fp32 reassociation alone (ResNet-18 at 224: ORT's own Conv+BN fusion moves the
  logits by 1.2e-6 of their maximum), and a 30-layer decoder goes further. So when the fixed bound fails, the
  instrument measures this model's fp32 noise floor per output on the same inputs, two ways: *reordered*, the
  deviation of the unmodified model run with ORT's graph optimizations on versus off (sums in another order,
  fused kernels); *rounding*, the deviation when every float constant is moved by one ulp with a random sign
  (``numerics.perturbed``: twice the rounding error of a rewritten constant, which is what an equivalence pass
  that rescales weights incurs, propagated through this model's own depth and magnitudes). The pass is accepted
  only if its deviation is at most twice the larger floor. Figures go to the report; a real bug (a layer's weight
  off by 1e-4 relative, a thousand ulps) is orders of magnitude above either.
- TimingInstrument: wall time of each pass.
- DumpInstrument: writes the model after each pass to a folder (debugging).
"""
from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
import onnx

from qcompile import numerics
from qcompile.errors import ModelError, NumericsError, PassError
from qcompile.ir import save_model
from qcompile.pass_infra import Instrument, PassBase, PassContext, PassResult, Snapshot
from qcompile.types import PassKind

logger = logging.getLogger(__name__)


class CheckerInstrument(Instrument):
    def after_pass(self, p: PassBase, before: Snapshot | None, after: Snapshot, result: PassResult,
                   ctx: PassContext, record: dict) -> None:
        if after.checked:  # the pass handed on the model it was given, checked after an earlier pass
            return
        try:  # full_check: the checker, then strict shape inference with type checks, on the serialized model
            onnx.checker.check_model(after.data, full_check=True)
        except Exception as exc:
            raise PassError(f"pass {p.name} produced an invalid model: {str(exc).splitlines()[0]}") from None
        _session_after(p, after)
        after.checked = True


def _session_after(p: PassBase, after: Snapshot):
    """An ORT session on the model a pass produced; a model ORT refuses is that pass's error, named."""
    try:
        return after.session()
    except ModelError as exc:
        raise PassError(f"pass {p.name} produced a model ONNX Runtime cannot load: "
                        f"{str(exc).removeprefix('ONNX Runtime cannot load the model: ')}") from None


def _run_after(p: PassBase, sess, feeds: dict, names: list[str]) -> dict[str, np.ndarray]:
    """A run of the model a pass produced (its input ran on the same feeds): a failure is that pass's error."""
    try:
        return numerics.run(sess, feeds, names)
    except ModelError as exc:
        raise PassError(f"pass {p.name} produced a model ONNX Runtime cannot run: "
                        f"{str(exc).removeprefix(numerics.RUN_FAILED)}") from None


class NumericsInstrument(Instrument):
    """Proves EQUIVALENCE passes fp32-exact on the context's samples (or seeded inputs)."""

    needs_before_model = True

    def __init__(self, rtol: float = 1e-5, atol: float = 1e-6, max_samples: int = 2) -> None:
        self.rtol, self.atol, self.max_samples = rtol, atol, max_samples

    def after_pass(self, p: PassBase, before: Snapshot | None, after: Snapshot, result: PassResult,
                   ctx: PassContext, record: dict) -> None:
        if before is None:
            return
        if before is after:  # the pass left the graph as it was (the manager verifies that claim under test)
            record["numerics"] = {"checked": True, "unchanged": True}
            return
        if p.kind is PassKind.APPROXIMATE:  # measured and reported, never enforced
            record["numerics"] = {"checked": False, **self._measure(p, before, after, ctx)}
            return
        if p.kind is not PassKind.EQUIVALENCE:
            return
        feeds_list = ctx.samples[: self.max_samples] or [numerics.seeded_inputs(before.model)]
        s_before, s_after = before.session(), _session_after(p, after)
        worst: dict[str, float] = {"max_abs": 0.0, "max_rel": 0.0, "sqnr_db": float("inf")}
        failures = []
        for feeds in feeds_list:
            ref = numerics.run(s_before, feeds)
            out = _run_after(p, s_after, feeds, list(ref))
            for name, r in ref.items():
                m = numerics.compare(r, out[name])
                worst["max_abs"] = max(worst["max_abs"], m["max_abs"])
                worst["max_rel"] = max(worst["max_rel"], m["max_rel"])
                worst["sqnr_db"] = min(worst["sqnr_db"], m["sqnr_db"])
                if not numerics.within_fp32_tolerance(r, out[name], self.rtol, self.atol):
                    failures.append((feeds, name, r, out[name], m))
        if failures:
            floors = {"reordered": numerics.session(before.data, optimize=True),
                      "rounding": numerics.session(numerics.perturbed(before.model))}
            rec = record.setdefault("numerics", {})
            for feeds, name, r, o, m in failures:
                got = {k: float(np.abs(np.asarray(numerics.run(s, feeds, [name])[name], np.float64) - r).max())
                       for k, s in floors.items()}
                for k, v in got.items():
                    rec[f"noise_floor_{k}"] = max(v, rec.get(f"noise_floor_{k}", 0.0))
                floor = max(got.values())
                rec["noise_floor"] = max(floor, rec.get("noise_floor", 0.0))
                if not (floor > 0.0 and m["max_abs"] <= 2.0 * floor):
                    raise NumericsError(
                        f"equivalence pass {p.name} changed output {name!r} beyond fp32 rounding "
                        f"(max abs {m['max_abs']:.3g}, max rel {m['max_rel']:.3g}, SQNR {m['sqnr_db']:.1f} dB; "
                        f"this model's fp32 noise floor is {floor:.3g}: reordered sums {got['reordered']:.3g}, "
                        f"constants moved by one ulp {got['rounding']:.3g})")
        record.setdefault("numerics", {}).update({"checked": True, "samples": len(feeds_list),
                                                  "within_fixed_tolerance": not failures, **worst})


    def _measure(self, p: PassBase, before: Snapshot, after: Snapshot, ctx: PassContext) -> dict:
        feeds_list = ctx.samples[: self.max_samples] or [numerics.seeded_inputs(before.model)]
        s_before, s_after = before.session(), _session_after(p, after)
        worst = {"max_abs": 0.0, "sqnr_db": float("inf")}
        for feeds in feeds_list:
            ref = numerics.run(s_before, feeds)
            out = _run_after(p, s_after, feeds, list(ref))
            for name, r in ref.items():
                m = numerics.compare(r, out[name])
                worst = {"max_abs": max(worst["max_abs"], m["max_abs"]), "sqnr_db": min(worst["sqnr_db"], m["sqnr_db"])}
        return {"samples": len(feeds_list), **worst}


class TimingInstrument(Instrument):
    def __init__(self) -> None:
        self._t0 = 0.0

    def before_pass(self, p: PassBase, graph, ctx: PassContext) -> None:
        self._t0 = time.perf_counter()

    def after_pass(self, p: PassBase, before: Snapshot | None, after: Snapshot, result: PassResult,
                   ctx: PassContext, record: dict) -> None:
        record["seconds"] = round(time.perf_counter() - self._t0, 4)


class DumpInstrument(Instrument):
    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        self._n = 0

    def after_pass(self, p: PassBase, before: Snapshot | None, after: Snapshot, result: PassResult,
                   ctx: PassContext, record: dict) -> None:
        self._n += 1
        path = self.folder / f"{self._n:02d}_{p.name}.onnx"
        save_model(after.model, path)
        record["dump"] = str(path)
