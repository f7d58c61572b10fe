"""Architectures nobody here exported: Hugging Face `transformers` models built from small configs (random weights, no
hub), exported by torch.onnx as a user would, then compiled by qcompile. A robustness sweep, not an accuracy table:
random weights say nothing about a trained model's accuracy, but every crash, every unloadable output and every
decline (with its reason) here is one a user with a real checkpoint of the same architecture meets.

    python tools/arch_sweep.py                                   # every architecture, w8a8, onnxruntime + tvm-x86
    python tools/arch_sweep.py --archs bert swin --targets onnxruntime
    python tools/arch_sweep.py --exporter dynamo --opset 18
    python tools/arch_sweep.py --targets onnxruntime --recipes w8a8-smooth w4a4-rotate w4a16-awq w8a8-repq

Per architecture, recipe and target: the compile's outcome (ok, or the error's class and first line), the output's
cosine to fp32 on 4 held-out random inputs (the model's own output ``qcompile run`` gives), the lowest per-layer SQNR
the report names, and the fraction of integer tensors equal to the integer reference (the report's
``lsb_vs_reference``). A table goes to stdout; progress to stderr. Norm layers' weights and BatchNorm statistics are
spread as training would leave them (fresh inits make some of these models output zeros).
"""
from __future__ import annotations

import argparse
import contextlib
import logging
import re
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path

import numpy as np
import onnx

import qcompile
from qcompile.errors import QCompileError

log = logging.getLogger("arch_sweep")

TEXT = dict(vocab_size=512, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
            max_position_embeddings=128)
DECODER = dict(TEXT, num_key_value_heads=2)
VISION = dict(image_size=32, patch_size=8, num_channels=3, hidden_size=64, num_hidden_layers=2,
              num_attention_heads=4, intermediate_size=128)

