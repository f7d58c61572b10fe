"""Real inputs for the third-party corpus, made deterministically on this machine (no data download).

Text lines, captchas and document pages are rendered with Pillow in the DejaVu fonts (Debian ``fonts-dejavu-core``,
installed by ``tools/setup``) from the words of ``sentences.txt``; speech is synthesized with ``espeak-ng`` and
resampled with ``sox`` (both Debian packages, ``tools/setup``), then cut with silences and noise, so a voice
activity detector has both speech and non-speech frames. Every generator takes a seed and returns images as uint8
HWC RGB arrays (or float32 mono audio at 16 kHz); each model's own preprocessing is in ``corpus.py``.
"""
from __future__ import annotations

import glob
import random
import shutil
import subprocess
import tempfile
import wave
from importlib import resources
from pathlib import Path

import numpy as np

FONT_GLOB = "/usr/share/fonts/truetype/dejavu/DejaVu*.ttf"
SAMPLE_RATE = 16000


def _fonts() -> list[str]:
    fonts = sorted(f for f in glob.glob(FONT_GLOB) if "Oblique" not in f or "Sans" in f)
    if not fonts:
        raise RuntimeError(f"no fonts match {FONT_GLOB}: run tools/setup (Debian package fonts-dejavu-core)")
    return fonts


def words() -> list[str]:
    text = resources.files(__package__).joinpath("sentences.txt").read_text(encoding="utf-8")
    return [w.strip(".,;:!?\"'()") for w in text.split() if w.strip(".,;:!?\"'()")]


def sentences() -> list[str]:
    text = resources.files(__package__).joinpath("sentences.txt").read_text(encoding="utf-8")
    return [s.strip() for s in text.splitlines() if s.strip()]


def _font(rng: random.Random, size: int):
    from PIL import ImageFont

    return ImageFont.truetype(rng.choice(_fonts()), size)


