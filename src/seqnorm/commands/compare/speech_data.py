"""``seqnorm compare --tasks speech``, data: spoken digit strings synthesized with espeak-ng.

Nothing is downloaded: espeak-ng (a Debian package) speaks each utterance in
~10 ms. An utterance is a string of 1–6 digits (0–9) spoken by one *voice* —
an English accent (``en-us``, ``en-gb-scotland``, …) with a variant (``m3``,
``f2``, ``klatt4``, …) — at a speaking rate and pitch drawn per utterance,
resampled from espeak's 22.05 kHz to mono 16 kHz, its silences trimmed to a
random margin, with white noise at 20–35 dB SNR. Every utterance lasts
0.5–4 s (a string that comes out longer is spoken again faster).

The test voices' variants never occur in training (:data:`TRAIN_VOICES`,
:data:`TEST_VOICES`), so the test measures generalization to new speakers.
Everything is fixed by the seed; splits are cached as ``.npz`` under the output
folder, keyed by their parameters, so a second run reads them back.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import numpy as np

from .. import CommandError

SAMPLE_RATE = 16_000
ESPEAK_RATE = 22_050
MIN_SECONDS, MAX_SECONDS = 0.5, 4.0
MAX_DIGITS = 6
#: the CTC vocabulary: 0 is the blank, digit d is d + 1
VOCAB_SIZE = 11
BLANK = 0

#: (accent, variant): ten training voices over six accents and ten variants
TRAIN_VOICES: Tuple[Tuple[str, str], ...] = (
    ("en-us", "m1"), ("en-gb", "f1"), ("en-gb-scotland", "m2"), ("en-gb-x-rp", "f2"), ("en-029", "m3"),
    ("en-us-nyc", "f3"), ("en-us", "klatt"), ("en-gb", "m5"), ("en-gb-x-gbclan", "f5"), ("en-gb-x-rp", "m7"),
)
#: held-out voices: variants no training voice uses, over accents training has
TEST_VOICES: Tuple[Tuple[str, str], ...] = (("en-gb", "m4"), ("en-us", "f4"))

GENERATOR_VERSION = 2   # bump when the synthesis changes: the cache key includes it


def espeak_path() -> Optional[str]:
    return shutil.which("espeak-ng")


def require_espeak() -> str:
    """espeak-ng's path, or a CommandError (exit 2, one line) naming the package."""
    path = espeak_path()
    if path is None:
        raise CommandError("--tasks speech needs espeak-ng, which is not installed: apt-get install espeak-ng")
    return path


@dataclass
class SpeechSplit:
    """Utterances of one split: ``audio[offsets[i]:offsets[i+1]]`` is utterance ``i``."""
    audio: np.ndarray       # (total samples,) float32, 16 kHz
    offsets: np.ndarray     # (N + 1,) int64
    labels: List[List[int]]  # digits 0–9 per utterance
    voices: List[str]       # "accent+variant" per utterance

    def __len__(self) -> int:
        return len(self.labels)

    def wave(self, i: int) -> np.ndarray:
        return self.audio[self.offsets[i]:self.offsets[i + 1]]

    @property
    def seconds(self) -> np.ndarray:
        return np.diff(self.offsets) / SAMPLE_RATE


def _speak(espeak: str, voice: str, text: str, rate: int, pitch: int) -> np.ndarray:
    """espeak-ng's 16-bit mono waveform at 22.05 kHz (its ``--stdout`` WAV header
    leaves the length open, so the samples are read from after the 44-byte header)."""
    raw = subprocess.run([espeak, "-v", voice, "-s", str(rate), "-p", str(pitch), "--stdout", text],
                         capture_output=True, check=True).stdout
    return np.frombuffer(raw[44:], dtype="<i2").astype(np.float32) / 32768.0


def _trim(x: np.ndarray, threshold: float = 0.01) -> np.ndarray:
    loud = np.flatnonzero(np.abs(x) > threshold)
    return x[loud[0]:loud[-1] + 1] if loud.size else x