# name -> (model_type, config overrides, input kind)
ARCHS: dict[str, tuple[str, dict, str]] = {
    "bert": ("bert", TEXT, "text"),
    "distilbert": ("distilbert", dict(vocab_size=512, dim=64, n_layers=2, n_heads=4, hidden_dim=128), "text"),
    "roberta": ("roberta", dict(TEXT, max_position_embeddings=130), "text"),
    "albert": ("albert", dict(TEXT, embedding_size=32), "text"),
    "electra": ("electra", dict(TEXT, embedding_size=32), "text"),
    "deberta-v2": ("deberta-v2", dict(TEXT, relative_attention=True, position_buckets=32,
                                      pos_att_type=["p2c", "c2p"]), "text"),
    "mobilebert": ("mobilebert", dict(TEXT, embedding_size=32, intra_bottleneck_size=32, true_hidden_size=32,
                                      num_feedforward_networks=2), "text"),
    "mpnet": ("mpnet", TEXT, "text"),
    "gpt2": ("gpt2", dict(vocab_size=512, n_embd=64, n_layer=2, n_head=4, n_positions=128), "decoder"),
    "llama": ("llama", DECODER, "decoder"),
    "qwen2": ("qwen2", DECODER, "decoder"),
    "mistral": ("mistral", DECODER, "decoder"),
    "phi": ("phi", DECODER, "decoder"),
    "gemma": ("gemma", dict(DECODER, head_dim=16), "decoder"),
    "opt": ("opt", dict(vocab_size=512, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, ffn_dim=128,
                        word_embed_proj_dim=64, max_position_embeddings=128), "decoder"),
    "bloom": ("bloom", dict(vocab_size=512, hidden_size=64, n_layer=2, n_head=4), "decoder"),
    "vit": ("vit", VISION, "image"),
    "deit": ("deit", VISION, "image"),
    "beit": ("beit", dict(VISION, use_relative_position_bias=True), "image"),
    "dinov2": ("dinov2", dict(VISION, image_size=32), "image"),
    "swin": ("swin", dict(image_size=32, patch_size=2, embed_dim=16, depths=[1, 1], num_heads=[2, 2], window_size=4),
             "image"),
    "convnext": ("convnext", dict(hidden_sizes=[16, 32], depths=[1, 1], num_stages=2), "image"),
    "resnet": ("resnet", dict(embedding_size=16, hidden_sizes=[16, 32], depths=[1, 1], layer_type="bottleneck"),
               "image"),
    "mobilenet_v2": ("mobilenet_v2", dict(image_size=32, depth_multiplier=0.35), "image"),
    "mobilevit": ("mobilevit", dict(image_size=32, hidden_sizes=[32, 48, 64], neck_hidden_sizes=[8, 16, 24, 24, 32,
                                                                                                   48, 160]), "image"),
    "efficientnet": ("efficientnet", dict(image_size=32, width_coefficient=0.25, depth_coefficient=0.25,
                                            hidden_dim=320), "image"),
    "regnet": ("regnet", dict(embedding_size=16, hidden_sizes=[16, 32], depths=[1, 1], groups_width=8), "image"),
    "levit": ("levit", dict(image_size=64, hidden_sizes=[32, 48, 64], num_attention_heads=[2, 2, 2],
                            depths=[1, 1, 1], key_dim=[8, 8, 8]), "image64"),
    "poolformer": ("poolformer", dict(hidden_sizes=[16, 32, 48, 64], depths=[1, 1, 1, 1]), "image"),
    "segformer": ("segformer", dict(hidden_sizes=[16, 32, 48, 64], depths=[1, 1, 1, 1], decoder_hidden_size=32,
                                    num_attention_heads=[1, 2, 2, 4]), "image"),
    "wav2vec2": ("wav2vec2", dict(TEXT, conv_dim=[32, 32], conv_stride=[5, 2], conv_kernel=[10, 3],
                                  num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=4), "audio"),
    "hubert": ("hubert", dict(TEXT, conv_dim=[32, 32], conv_stride=[5, 2], conv_kernel=[10, 3],
                              num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=4), "audio"),
    # added 2026-12-07: convolutional and grouped-linear text encoders, detection tokens, more vision families
    "convbert": ("convbert", dict(TEXT, embedding_size=64), "text"),
    "squeezebert": ("squeezebert", dict(TEXT, embedding_size=64, q_groups=2, k_groups=2, v_groups=2,
                                        post_attention_groups=2, intermediate_groups=2, output_groups=2), "text"),
    "yolos": ("yolos", dict(VISION, image_size=[32, 32], num_detection_tokens=10), "image"),
    "convnextv2": ("convnextv2", dict(hidden_sizes=[16, 32], depths=[1, 1], num_stages=2), "image"),
    "bit": ("bit", dict(embedding_size=16, num_groups=4, hidden_sizes=[32, 64, 128, 256], depths=[1, 1, 1, 1],
                        layer_type="bottleneck", global_padding="SAME"), "image"),
    "pvt": ("pvt", dict(image_size=32, hidden_sizes=[16, 32, 48, 64], depths=[1, 1, 1, 1],
                        num_attention_heads=[1, 1, 2, 2]), "image"),
    "focalnet": ("focalnet", dict(image_size=32, embed_dim=16, depths=[1, 1], focal_levels=[2, 2],
                                  focal_windows=[3, 3]), "image"),
    "clip-vision": ("clip_vision_model", dict(VISION), "image"),
    "siglip-vision": ("siglip_vision_model", dict(VISION), "image"),
    "data2vec-vision": ("data2vec-vision", dict(VISION), "image"),
    "mobilenet_v1": ("mobilenet_v1", dict(image_size=32, depth_multiplier=0.25), "image"),
    "glpn": ("glpn", dict(hidden_sizes=[16, 32, 48, 64], depths=[1, 1, 1, 1], num_attention_heads=[1, 2, 2, 4],
                          decoder_hidden_size=32), "image"),
    # added 2026-12-08: mixture of experts, partial rotary, parallel blocks, state-space scans, newer norms and
    # attention variants, detection (DETR, RT-DETR's deformable attention), depth, audio spectrograms, time series
    "t5-encoder": ("t5", dict(vocab_size=512, d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4,
                              relative_attention_num_buckets=8), "text"),
    "mixtral": ("mixtral", dict(DECODER, num_local_experts=4, num_experts_per_tok=2), "decoder"),
    "falcon": ("falcon", dict(vocab_size=512, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                              new_decoder_architecture=True, num_kv_heads=2), "decoder"),
    "gpt-neox": ("gpt_neox", dict(TEXT, rotary_pct=0.5), "decoder"),
    "stablelm": ("stablelm", dict(DECODER, partial_rotary_factor=0.25), "decoder"),
    "phi3": ("phi3", dict(DECODER, pad_token_id=0), "decoder"),
    "granite": ("granite", DECODER, "decoder"),
    "olmo2": ("olmo2", DECODER, "decoder"),
    "qwen3": ("qwen3", dict(DECODER, head_dim=16), "decoder"),
    "mamba": ("mamba", dict(vocab_size=512, hidden_size=64, num_hidden_layers=2, state_size=8), "decoder"),
    "esm": ("esm", dict(TEXT, pad_token_id=1, position_embedding_type="rotary"), "text"),
    "swinv2": ("swinv2", dict(image_size=32, patch_size=2, embed_dim=16, depths=[1, 1], num_heads=[2, 2],
                              window_size=4), "image"),
    "mobilevitv2": ("mobilevitv2", dict(image_size=64, width_multiplier=0.25), "image64"),
    "hiera": ("hiera", dict(image_size=[32, 32], patch_size=[3, 3], patch_stride=[2, 2], patch_padding=[1, 1],
                            embed_dim=16, num_heads=[1, 2], depths=[1, 1], query_stride=[2, 2],
                            masked_unit_size=[4, 4], num_query_pool=1), "image"),
    "textnet": ("textnet", {}, "image"),
    "dpt": ("dpt", dict(VISION, neck_hidden_sizes=[16, 32, 48, 64], fusion_hidden_size=32,
                        backbone_out_indices=[0, 1, 1, 1]), "image"),
    "detr": ("detr", dict(use_timm_backbone=False, use_pretrained_backbone=False, backbone="resnet",
                          backbone_config=dict(model_type="resnet", embedding_size=16, hidden_sizes=[16, 32, 48, 64],
                                               depths=[1, 1, 1, 1], out_features=["stage4"]),
                          d_model=64, encoder_layers=1, decoder_layers=1, encoder_attention_heads=4,
                          decoder_attention_heads=4, encoder_ffn_dim=128, decoder_ffn_dim=128, num_queries=10),
             "image"),
    "rt-detr": ("rt_detr", dict(backbone_config=dict(model_type="rt_detr_resnet", embedding_size=16,
                                                     hidden_sizes=[16, 32, 48, 64], depths=[1, 1, 1, 1],
                                                     out_features=["stage2", "stage3", "stage4"]),
                                encoder_in_channels=[32, 48, 64], encoder_hidden_dim=32, d_model=32,
                                decoder_in_channels=[32, 32, 32], encoder_ffn_dim=64, decoder_ffn_dim=64,
                                decoder_layers=1, encoder_attention_heads=4, decoder_attention_heads=4,
                                num_queries=10, num_denoising=0), "image64"),
    "wavlm": ("wavlm", dict(TEXT, conv_dim=[32, 32], conv_stride=[5, 2], conv_kernel=[10, 3],
                            num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=4, num_buckets=16,
                            max_bucket_distance=32), "audio"),
    "ast": ("audio-spectrogram-transformer", dict(TEXT, patch_size=8, frequency_stride=8, time_stride=8,
                                                  max_length=64, num_mel_bins=16), "spectrogram"),
    "patchtst": ("patchtst", dict(num_input_channels=3, context_length=32, patch_length=8, patch_stride=8,
                                  d_model=32, num_hidden_layers=2, num_attention_heads=4, ffn_dim=64), "series"),
    "whisper-encoder": ("whisper", dict(vocab_size=512, d_model=64, encoder_layers=2, encoder_attention_heads=4,
                                        decoder_layers=1, decoder_attention_heads=4, encoder_ffn_dim=128,
                                        decoder_ffn_dim=128, num_mel_bins=16, max_source_positions=32,
                                        pad_token_id=0, bos_token_id=1, eos_token_id=2,
                                        decoder_start_token_id=1), "mel"),
}


