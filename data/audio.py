"""Reading audio files: one function that every stage uses, so that every stage sees the same samples.

load_audio returns float32 mono at 16 kHz (the rate of every model here, as in fairseq's wav2vec/HuBERT/data2vec).
Channels are averaged, the rate is converted with scipy's polyphase resampler, and `start`/`frames` (counted at the
output rate) read only the needed part of the file, so a 30 s crop out of a 10-minute track decodes ~30 s.
Every failure is an AudioError whose message starts with the path.

mp3 crops: libsndfile (1.2.2, with mpg123 1.32) decodes wrong audio for up to tens of MPEG frames after a seek:
mpg123's seek empties the layer-3 bit reservoir, so a frame whose main data starts in earlier frames decodes as
silence until enough frames have been read again (on a LAME-encoded pure tone: ~2,000 zeros, then a fade-in). A read
from the start of the file, with no seek before it, is exact. python-soundfile seeks after every read (to keep its
position), so reading a file in pieces has the same fault. load_audio therefore starts an mp3 crop at most
`mp3_seek_margin` source samples earlier and drops them; see that function for the bound.
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


def mp3_seek_margin(source_sr):
    """Source samples to decode before the first wanted sample of an mp3 after a seek, so that it is the sample a
    read from the file's start gives (tests/test_data.py). From the MPEG audio spec: a layer-3 frame's main data may
    start up to 511 bytes (MPEG-1; 255 for MPEG-2/2.5) before its header, in earlier frames. After a seek, mpg123 can
    decode a frame only once the frames read since hold that many bytes of main data; at the lowest bitrate (32 kbps
    MPEG-1, 8 kbps MPEG-2/2.5) with stereo side info and a CRC, a frame carries the fewest: e.g. 66 bytes at 44.1 kHz,
    so 8 frames. Two more frames renew the IMDCT overlap and the 512-sample synthesis filter. Measured worst cases
    (LAME via libsndfile, CBR and VBR, tone, noise and gapped music, 30 seeks each): 4.9 frames at 44.1 kHz, 5.8 at
    48 kHz, 44.5 at 22.05 kHz and 79.2 at 24 kHz / 8 kbps, against bounds of 10, 11, 87 and 257 frames. The margin
    is 0.25 s of audio at the MPEG-1 rates (44.1 and 48 kHz: 11,520 and 12,672 samples), up to 6.2 s at 24 kHz.
    (Free-format streams, which may go below the lowest listed bitrate, are not covered.)"""
    if source_sr >= 32000:  # MPEG-1: 1152 samples a frame, frames of 144 * bitrate / rate bytes
        spf, reservoir, frame_bytes, side_info = 1152, 511, 144 * 32000 // source_sr, 32
    else:  # MPEG-2 (16-24 kHz) and 2.5 (8-12 kHz): 576 samples a frame, 72 * bitrate / rate bytes
        spf, reservoir, frame_bytes, side_info = 576, 255, 72 * 8000 // source_sr, 17
    main_bytes = max(1, frame_bytes - 4 - side_info - 2)  # less the header, side info and CRC
    return (-(-reservoir // main_bytes) + 2) * spf


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
        # an mp3 is decoded from `lead` samples earlier (the frames a seek leaves undecodable; see the docstring on
        # top), or from its start, where no seek is needed
        lead = min(src_start, mp3_seek_margin(source_sr)) if f.format == "MP3" else 0
        try:
            if src_start - lead > 0 or f.format != "MP3":
                f.seek(src_start - lead)
            x = f.read(src_stop - src_start + lead, dtype="float32", always_2d=True)[lead:]
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