def resample(x: np.ndarray, rate_in: int = ESPEAK_RATE, rate_out: int = SAMPLE_RATE) -> np.ndarray:
    """Band-limited resampling through the spectrum (``scipy.signal.resample``'s method): the
    spectrum up to the lower Nyquist frequency is kept, so 22.05 → 16 kHz drops 8–11 kHz
    instead of folding it back; the signal is treated as periodic, harmless here as every
    utterance starts and ends in silence."""
    n_out = int(round(len(x) * rate_out / rate_in))
    if n_out == 0 or len(x) == 0:
        return np.zeros(n_out, np.float32)
    spec = np.fft.rfft(x.astype(np.float64))[: n_out // 2 + 1]
    return (np.fft.irfft(spec, n_out) * (n_out / len(x))).astype(np.float32)


def _utterance(espeak: str, voice: str, digits: Sequence[int], rate: int, pitch: int,
               rng: np.random.Generator) -> np.ndarray:
    text = " ".join(str(d) for d in digits)
    while True:
        speech = resample(_trim(_speak(espeak, voice, text, rate, pitch)))
        margins = rng.integers(int(0.05 * SAMPLE_RATE), int(0.2 * SAMPLE_RATE), size=2)
        if len(speech) + margins.sum() <= MAX_SECONDS * SAMPLE_RATE or rate >= 400:
            break
        rate += 40   # too long: say it faster (drawn rates make this rare)
    x = np.concatenate([np.zeros(margins[0], np.float32), speech, np.zeros(margins[1], np.float32)])
    x = x[: int(MAX_SECONDS * SAMPLE_RATE)]
    if len(x) < MIN_SECONDS * SAMPLE_RATE:
        x = np.pad(x, (0, int(MIN_SECONDS * SAMPLE_RATE) - len(x)))
    x = x / max(float(np.abs(x).max()), 1e-6) * rng.uniform(0.3, 0.9)   # a random level
    snr_db = rng.uniform(20, 35)
    noise_rms = np.sqrt(np.mean(speech ** 2) if speech.size else 1e-4) * 10 ** (-snr_db / 20)
    noise_rms *= float(np.abs(x).max()) / max(float(np.abs(speech).max()), 1e-6) if speech.size else 1.0
    return (x + rng.normal(0.0, noise_rms, size=x.shape)).astype(np.float32)


def synthesize(n: int, voices: Sequence[Tuple[str, str]], seed: int, threads: int = 4) -> SpeechSplit:
    """``n`` utterances spoken by ``voices`` in turn (round robin), fixed by ``seed``.

    The draws (digits, rate 130–230 words/min, pitch 25–75, margins, level, noise) come
    from one generator per utterance, seeded from ``(seed, i)``, so the result does not
    depend on ``threads`` (espeak-ng processes run at once)."""
    espeak = require_espeak()

    def one(i: int):
        rng = np.random.default_rng([seed, i])
        accent, variant = voices[i % len(voices)]
        digits = [int(d) for d in rng.integers(0, 10, size=int(rng.integers(1, MAX_DIGITS + 1)))]
        rate, pitch = int(rng.integers(130, 231)), int(rng.integers(25, 76))
        return _utterance(espeak, f"{accent}+{variant}", digits, rate, pitch, rng), digits, f"{accent}+{variant}"

    with ThreadPoolExecutor(max_workers=max(1, threads)) as pool:
        done = list(pool.map(one, range(n)))
    waves = [w for w, _, _ in done]
    offsets = np.concatenate([[0], np.cumsum([len(w) for w in waves])]).astype(np.int64)
    return SpeechSplit(np.concatenate(waves) if waves else np.zeros(0, np.float32), offsets,
                       [d for _, d, _ in done], [v for _, _, v in done])


def _save(split: SpeechSplit, path: str) -> None:
    flat = np.array([d for ds in split.labels for d in ds], dtype=np.int8)
    counts = np.array([len(ds) for ds in split.labels], dtype=np.int64)
    tmp = f"{path}.{os.getpid()}.tmp.npz"   # one per process: two runs may fill the same cache
    np.savez(tmp, audio=(split.audio * 32767).round().clip(-32768, 32767).astype(np.int16), offsets=split.offsets,
             digits=flat, counts=counts, voices=np.array(split.voices))
    os.replace(tmp, path)   # a run stopped half-way leaves no broken cache


def _load(path: str) -> SpeechSplit:
    with np.load(path) as z:
        bounds = np.concatenate([[0], np.cumsum(z["counts"])])
        digits = z["digits"].tolist()
        return SpeechSplit(z["audio"].astype(np.float32) / 32767, z["offsets"],
                           [digits[a:b] for a, b in zip(bounds[:-1], bounds[1:])], z["voices"].tolist())


def load_splits(n_train: int, n_test: int, seed: int, cache_dir: Optional[str] = None,
                threads: int = 4) -> Tuple[SpeechSplit, SpeechSplit, float]:
    """``(train, test, seconds spent synthesizing)``: train from :data:`TRAIN_VOICES`,
    test from :data:`TEST_VOICES` (seeded apart); read from ``cache_dir`` when there,
    written there otherwise (0 seconds when both came from the cache)."""
    out, spent = [], 0.0
    for name, n, voices, split_seed in (("train", n_train, TRAIN_VOICES, seed), ("test", n_test, TEST_VOICES,
                                                                                    seed + 10_000)):
        key = hashlib.sha1(repr((GENERATOR_VERSION, n, voices, split_seed)).encode()).hexdigest()[:10]
        path = os.path.join(cache_dir, f"speech-{name}-{n}-{key}.npz") if cache_dir else None
        if path and os.path.exists(path):
            out.append(_load(path))
            continue
        t0 = time.perf_counter()
        split = synthesize(n, voices, split_seed, threads)
        spent += time.perf_counter() - t0
        if path:
            os.makedirs(cache_dir, exist_ok=True)
            _save(split, path)
        out.append(split)
    return out[0], out[1], spent
