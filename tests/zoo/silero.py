"""Corpus case: Silero VAD (``silero-vad==6.2.3``), a stateful speech model whose graph is one ``If``.

``silero_vad.onnx`` takes a 512-sample chunk of 16 kHz audio with 64 samples of context before
it, the recurrent state ``[2, 1, 128]`` and the sample rate (an int64 scalar: the ``If`` picks the
16 kHz or 8 kHz branch), and returns the speech probability and the next state.

Speech is synthesized offline with Debian's ``espeak-ng`` (several English voices, speeds and
levels) from sentences of the Lee news corpus bundled with gensim, separated by pauses, over
background noise at a random level per stream. A chunk is speech when most of it lies between
the first and last audible sample of an utterance. The metric is frame F1 at the model's usual
0.5 threshold. Splits use disjoint sentences.

Feeds are "teacher-forced": each chunk carries the state the FP32 model had reached at that
point of its stream, so the converter can calibrate and validate chunk by chunk; re-scoring an
artifact (:meth:`ZooCase.evaluate`) instead streams each test recording through it, feeding back
its own state, as a device would.
"""

from __future__ import annotations

import functools
import io
import re
import shutil
import subprocess
import wave

import numpy as np

from .cases import Run, Split, ZooCase, ZooData, package_dir, package_file
from .metrics import binary_f1

RATE = 16000
CHUNK = 512
CONTEXT = 64
VOICES = ("en-gb", "en-us", "en-gb-scotland", "en-gb-x-rp", "en-029", "en-us-nyc")
VARIANTS = ("", "+f2", "+m3", "+f4")
SENTENCE_PARTS = {"calibration": (0.0, 0.4), "validation": (0.4, 0.6), "test": (0.6, 1.0)}


def _recording_dict(audio: np.ndarray, speech: np.ndarray) -> dict[str, np.ndarray]:
    """A test recording: float32 16 kHz ``audio`` and ``speech``, a bool per CHUNK-sample frame
    (a plain dict, so the data cache holds no classes)."""
    return {"audio": audio, "speech": speech}


def model_path():
    return package_file("silero_vad", "data/silero_vad.onnx")


def initial_state() -> np.ndarray:
    return np.zeros((2, 1, 128), np.float32)


def frames(audio: np.ndarray) -> list[np.ndarray]:
    """The model's inputs for a recording: each chunk with the CONTEXT samples before it, [1, 576]."""
    padded = np.concatenate([np.zeros(CONTEXT, np.float32), audio])
    count = len(audio) // CHUNK
    return [padded[i * CHUNK:(i + 1) * CHUNK + CONTEXT][None].copy() for i in range(count)]


def speech_probabilities(run: Run, audio: np.ndarray) -> np.ndarray:
    """Stream ``audio`` through a model, feeding each chunk the state the model itself returned."""
    state, rate, probabilities = initial_state(), np.array(RATE, np.int64), []
    for chunk in frames(audio):
        outputs = run({"input": chunk, "state": state, "sr": rate})
        state = outputs["stateN"]
        probabilities.append(float(outputs["output"].reshape(-1)[0]))
    return np.asarray(probabilities)


@functools.cache
def _sentences() -> tuple[str, ...]:
    text = (package_dir("gensim") / "test/test_data/lee_background.cor").read_text(encoding="utf-8")
    return tuple(s.strip() for s in re.split(r"(?<=[.!?])\s+", text) if 30 <= len(s.strip()) <= 140)


def _speak(text: str, voice: str, words_per_minute: int) -> np.ndarray:
    espeak = shutil.which("espeak-ng")
    if espeak is None:
        raise FileNotFoundError("espeak-ng is not installed (scripts/install-system-deps.sh installs it)")
    wav = subprocess.run([espeak, "-v", voice, "-s", str(words_per_minute), "--stdout", text],
                         capture_output=True, check=True).stdout
    with wave.open(io.BytesIO(wav)) as reader:
        rate = reader.getframerate()
        samples = np.frombuffer(reader.readframes(reader.getnframes()), np.int16).astype(np.float32) / 32768.0
    from scipy.signal import resample_poly

    return resample_poly(samples, RATE, rate).astype(np.float32)