def text_line(rng: random.Random, height: int = 48, max_chars: int = 26) -> tuple[np.ndarray, str]:
    """One printed text line (1-4 words, dark ink on a light, slightly noisy paper), its own width."""
    from PIL import Image, ImageDraw

    vocab = words()
    txt = " ".join(rng.choice(vocab) for _ in range(rng.randint(1, 4)))[:max_chars].strip()
    if rng.random() < 0.3:
        txt = f"{txt} {rng.randint(0, 9999)}"
    font = _font(rng, rng.randint(int(height * 0.55), int(height * 0.72)))
    w = int(font.getlength(txt)) + rng.randint(8, 24)
    paper = tuple(rng.randint(215, 255) for _ in range(3))
    ink = tuple(rng.randint(0, 70) for _ in range(3))
    img = Image.new("RGB", (w, height), paper)
    ImageDraw.Draw(img).text((rng.randint(3, 10), rng.randint(0, height // 6)), txt, font=font, fill=ink)
    arr = np.asarray(img, np.float32)
    arr += np.random.default_rng(rng.randint(0, 2**31)).normal(0, rng.uniform(0, 8), arr.shape)
    return np.clip(arr, 0, 255).astype(np.uint8), txt


def captcha(rng: random.Random, width: int = 160, height: int = 64) -> tuple[np.ndarray, str]:
    """A 4-6 character captcha: colored characters at jittered positions and angles, noise lines and dots."""
    from PIL import Image, ImageDraw

    alphabet = "abcdefghijkmnpqrstuvwxyzABCDEFGHJKLMNPQRSTUVWXYZ23456789"
    txt = "".join(rng.choice(alphabet) for _ in range(rng.randint(4, 6)))
    img = Image.new("RGB", (width, height), tuple(rng.randint(200, 255) for _ in range(3)))
    draw = ImageDraw.Draw(img)
    step = (width - 16) / len(txt)
    for i, ch in enumerate(txt):
        glyph = Image.new("RGBA", (48, 56), (0, 0, 0, 0))
        ImageDraw.Draw(glyph).text((6, 2), ch, font=_font(rng, rng.randint(30, 40)),
                                   fill=tuple(rng.randint(0, 150) for _ in range(3)) + (255,))
        glyph = glyph.rotate(rng.uniform(-25, 25), resample=Image.BILINEAR)
        img.paste(glyph, (int(8 + i * step + rng.uniform(-3, 3)), rng.randint(0, 10)), glyph)
    for _ in range(rng.randint(2, 5)):
        draw.line([(rng.randint(0, width), rng.randint(0, height)) for _ in range(2)],
                  fill=tuple(rng.randint(0, 200) for _ in range(3)), width=rng.randint(1, 2))
    for _ in range(rng.randint(50, 150)):
        x, y = rng.randint(0, width - 1), rng.randint(0, height - 1)
        draw.point((x, y), fill=tuple(rng.randint(0, 255) for _ in range(3)))
    return np.asarray(img), txt


def document(rng: random.Random, width: int, height: int) -> np.ndarray:
    """A page: a title, paragraphs of text lines, sometimes a boxed table or a gray figure, on off-white paper."""
    from PIL import Image, ImageDraw

    vocab = words()
    img = Image.new("RGB", (width, height), tuple(rng.randint(225, 255) for _ in range(3)))
    draw = ImageDraw.Draw(img)
    y = rng.randint(6, 20)
    margin = rng.randint(6, width // 10)
    while y < height - 20:
        kind = rng.random()
        if kind < 0.12 and y < height - 80:  # a figure or a table
            h = rng.randint(40, min(120, height - y - 10))
            x1 = rng.randint(margin + 20, width - margin)
            if rng.random() < 0.5:
                draw.rectangle([margin, y, x1, y + h], fill=tuple(rng.randint(90, 200) for _ in range(3)))
            else:
                draw.rectangle([margin, y, x1, y + h], outline=(0, 0, 0), width=1)
                for r in range(1, 4):
                    draw.line([(margin, y + r * h // 4), (x1, y + r * h // 4)], fill=(0, 0, 0))
            y += h + rng.randint(8, 20)
            continue
        size = rng.randint(18, 26) if kind < 0.22 else rng.randint(10, 16)
        font = _font(rng, size)
        line = " ".join(rng.choice(vocab) for _ in range(rng.randint(2, 12)))
        while line and font.getlength(line) > width - 2 * margin:
            line = line.rsplit(" ", 1)[0] if " " in line else line[:-1]
        draw.text((margin + rng.randint(0, 10), y), line, font=font, fill=tuple(rng.randint(0, 60) for _ in range(3)))
        y += int(size * rng.uniform(1.3, 2.2))
    return np.asarray(img)


def objects_scene(rng: random.Random, size: int) -> np.ndarray:
    """A click-captcha-like scene: a textured background with 3-6 large, rotated characters."""
    from PIL import Image, ImageDraw

    base = np.random.default_rng(rng.randint(0, 2**31)).uniform(0, 255, (size // 16, size // 16, 3))
    bg = Image.fromarray(base.astype(np.uint8)).resize((size, size), Image.BICUBIC)
    img = bg.copy()
    alphabet = "ABCDEFGHKMNPRSTWXYZ2345689"
    for _ in range(rng.randint(3, 6)):
        g = Image.new("RGBA", (size // 4, size // 4), (0, 0, 0, 0))
        ImageDraw.Draw(g).text((size // 40, 0), rng.choice(alphabet), font=_font(rng, rng.randint(size // 8, size // 5)),
                               fill=tuple(rng.randint(0, 255) for _ in range(3)) + (255,),
                               stroke_width=2, stroke_fill=(255, 255, 255, 255))
        g = g.rotate(rng.uniform(-40, 40), resample=Image.BILINEAR)
        img.paste(g, (rng.randint(0, size - size // 4), rng.randint(0, size - size // 4)), g)
    return np.asarray(img)


def speech(rng: random.Random, seconds: float = 4.0) -> np.ndarray:
    """16 kHz mono float32: espeak-ng speech (random voice, speed, pitch) cut in with silence and noise."""
    for tool in ("espeak-ng", "sox"):
        if shutil.which(tool) is None:
            raise RuntimeError(f"{tool} not found: run tools/setup (Debian packages espeak-ng, sox)")
    n = int(seconds * SAMPLE_RATE)
    out = np.random.default_rng(rng.randint(0, 2**31)).normal(0, rng.uniform(0.001, 0.01), n).astype(np.float32)
    pos = int(rng.uniform(0.2, 1.0) * SAMPLE_RATE)
    with tempfile.TemporaryDirectory(prefix="qcompile-speech-") as tmp:
        raw, wav = Path(tmp) / "raw.wav", Path(tmp) / "16k.wav"
        while pos < n - SAMPLE_RATE // 2:
            text = rng.choice(sentences())
            voice = rng.choice(["en", "en-us", "en+m3", "en+f2", "en+f4", "en-gb"])
            subprocess.run(["espeak-ng", "-v", voice, "-s", str(rng.randint(130, 190)), "-p", str(rng.randint(30, 70)),
                            "-w", str(raw), text], check=True, capture_output=True)
            subprocess.run(["sox", str(raw), "-r", str(SAMPLE_RATE), "-c", "1", "-b", "16", str(wav)], check=True,
                           capture_output=True)
            with wave.open(str(wav)) as w:
                voice_pcm = np.frombuffer(w.readframes(w.getnframes()), np.int16).astype(np.float32) / 32768.0
            take = voice_pcm[: min(len(voice_pcm), n - pos, int(rng.uniform(0.6, 1.6) * SAMPLE_RATE))]
            out[pos:pos + len(take)] += take * rng.uniform(0.3, 1.0)
            pos += len(take) + int(rng.uniform(0.3, 1.2) * SAMPLE_RATE)
    return np.clip(out, -1.0, 1.0)
