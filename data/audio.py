"""Reading audio files: one function that every stage uses, so that every stage sees the same samples.

load_audio returns float32 mono at 16 kHz (the rate of every model here, as in fairseq's wav2vec/HuBERT/data2vec).
Channels are averaged, the rate is converted with scipy's polyphase resampler, and `start`/`frames` (counted at the
output rate) read only the needed part of the file, so a 30 s crop out of a 10-minute track decodes ~30 s.
Every failure is an AudioError whose message starts with the path.
"""
import math

import numpy as np
import soundfile as sf
from scipy.signal import resample_poly

SAMPLE_RATE = 16000
AUDIO_EXTENSIONS = ("wav", "flac", "ogg", "mp3")


def _resample_context(up, down):
    # resample_poly's default FIR reaches 10 * max(up, down) samples to each side in the upsampled domain, i.e.
    # 10 * max(up, down) / up source samples (28 for 44.1 -> 16 kHz, 60 for 96 -> 16 kHz). Reading this much extra
    # source audio around a crop makes its samples equal to those of the whole-file resample (tested).
    return -(-10 * max(up, down) // up) + 1


class AudioError(Exception):
    """A file cannot be used as audio; str(err) is "<path>: <reason>"."""


def _ratio(source_sr, sr):
    g = math.gcd(int(source_sr), int(sr))
    return int(sr) // g, int(source_sr) // g  # up, down


def _resampled_length(num_frames, source_sr, sr):
    # resample_poly returns ceil(n * up / down) samples
    up, down = _ratio(source_sr, sr)
    return -(-num_frames * up // down)


def audio_info(path, sr=SAMPLE_RATE):
    """(num_samples at `sr` exactly as load_audio returns them, source sample rate, channels), from the header."""
    try:
        info = sf.info(str(path))
    except Exception as e:  # soundfile raises LibsndfileError / RuntimeError / TypeError depending on the failure
        raise AudioError(f"{path}: unreadable or corrupt audio file ({e})") from None
    if info.frames <= 0:
        raise AudioError(f"{path}: empty (0 frames in the header)")
    return _resampled_length(info.frames, info.samplerate, sr), info.samplerate, info.channels


def load_audio(path, sr=SAMPLE_RATE, start=0, frames=None, min_samples=1):
    """Read `path` as float32 mono at `sr`, samples [start, start + frames) of the resampled signal.

    start, frames: counted at the output rate `sr`; frames=None reads to the end; a request running past the end
    returns what is there (never padding). min_samples: fewer returned samples is an AudioError ("too short").
    """
    try:
        f = sf.SoundFile(str(path))
    except Exception as e:
        raise AudioError(f"{path}: unreadable or corrupt audio file ({e})") from None
    with f:
        source_sr, total = f.samplerate, f.frames
        if total <= 0:
            raise AudioError(f"{path}: empty (0 frames)")
        up, down = _ratio(source_sr, sr)
        out_total = _resampled_length(total, source_sr, sr)
        if start < 0 or start >= out_total:
            raise AudioError(f"{path}: start {start} outside the file ({out_total} samples at {sr} Hz)")
        stop = out_total if frames is None else min(out_total, start + int(frames))
        if up == down:
            src_start, src_stop, out_offset = start, stop, start
        else:
            # Start reading at a multiple of `down` source samples: the resampled output of the segment then lies
            # on the same time grid as the whole-file output (output index = source index * up / down).
            context = _resample_context(up, down)
            src_start = max(0, (start * down // up - context) // down * down)
            src_stop = min(total, -(-stop * down // up) + context)
            out_offset = src_start * up // down
        try:
            f.seek(src_start)
            x = f.read(src_stop - src_start, dtype="float32", always_2d=True)
        except Exception as e:
            raise AudioError(f"{path}: unreadable or corrupt audio data ({e})") from None
    if x.shape[0] == 0:
        raise AudioError(f"{path}: no audio data could be decoded (header says {total} frames)")
    x = x.mean(axis=1) if x.shape[1] > 1 else x[:, 0]
    if up != down:
        x = resample_poly(x, up, down).astype(np.float32)
    x = x[start - out_offset: stop - out_offset]
    if not np.isfinite(x).all():
        raise AudioError(f"{path}: contains non-finite samples (NaN or Inf)")
    if len(x) < min_samples:
        raise AudioError(f"{path}: too short ({len(x)} samples at {sr} Hz, need at least {min_samples})")
    return np.ascontiguousarray(x, dtype=np.float32)