def _recording(sentences: tuple[str, ...], utterances: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    pieces, speech = [], []
    for _ in range(utterances):
        pause = np.zeros(int(rng.uniform(0.3, 1.6) * RATE), np.float32)
        voice = VOICES[int(rng.integers(len(VOICES)))] + VARIANTS[int(rng.integers(len(VARIANTS)))]
        spoken = _speak(sentences[int(rng.integers(len(sentences)))], voice, int(rng.integers(120, 200)))
        audible = np.flatnonzero(np.abs(spoken) > 0.02 * np.abs(spoken).max())
        mask = np.zeros(len(spoken), bool)
        mask[audible[0]:audible[-1] + 1] = True
        pieces += [pause, spoken * rng.uniform(0.15, 0.9)]
        speech += [np.zeros(len(pause), bool), mask]
    audio, mask = np.concatenate(pieces), np.concatenate(speech)
    audio = audio + rng.normal(0.0, rng.uniform(0.002, 0.03), len(audio)).astype(np.float32)
    count = len(audio) // CHUNK
    return _recording_dict(audio.astype(np.float32), mask[:count * CHUNK].reshape(count, CHUNK).mean(axis=1) > 0.5)


def _teacher_forced(recording: dict[str, np.ndarray], session) -> list[dict[str, np.ndarray]]:
    """One feeds dict per chunk, with the state the FP32 model reached before it."""
    state, rate, feeds = initial_state(), np.array(RATE, np.int64), []
    for chunk in frames(recording["audio"]):
        feeds.append({"input": chunk, "state": state, "sr": rate})
        _, state = session.run(None, feeds[-1])
    return feeds


def _split(part: str, recordings: int, utterances: int, seed: int, session) -> tuple[list, list[dict]]:
    rng = np.random.default_rng(seed)
    sentences = _sentences()
    start, stop = SENTENCE_PARTS[part]
    sentences = sentences[int(start * len(sentences)):int(stop * len(sentences))]
    made = [_recording(sentences, utterances, rng) for _ in range(recordings)]
    return [f for r in made for f in _teacher_forced(r, session)], made


def _prepare() -> ZooData:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(str(model_path()), options, providers=["CPUExecutionProvider"])
    calibration, _ = _split("calibration", 2, 6, 41, session)
    picked = np.sort(np.random.default_rng(40).choice(len(calibration), 160, replace=False))
    validation, validation_recordings = _split("validation", 1, 8, 42, session)
    test, test_recordings = _split("test", 2, 8, 43, session)
    return ZooData([calibration[i] for i in picked],
                   Split(validation, np.concatenate([r["speech"] for r in validation_recordings])),
                   Split(test, test_recordings))


def _score(outputs, speech) -> float:
    """Frame F1 at 0.5 on teacher-forced outputs (the converter's gate)."""
    probabilities = np.array([float(o["output"].reshape(-1)[0]) for o in outputs])
    return binary_f1(probabilities > 0.5, speech)


def _stream(run: Run, split: Split) -> float:
    """Frame F1 at 0.5 with the model carrying its own state through each recording."""
    recordings = split.truth
    if isinstance(recordings, np.ndarray):  # the validation split keeps only frame labels
        return _score([run(f) for f in split.feeds], recordings)
    predicted = np.concatenate([speech_probabilities(run, r["audio"]) > 0.5 for r in recordings])
    return binary_f1(predicted, np.concatenate([r["speech"] for r in recordings]))


CASE = ZooCase(
    name="silero-vad",
    family="stateful speech model (voice activity, LSTM state, whole graph inside If)",
    package="silero-vad==6.2.3",
    licence="MIT",
    metric_name="speech_frame_f1",
    model=model_path,
    prepare=_prepare,
    score=_score,
    stream=_stream,
    input_shapes={"input": (1, CHUNK + CONTEXT), "state": (2, 1, 128)},
    state={"state": "stateN"},
    constants={"sr": RATE},  # a device runs one sample rate: the 8 kHz branch goes
    modules=("silero_vad", "gensim", "scipy"),
    programs=("espeak-ng",),
)