def _inputs(kind: str, n: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    if kind in ("text", "decoder"):
        ids = rng.integers(3, 512, (n, 16)).astype(np.int64)
        if kind == "decoder":
            return {"input_ids": ids}
        mask = np.ones_like(ids)
        mask[n // 2:, 12:] = 0  # some padded rows
        return {"input_ids": ids, "attention_mask": mask}
    if kind in ("image", "image64"):
        s = 64 if kind == "image64" else 32
        return {"pixel_values": rng.standard_normal((n, 3, s, s)).astype(np.float32)}
    if kind == "audio":
        return {"input_values": rng.standard_normal((n, 800)).astype(np.float32)}
    if kind == "mel":
        return {"input_features": rng.standard_normal((n, 16, 64)).astype(np.float32)}
    if kind == "spectrogram":  # (batch, frames, mel bins), as the audio spectrogram transformer reads it
        return {"input_values": rng.standard_normal((n, 64, 16)).astype(np.float32)}
    if kind == "series":  # (batch, context, channels) of a multivariate time series
        return {"past_values": rng.standard_normal((n, 32, 3)).astype(np.float32)}
    raise ValueError(kind)


def _trained_like(model) -> None:
    """Fresh `transformers` inits give norms weight 1 / bias 0 and BatchNorm zero means and unit variances; some
    (MobileNetV2, MobileViT) then output zeros. Spread them as training would, so every layer carries signal."""
    import torch

    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (torch.nn.modules.batchnorm._BatchNorm, torch.nn.LayerNorm, torch.nn.GroupNorm)):
                if getattr(m, "weight", None) is not None:
                    m.weight.copy_(0.5 + torch.rand(m.weight.shape, generator=g))
                if getattr(m, "bias", None) is not None:
                    m.bias.copy_(0.1 * torch.randn(m.bias.shape, generator=g))
                if getattr(m, "running_mean", None) is not None:
                    m.running_mean.copy_(0.1 * torch.randn(m.running_mean.shape, generator=g))
                    m.running_var.copy_(0.5 + torch.rand(m.running_var.shape, generator=g))


def _model(name: str):
    import torch
    import transformers

    model_type, overrides, kind = ARCHS[name]
    cfg = transformers.AutoConfig.for_model(model_type, **overrides)
    torch.manual_seed(0)
    if name == "whisper-encoder":
        inner = transformers.WhisperModel(cfg).get_encoder()
    elif name == "t5-encoder":
        inner = transformers.T5EncoderModel(cfg)
    elif kind == "decoder":
        inner = transformers.AutoModelForCausalLM.from_config(cfg)
    else:
        inner = transformers.AutoModel.from_config(cfg)
    inner.eval()
    _trained_like(inner)
    keys = list(_inputs(kind, 1, np.random.default_rng(0)))  # the input names, in the order export passes them

    class Wrap(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, *args):
            kw = dict(zip(keys, args))
            if kind == "decoder":
                kw["use_cache"] = False
            out = self.inner(**kw)
            return out.logits if hasattr(out, "logits") and out.logits is not None else out[0]
    return Wrap(), kind


# the axes a user's export marks dynamic beside the batch: sequence / time, or a picture's height and width
DYNAMIC_AXES = {"text": {1: "seq"}, "decoder": {1: "seq"}, "audio": {1: "time"}, "image": {2: "height", 3: "width"},
                "image64": {2: "height", 3: "width"}, "mel": {}, "spectrogram": {},
                "series": {}}


def export(name: str, path: Path, opset: int, exporter: str, dynamic: str = "all") -> str:
    """Export ``name`` to ``path``; ``dynamic``: "batch" (axis 0 only) or "all" (also :data:`DYNAMIC_AXES`)."""
    import torch

    model, kind = _model(name)
    example = _inputs(kind, 2, np.random.default_rng(0))
    args = tuple(torch.from_numpy(v) for v in example.values())
    names = list(example)
    axes = {0: "batch", **(DYNAMIC_AXES[kind] if dynamic == "all" else {})}
    if exporter == "dynamo":
        # torch.export keeps an axis static where the model's code fixes it (Dim.AUTO), as a user's export would
        dims = {i: torch.export.Dim("batch") if i == 0 else torch.export.Dim.AUTO for i in axes}
        # the dynamo exporter writes opset-18 Split/Reduce forms whatever opset it is asked for: 18 at least
        torch.onnx.export(model, args, str(path), input_names=names, output_names=["out"],
                          opset_version=max(opset, 18), dynamo=True,
                          dynamic_shapes=(tuple(dims for _ in names),), external_data=False)
    else:
        with torch.no_grad():
            torch.onnx.export(model, args, str(path), input_names=names, output_names=["out"], opset_version=opset,
                              dynamo=False, dynamic_axes={k: axes for k in names})
    return kind


def _cos(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(np.float64).ravel(), b.astype(np.float64).ravel()
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b) + 1e-30))


def _loads(path: Path) -> None:
    """Raises if ONNX Runtime cannot load ``path``."""
    import onnxruntime as ort

    ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def sweep_one(name: str, targets: list[str], recipes: list[str], opset: int, exporter: str, work: Path,
              dynamic: str = "all") -> list[dict]:
    path = work / f"{name}.onnx"
    note = ""
    try:
        with contextlib.redirect_stdout(sys.stderr):  # the TorchScript exporter prints its graph on failure
            kind = export(name, path, opset, exporter, dynamic)
        _loads(path)  # an export ONNX Runtime cannot load is a failed export too
    except Exception as e:  # noqa: BLE001 -- an export failure is the exporter's; a user would try the other one
        first = f"{exporter} export failed: {type(e).__name__}: {str(e).splitlines()[0][:80] if str(e) else ''}"
        other = "dynamo" if exporter == "torchscript" else "torchscript"
        try:
            with contextlib.redirect_stdout(sys.stderr):
                kind = export(name, path, opset, other, dynamic)
            note = f" ({other} export: {exporter} failed)"
        except Exception as e2:  # noqa: BLE001
            row = {"arch": name, "target": "-", "result": f"{first}; {other}: {type(e2).__name__}: "
                   f"{str(e2).splitlines()[0][:80] if str(e2) else ''}"}
            log.info("%s", row)
            return [row]
    rng = np.random.default_rng(1)
    calib, test = _inputs(kind, 16, rng), _inputs(kind, 4, rng)
    np.savez(work / f"{name}.calib.npz", **calib)
    return compile_rows({"arch": name}, path, work / f"{name}.calib.npz", test, targets, recipes, work, note)


def compile_rows(key: dict, path: Path, calib: Path, test: dict[str, np.ndarray], targets: list[str],
                 recipes: list[str], work: Path, note: str = "") -> list[dict]:
    """``path`` compiled for every recipe and target (outputs under ``work``): one row per pair, starting with
    ``key``, holding the outcome (ok, declined with the reason's first line, or a crash with where it was raised), the
    first output's cosine to fp32 ONNX Runtime on ``test``, the lowest per-layer SQNR and the share of integer tensors
    equal to the integer reference (the probe build, for a TVM target) and, ``main_equal``, the share of the main
    build's outputs (what ``qcompile run`` runs) equal to the reference's. Shared by every sweep tool."""
    import onnxruntime as ort

    from qcompile import ir

    def fp32(model) -> tuple[str, np.ndarray]:
        sess = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
        name = sess.get_outputs()[0].name
        return name, sess.run([name], test)[0]

    try:
        first, ref = fp32(str(path))
    except Exception as exc:  # noqa: BLE001 - ORT refuses the export: fp32 is qcompile's loaded model
        why = re.sub(r"^\[ONNXRuntimeError\] : \d+ : \w+ : ", "", str(exc).splitlines()[0])
        why = why.split("Status Message: ")[-1][:100]
        note += f" (fp32 from qcompile's loaded model: ONNX Runtime fails on the export: {why})"
        try:
            first, ref = fp32(ir.load_model(str(path)).SerializeToString())
        except Exception:  # noqa: BLE001 - the export itself is broken: a row, not the end of the sweep
            row = {**key, "target": "-", "result": f"export unusable: ONNX Runtime fails on it: {why}"}
            log.info("%s", row)
            return [row]
    stem = "-".join(str(v) for v in key.values())
    rows = []
    for recipe, target in ((r, t) for r in recipes for t in targets):
        t0 = time.perf_counter()
        row = {**key, "recipe": recipe, "target": target}
        try:
            art = qcompile.compile(str(path), calib=str(calib), recipe=recipe, target=target,
                                   out_dir=work / f"{stem}-{recipe}-{target}", check_numerics=False,
                                   measure_latency=False)
            y = art.run(test)[first]
            layers = art.report.get("layers") or []
            sq = [r.get("sqnr_db") for r in layers if isinstance(r, dict) and r.get("sqnr_db") is not None]
            row.update(result="ok" + note, cosine=round(_cos(y, ref), 4),
                       min_layer_sqnr=round(min(sq), 1) if sq else None)
            lsb = art.report.get("lsb_vs_reference", {}).get(target)
            if isinstance(lsb, dict):
                row["int_equal"] = lsb.get("equal", lsb.get("error"))
                main = [m.get("equal") for m in lsb.get("main_outputs") or []]
                row["main_equal"] = min(main) if main and None not in main else None
        except QCompileError as e:
            row["result"] = f"declined ({type(e).__name__}): {str(e).splitlines()[0][:140]}"
        except Exception as e:  # noqa: BLE001 -- a crash is a result of the sweep
            tb = traceback.extract_tb(e.__traceback__)[-1]
            row["result"] = (f"CRASH {type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''} "
                             f"[{Path(tb.filename).name}:{tb.lineno}]")
        row["s"] = round(time.perf_counter() - t0, 1)
        log.info("%s", row)
        rows.append(row)
    return rows


def add_sweep_args(ap: argparse.ArgumentParser, opset: int | None = 17) -> None:
    """The options every sweep tool takes: targets, recipes, opset, a folder to keep the outputs in."""
    ap.add_argument("--targets", nargs="*", default=["onnxruntime", "tvm-x86"])
    ap.add_argument("--recipes", nargs="*", default=["w8a8"])
    if opset is not None:
        ap.add_argument("--opset", type=int, default=opset)
    ap.add_argument("--keep", type=Path, help="keep the exported models and outputs here")


def quiet_logs(*noisy: str) -> None:
    """Progress rows to stderr; the exporters' warnings (dozens per model) and these loggers' INFO silenced."""
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(message)s")
    warnings.filterwarnings("ignore")
    for name in noisy:
        logging.getLogger(name).setLevel(logging.ERROR)


@contextlib.contextmanager
def work_folder(keep: Path | None):
    """``keep`` (created), or a temporary folder removed afterwards: where a sweep writes models and outputs."""
    with tempfile.TemporaryDirectory() as tmp:
        work = keep or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        yield work


def print_table(rows: list[dict], cols: list[str]) -> None:
    print("| " + " | ".join(cols) + " |\n|" + "---|" * len(cols))
    for r in rows:
        print("| " + " | ".join(str(r.get(c, "")) for c in cols) + " |")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--archs", nargs="*", default=list(ARCHS))
    add_sweep_args(ap)
    ap.add_argument("--exporter", choices=["torchscript", "dynamo"], default="torchscript")
    ap.add_argument("--dynamic", choices=["batch", "all"], default="all",
                    help="axes marked dynamic: the batch only, or also sequence/time and picture height/width")
    args = ap.parse_args(argv)
    quiet_logs("qcompile", "torch", "transformers")
    unknown = [a for a in args.archs if a not in ARCHS]
    if unknown:
        ap.error(f"unknown architectures {unknown}; known: {list(ARCHS)}")
    rows = []
    with work_folder(args.keep) as work:
        for name in args.archs:
            rows += sweep_one(name, args.targets, args.recipes, args.opset, args.exporter, work, args.dynamic)
    cols = ["arch", "recipe", "target", "result", "cosine", "min_layer_sqnr", "int_equal", "main_equal", "s"]
    print(f"`python tools/arch_sweep.py {' '.join(sys.argv[1:])}` (exporter {args.exporter}, dynamic axes "
          f"{args.dynamic}, opset {args.opset}, onnx {onnx.__version__})\n")
    print_table(rows, cols)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
