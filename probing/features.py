"""probe.py's first stage: audio -> windows -> frozen encoder -> pooled hidden states, kept in a feature store.

Split out of probe.py because the store is its own concern (file format, resume, memory) and the frame-level tasks
build on it too; probe.py keeps the recipe (tasks, heads, training, the command line).

A clip becomes windows (`clip_windows`, following `Extraction`), every window goes through the encoder, and each of
its layers+1 hidden states is mean-pooled over the window's frames: one row of shape [layers+1, dim] per window.

The store is one folder per (feature set, model, extraction settings):

    <cache>/<feature set>/<model tag>/<digest of the key>/
        meta.json      the cache key in full (model, every extraction setting, sample rate, format) and row shape
        features.f16   all rows, float16, C order, appended clip after clip: read as np.memmap [rows, *row_shape]
        index.jsonl    one line per clip, appended after its rows are on disk: {"key", "start", "rows"}

Anything that changes a feature is in the key, so changing it extracts into a new folder and never mixes rows.
The index line is written (and fsynced) after the clip's rows, so a run killed at any point resumes from the last
indexed clip: rows past it are cut off when the store is reopened. Training reads batches of rows through the
memmap; mapped file pages are not private memory, so a process's RssAnon does not grow with the number of windows,
only with the per-clip index (two integers a clip).
"""
import ctypes
import fcntl
import functools
import hashlib
import json
import math
import multiprocessing
import os
import shutil
from collections import deque
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import asdict, dataclass
from typing import Optional

import numpy as np
import torch
from scipy.signal import resample_poly
from tqdm import tqdm

import soundfile as sf

from data.audio import SAMPLE_RATE, AudioError, _ratio, _resample_context, _resampled_length, load_audio

FORMAT_VERSION = 2  # 1: one fp32 .npy per clip (probe.py part 1); 2: this store
DTYPE = np.float16
AUDIO_WORKERS = 4  # threads decoding audio ahead of the encoder with --workers 0, and in fine-tuning
MERGE_BYTES = 64 << 20  # rows copied from the ranks' part stores into the store this much at a time
BLOCK_SECONDS = 30  # read_16k resamples this much audio at a time
try:  # glibc: return freed heap pages to the system (see extract)
    _malloc_trim = ctypes.CDLL("libc.so.6").malloc_trim
except (OSError, AttributeError):  # another C library: nothing to do
    _malloc_trim = lambda pad: 0


@dataclass(frozen=True)
class Extraction:
    """How a clip becomes pooled rows. Every field is part of the cache key."""
    window: float = 30.0  # seconds per window; Music2Vec's MARBLE configs use 30 s non-overlapping windows
    min_last: float = 1.0  # a last window shorter than this (seconds) is dropped, a longer one kept as it is (MARBLE)
    crop: Optional[float] = None  # only the first `crop` seconds are used (MARBLE's EMO base config: 30)
    # "clip": z-normalise the whole clip once, then cut (MARBLE's extractor); "window": each window on its own
    # (GiantSteps, VocalSet's chunks); "none": the audio as it is (--no-normalize: MERT was trained on it)
    normalize: str = "clip"
    trim: Optional[str] = None  # "leading_silence": VocalSet's preprocess trims leading silence (sox VAD in MARBLE)
    cut: str = "16k"  # "16k": cut the 16 kHz signal; "vocalset": MARBLE's VocalSet chunking, see vocalset_chunks
    cut_rate: Optional[int] = None  # for cut="vocalset": the rate the chunks are cut at (MARBLE: 44,100)
    pooling: str = "mean"  # mean over the window's frames
    sample_rate: int = SAMPLE_RATE  # the model's rate: clips are resampled to it (runs.task_extraction sets it)

    def __post_init__(self):
        if self.normalize not in ("clip", "window", "none"):
            raise ValueError(f"Extraction.normalize must be 'clip', 'window' or 'none', got {self.normalize!r}")
        if self.trim not in (None, "leading_silence"):
            raise ValueError(f"Extraction.trim must be None or 'leading_silence', got {self.trim!r}")
        if self.cut not in ("16k", "vocalset") or (self.cut == "vocalset") != (self.cut_rate is not None):
            raise ValueError(f"Extraction.cut {self.cut!r} with cut_rate {self.cut_rate!r}: use '16k' without a "
                             "rate or 'vocalset' with one")
        if self.pooling != "mean":
            raise ValueError(f"Extraction.pooling: only 'mean' is implemented, got {self.pooling!r}")
        if not self.window > 0 or (self.crop is not None and not self.crop > 0):
            raise ValueError(f"Extraction: window {self.window} and crop {self.crop} must be positive seconds")


def cache_key(model_tag, ext):
    """Everything that changes a stored row: the model, the extraction settings, the rate and the file format."""
    settings = {k: v for k, v in asdict(ext).items() if k != "sample_rate"}  # 16 kHz keys as before the field
    return dict(format=FORMAT_VERSION, model=model_tag, sample_rate=ext.sample_rate, dtype=np.dtype(DTYPE).name,
                **settings)


def store_path(cache_dir, features, key):
    digest = hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]
    return os.path.join(cache_dir, features, key["model"], digest)


# ------------------------------------------------------------------------------------------------------------------
# windows

def znorm(x):
    # Wav2Vec2FeatureExtractor(do_normalize=True), which MARBLE applies to every file: (x - mean) / sqrt(var + 1e-7)
    x = np.asarray(x, np.float64)
    return ((x - x.mean()) / np.sqrt(x.var() + 1e-7)).astype(np.float32)


def znorm_(x, block=1 << 20):
    """znorm in place on a float32 array, in blocks: the same values, without float64 copies of a whole track."""
    n = len(x)
    mean = sum(float(x[i:i + block].sum(dtype=np.float64)) for i in range(0, n, block)) / n
    var = sum(float(((x[i:i + block] - mean) ** 2).sum()) for i in range(0, n, block)) / n
    for i in range(0, n, block):
        x[i:i + block] = (x[i:i + block].astype(np.float64) - mean) / np.sqrt(var + 1e-7)
    return x


def read_16k(path, frames=None, block_seconds=BLOCK_SECONDS, rate=SAMPLE_RATE):
    """load_audio(path, sr=rate, frames=frames): float32 mono at `rate` (16 kHz unless the model's is another), the first `frames` samples or all, with the same
    samples, but resampled block by block into one preallocated array, each block from a source segment aligned as
    load_audio aligns a crop (with the FIR's reach either side). A 10-minute 44.1 kHz track then peaks at its
    decoded source (106 MB mono) plus the 38 MB result, instead of ~250 MB with a float64 resample of the whole.
    The file is decoded in one read, from its start: python-soundfile seeks after every read, and after a seek
    libsndfile's mp3 decoder returns silence for frames whose data lies in the emptied bit reservoir (data/audio.py),
    so reading an mp3 in pieces is not safe."""
    try:
        f = sf.SoundFile(str(path))
    except Exception as e:
        raise AudioError(f"{path}: unreadable or corrupt audio file ({e})") from None
    with f:
        source_sr, total = f.samplerate, f.frames
        if total <= 0:
            raise AudioError(f"{path}: empty (0 frames)")
        up, down = _ratio(source_sr, rate)
        want = total if frames is None else min(total, -(-int(frames) * down // up) + _resample_context(up, down))
        try:
            x = f.read(want, dtype="float32", always_2d=True)
        except Exception as e:
            raise AudioError(f"{path}: unreadable or corrupt audio data ({e})") from None
    if x.shape[0] == 0:
        raise AudioError(f"{path}: no audio data could be decoded (header says {total} frames)")
    x = x.mean(axis=1) if x.shape[1] > 1 else x[:, 0]
    if up == down:
        out = np.ascontiguousarray(x[:frames])
    else:
        stop = _resampled_length(len(x), source_sr, rate)
        stop = stop if frames is None else min(stop, int(frames))
        out, context, step = np.empty(stop, np.float32), _resample_context(up, down), int(block_seconds * rate)
        for o0 in range(0, stop, step):
            o1 = min(stop, o0 + step)
            s0 = max(0, (o0 * down // up - context) // down * down)  # load_audio's crop alignment
            s1 = min(len(x), -(-o1 * down // up) + context)
            y = resample_poly(x[s0:s1], up, down)
            out[o0:o1] = y[o0 - s0 * up // down:o1 - s0 * up // down]
        del x
    if not np.isfinite(out).all():
        raise AudioError(f"{path}: contains non-finite samples (NaN or Inf)")
    return out


def trim_leading_silence(x, frame=320, floor_db=-40.0):
    """Drops the `frame`-sample frames (20 ms at 16 kHz) before the first one within `floor_db` of the loudest
    frame. A stand-in for the sox VAD (torchaudio.functional.vad) that MARBLE runs on VocalSet, which also trims
    leading silence only, but decides by a spectral measure with its own trigger level and time constants."""
    n = len(x) // frame
    if n == 0:
        return x
    rms = np.sqrt((x[: n * frame].astype(np.float64).reshape(n, frame) ** 2).mean(1))
    loud = np.flatnonzero(rms >= rms.max() * 10 ** (floor_db / 20))
    return x[loud[0] * frame:]


def vocalset_chunks(x, rate, seconds):
    """MARBLE's VocalSet partition: chunks of `rate // 1000 * ms` samples (132,000 at 44.1 kHz: 2.993 s), taken
    while the remaining length is strictly longer than a chunk, the remainder dropped; so a signal of L samples gives
    (L - 1) // chunk chunks (exactly 3 s of audio gives none)."""
    chunk = rate // 1000 * int(round(seconds * 1000))
    return [x[i * chunk:(i + 1) * chunk] for i in range(max(0, (len(x) - 1) // chunk))]


def clip_windows(path, ext):
    """The windows of one audio file, float32 at the model's rate (ext.sample_rate), each to go through the encoder
    as it is.

    cut "16k" (MARBLE's extract_*_features.py; the name is the 16 kHz models'): read at the model's rate (the first `crop` seconds), z-normalise the whole clip,
    then non-overlapping windows of `window` seconds; only the last may be shorter, and is dropped under `min_last`.
    cut "vocalset" (MARBLE's tasks/VocalSet/preprocess.py, which writes each chunk as its own file): read at
    `cut_rate`, trim leading silence, cut vocalset_chunks, resample each chunk to the model's rate on its own and z-normalise it.
    """
    if ext.cut == "vocalset":
        wav = load_audio(path, sr=ext.cut_rate)  # MARBLE resamples to 44.1 kHz first: a no-op for VocalSet's files
        if ext.trim:
            wav = trim_leading_silence(wav, frame=ext.cut_rate // 50)
        rate = ext.sample_rate
        g = math.gcd(rate, ext.cut_rate)
        windows = [resample_poly(c, rate // g, ext.cut_rate // g).astype(np.float32)
                   for c in vocalset_chunks(wav, ext.cut_rate, ext.window)]
    else:
        rate = ext.sample_rate
        wav = read_16k(path, frames=None if ext.crop is None else int(round(ext.crop * rate)), rate=rate)
        if ext.trim:
            wav = trim_leading_silence(wav, frame=rate // 50)
        if ext.normalize == "clip":
            wav = znorm_(wav)  # the windows below are views of it: a 10-minute track is held once, in float32
        size = int(rate * ext.window)
        windows = [wav[s:s + size] for s in range(0, len(wav), size)]
        if windows and len(windows[-1]) < rate * ext.min_last:
            windows.pop()
    return [znorm_(w) for w in windows] if ext.normalize == "window" else windows  # in place (views)


@torch.no_grad()
def encode(encoder, inputs, device):
    """1-D float32 arrays -> (the encoder's output on them as one zero-padded batch, their lengths); lengths go to the
    encoder only when they differ. normalize=False: the probe has normalised the audio already (once per clip, as
    MARBLE), so an encoder whose config normalises its input (data2vec) must not renormalise each window."""
    lengths = torch.tensor([len(x) for x in inputs])
    wav = torch.zeros(len(inputs), int(lengths.max()))
    for i, x in enumerate(inputs):
        wav[i, :len(x)] = torch.from_numpy(x)
    equal = bool((lengths == lengths[0]).all())
    return encoder(wav.to(device), lengths=None if equal else lengths.to(device), normalize=False), lengths


@torch.no_grad()
def pooled_hidden_states(encoder, windows, device):
    """Windows (list of 1-D float32 arrays) -> [windows, layers+1, dim] float32: every hidden state mean-pooled over
    the window's valid frames."""
    out, _ = encode(encoder, windows, device)
    h = torch.stack(out.hidden_states, 1)  # B x S x T x D
    if out.padding_mask is None:
        return h.mean(2).float().cpu()
    valid = (~out.padding_mask).to(h.dtype)[:, None, :, None]
    return ((h * valid).sum(2) / valid.sum(2)).float().cpu()


# ------------------------------------------------------------------------------------------------------------------
# the store

class StoreError(Exception):
    """A feature store on disk is not what its files say; str(err) names the file."""


class FeatureStore:
    """See the module docstring for the layout. `index` maps a clip key to (first row, number of rows)."""

    def __init__(self, path, key=None, row_shape=None, write=False, wait=None):
        """write: open for appending (one writer at a time: an flock, released when the process ends however it
        ends). wait: a function called once if another process holds the store, before blocking until it is done;
        None raises StoreError instead."""
        self.path, self.write = path, write
        self.meta_path = os.path.join(path, "meta.json")
        self.data_path = os.path.join(path, "features.f16")
        self.index_path = os.path.join(path, "index.jsonl")
        self._lock = None
        if write:
            os.makedirs(path, exist_ok=True)
            self._lock = open(os.path.join(path, ".lock"), "w")
            try:
                fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                if wait is None:
                    raise StoreError(f"{path}: another process is extracting into this feature store") from None
                wait(f"{path}: another process is extracting into this feature store; waiting for it")
                fcntl.flock(self._lock, fcntl.LOCK_EX)
            if not os.path.exists(self.meta_path):
                tmp = self.meta_path + f".tmp{os.getpid()}"
                with open(tmp, "w") as f:
                    json.dump(dict(key=key, row_shape=list(row_shape), dtype=np.dtype(DTYPE).name), f, indent=1)
                os.replace(tmp, self.meta_path)
        try:
            with open(self.meta_path) as f:
                meta = json.load(f)
        except (OSError, json.JSONDecodeError) as e:
            raise StoreError(f"{self.meta_path}: unreadable feature store metadata ({e}); delete {path} to "
                             "extract again") from None
        if key is not None and meta.get("key") != key:
            raise StoreError(f"{self.meta_path}: written for {meta.get('key')}, not {key}; delete {path}")
        self.key, self.row_shape = meta["key"], tuple(meta["row_shape"])
        self.row_bytes = int(np.prod(self.row_shape)) * np.dtype(DTYPE).itemsize
        self.index, self.rows = self._read_index()
        size = os.path.getsize(self.data_path) if os.path.exists(self.data_path) else 0
        if size < self.rows * self.row_bytes:
            raise StoreError(f"{self.data_path}: {size} bytes, but {self.index_path} lists {self.rows} rows of "
                             f"{self.row_bytes} bytes; delete {path} to extract again")
        if write and size > self.rows * self.row_bytes:  # rows of a clip whose index line was never written
            os.truncate(self.data_path, self.rows * self.row_bytes)
        self._array = None
        self._part, self._part_rows = None, 0  # a clip being written part by part (write_part / commit)

    def _read_index(self):
        index, rows, good_bytes = {}, 0, 0
        if not os.path.exists(self.index_path):
            return index, 0
        with open(self.index_path, "rb") as f:
            for line in f:
                if not line.endswith(b"\n"):
                    break  # the run stopped while writing this line: the clip is extracted again
                try:
                    entry = json.loads(line)
                    k, start, n = entry["key"], int(entry["start"]), int(entry["rows"])
                except (ValueError, KeyError, TypeError):
                    raise StoreError(f"{self.index_path}: line {len(index) + 1} is not an index entry; delete "
                                     f"{self.path} to extract again") from None
                if start != rows:
                    raise StoreError(f"{self.index_path}: line {len(index) + 1} starts at row {start}, expected "
                                     f"{rows}; delete {self.path} to extract again")
                index[k] = (start, n)
                rows += n
                good_bytes += len(line)
        if self.write and good_bytes < os.path.getsize(self.index_path):
            os.truncate(self.index_path, good_bytes)
        return index, rows

    def append(self, clips):
        """clips: [(key, float32 array [n, *row_shape])]. Rows first (fsynced), then the index lines."""
        lines = []
        with open(self.data_path, "ab") as f:
            for k, a in clips:
                if tuple(a.shape[1:]) != self.row_shape:
                    raise ValueError(f"{k}: rows of shape {a.shape[1:]}, the store holds {self.row_shape}")
                f.write(np.ascontiguousarray(a, dtype=DTYPE).tobytes())
                lines.append(json.dumps(dict(key=k, start=self.rows, rows=len(a))) + "\n")
                self.index[k] = (self.rows, len(a))
                self.rows += len(a)
            f.flush()
            os.fsync(f.fileno())
        with open(self.index_path, "a") as f:
            f.write("".join(lines))
            f.flush()
            os.fsync(f.fileno())
        self._array = None

    def write_part(self, a):
        """Rows of the clip being written, appended now; its index line comes with commit(). A long track's frame
        rows (probing/frames.py) go to disk window by window, so memory holds one window, not the track."""
        if tuple(a.shape[1:]) != self.row_shape:
            raise ValueError(f"rows of shape {a.shape[1:]}, the store holds {self.row_shape}")
        if self._part is None:
            self._part, self._part_rows = open(self.data_path, "ab"), 0
        self._part.write(np.ascontiguousarray(a, dtype=DTYPE).tobytes())
        self._part_rows += len(a)

    def commit(self, key):
        """Indexes the rows written by write_part() since the last commit as clip `key` (rows fsynced first)."""
        f, n = self._part, self._part_rows
        f.flush()
        os.fsync(f.fileno())
        f.close()
        self._part = None
        with open(self.index_path, "a") as g:
            g.write(json.dumps(dict(key=key, start=self.rows, rows=n)) + "\n")
            g.flush()
            os.fsync(g.fileno())
        self.index[key] = (self.rows, n)
        self.rows += n
        self._array = None

    def abandon(self):
        """Drops the rows written since the last commit (a clip that failed part-way)."""
        if self._part is not None:
            self._part.close()
            self._part = None
            os.truncate(self.data_path, self.rows * self.row_bytes)

    def close(self):
        self.abandon()
        if self._lock is not None:
            self._lock.close()  # releases the flock
            self._lock = None

    def array(self):
        """All rows as a read-only memmap [rows, *row_shape] float16 (nothing is read until it is indexed)."""
        if self._array is None:
            if self.rows == 0:
                self._array = np.zeros((0, *self.row_shape), DTYPE)
            else:
                self._array = np.memmap(self.data_path, dtype=DTYPE, mode="r", shape=(self.rows, *self.row_shape))
        return self._array

    def item_rows(self, keys, per="clip"):
        """(starts, counts) of each item: per="clip" one item per key (all its windows), per="window" one item per
        window (a clip's windows become separate items, in order). Also the position in `keys` of each item."""
        spans = np.array([self.index[k] for k in keys], dtype=np.int64).reshape(-1, 2)
        if per == "clip":
            return spans[:, 0], spans[:, 1], np.arange(len(keys))
        owner = np.repeat(np.arange(len(keys)), spans[:, 1])
        first = np.repeat(spans[:, 0] - np.cumsum(spans[:, 1]) + spans[:, 1], spans[:, 1])
        return first + np.arange(len(owner)), np.ones(len(owner), np.int64), owner


def rows_of(starts, counts):
    """The row numbers of items given their (starts, counts), item after item."""
    offsets = np.cumsum(counts) - counts
    return np.repeat(starts - offsets, counts) + np.arange(int(counts.sum()))


class Rows:
    """The rows of one store as the head trainer reads them: from the memmap (CPU), or from one copy on the GPU when
    it fits (uploaded in slices, so host memory stays flat either way)."""

    def __init__(self, store, device, on_device_bytes):
        self.array, self.device = store.array(), device
        self.on_device = None
        if device != "cpu" and self.array.nbytes <= on_device_bytes:
            self.on_device = torch.empty(self.array.shape, dtype=torch.float16, device=device)
            step = max(1, (256 << 20) // max(1, store.row_bytes))
            for s in range(0, len(self.array), step):
                self.on_device[s:s + step] = torch.from_numpy(np.asarray(self.array[s:s + step])).to(device)

    def __call__(self, rows):
        """float32 [len(rows), *row_shape] on the device."""
        if self.on_device is not None:
            return self.on_device[torch.as_tensor(rows, device=self.device)].float()
        return torch.from_numpy(np.asarray(self.array[rows])).to(self.device).float()


# ------------------------------------------------------------------------------------------------------------------
# decoding ahead of the encoder: threads, or processes (--workers)

def _read_windows(path, ext):
    try:
        return clip_windows(path, ext), None
    except AudioError as e:
        return None, str(e)


def _in_order(pool, fn, items, ahead, arg=lambda item: item):
    """(item, fn(arg(item))) in item order, at most `ahead` submitted to `pool` before the caller takes them; what is
    still pending when the caller stops is cancelled."""
    pending = deque()
    try:
        for item in items:
            pending.append((item, pool.submit(fn, arg(item))))
            if len(pending) >= ahead:
                it, fut = pending.popleft()
                yield it, fut.result()
        while pending:
            it, fut = pending.popleft()
            yield it, fut.result()
    finally:
        for _, fut in pending:
            fut.cancel()


def prefetch(fn, items, workers):
    """fn over items in order on a thread pool, at most 4 * workers ahead (audio decoding overlaps the encoder)."""
    with ThreadPoolExecutor(workers) as pool:
        yield from _in_order(pool, fn, items, 4 * workers)


def default_workers():
    """--workers' default: the CPUs this process may run on, shared by the ranks of its node (torchrun's
    LOCAL_WORLD_SIZE)."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cpus // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1"))))


_POOLS = {}  # worker count -> ProcessPoolExecutor, kept for the life of the process (tasks and models reuse it)


def decode_ahead(fn, clips, workers):
    """(clip, fn(clip.path)) in clip order, decoded ahead of the caller (at most 4 clips a worker in flight).
    workers > 0: that many processes, so decoding (mp3 frames, resampling: ~150x real time a core) is not bound by
    the GIL of the process that runs the encoder; they are forked from a forkserver, which starts without this
    process's threads or CUDA context. workers 0: AUDIO_WORKERS threads of this process. fn must be picklable (a
    module-level function, or a functools.partial of one): it runs in another process."""
    if workers == 0:
        yield from prefetch(lambda c: fn(c.path), clips, AUDIO_WORKERS)
        return
    pool = _POOLS.get(workers)
    if pool is None:
        pool = _POOLS[workers] = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("forkserver"))
    last = None
    try:
        for clip, result in _in_order(pool, fn, clips, 4 * workers, arg=lambda c: c.path):
            last = clip
            yield clip, result
    except BrokenProcessPool:
        _POOLS.pop(workers, None)
        near = f"after {last.path}" if last is not None else "at the first clips"
        raise StoreError(f"a decoding process died (killed for memory?) {near}; run again with fewer "
                         "--workers: what was extracted is kept") from None


# ------------------------------------------------------------------------------------------------------------------
# units, ranks and part stores

def ranks():
    """(rank, world size) when probe.py runs under torchrun (it starts the process group), else (0, 1)."""
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def header_seconds(clips, crop=None):
    """Each clip's duration from its header (0 for an unreadable one: it fails when decoded), at most `crop`."""
    def one(c):
        try:
            info = sf.info(str(c.path))
            return min(info.frames / info.samplerate, crop or math.inf)
        except Exception:  # soundfile raises LibsndfileError, RuntimeError or TypeError, by the failure
            return 0.0
    with ThreadPoolExecutor(16) as pool:  # header reads wait on the disk (a network one most of all), not the CPU
        return list(pool.map(one, clips))


def plan_units(clips, seconds, budget_seconds):
    """Consecutive clips grouped into units of up to `budget_seconds` of audio by their header durations (a unit holds
    at least one clip). A unit is encoded and committed together and its encoder calls depend on its own clips only,
    so they are a function of the clip list: one process and any number of ranks (unit i on rank i % W) encode every
    clip in the same batches and write the same rows, and so does a resumed run."""
    units, unit, total = [], [], 0.0
    for c, s in zip(clips, seconds):
        if unit and total + s > budget_seconds:
            units.append(unit)
            unit, total = [], 0.0
        unit.append(c)
        total += s
    if unit:
        units.append(unit)
    return units


def _agree(error):
    """Every rank's error (or None) to every rank; all raise StoreError if any rank has one, so that no rank waits
    at a barrier for a rank that has stopped."""
    rank, world = ranks()
    errors = [error]
    if world > 1:
        errors = [None] * world
        torch.distributed.all_gather_object(errors, error)
    bad = [f"rank {r}: {e}" if world > 1 else e for r, e in enumerate(errors) if e]
    if bad:
        raise StoreError("; ".join(bad))


def part_path(path, rank, world):
    return os.path.join(path, f"part-{rank}-of-{world}")


def merge_parts(store, order=(), log=print):
    """Copies the clips of the part stores under store.path (the ranks' shares) into the store, those in `order` (clip
    keys) first and in that order, then deletes the parts. Rows go to disk before the index lines (FeatureStore), so
    a merge stopped at any point loses nothing: it is run again on the next start."""
    names = sorted(n for n in os.listdir(store.path) if n.startswith("part-"))
    if not names:
        return
    parts = [FeatureStore(os.path.join(store.path, n), store.key) for n in names]
    where = {}
    for part in parts:
        for k in part.index:
            where.setdefault(k, part)
    keys = list(dict.fromkeys([k for k in order if k in where] + list(where)))
    keys = [k for k in keys if k not in store.index]
    batch, size = [], 0
    for k in keys:
        part = where[k]
        start, n = part.index[k]
        rows = part.array()[start:start + n]
        if n * store.row_bytes > MERGE_BYTES:  # a long track's frames: copied in pieces, indexed once
            step = max(1, MERGE_BYTES // store.row_bytes)
            for i in range(0, n, step):
                store.write_part(np.asarray(rows[i:i + step]))
            store.commit(k)
            continue
        batch.append((k, rows))
        size += n * store.row_bytes
        if size >= MERGE_BYTES:
            store.append(batch)
            batch, size = [], 0
    if batch:
        store.append(batch)
    for n in names:
        shutil.rmtree(os.path.join(store.path, n))
    if keys:
        log(f"{store.path}: {len(keys)} clips copied from {len(names)} part store{'s' if len(names) > 1 else ''}")


def unit_budget(ext, encoder, batch_seconds):
    """Samples of audio per unit and encoder call, at the model's rate (which the extraction must be at)."""
    if ext.sample_rate != encoder.cfg.sample_rate:
        raise ValueError(f"extraction at {ext.sample_rate} Hz for a model of {encoder.cfg.sample_rate} Hz")
    return batch_seconds * ext.sample_rate


def extract_units(path, key, row_shape, clips, seconds, budget_seconds, work, log=print):
    """The store at `path` completed with every clip of `clips` that can be extracted; returns {clip key: reason}
    for the others (from every rank). Clips are planned into units (plan_units, from `seconds(todo)` durations) and
    work(out, units, stored, todo, failed) extracts the given units into the store `out`, leaving out the clips of
    `stored` (already in the store; a unit is redone whole when any of its clips is missing).
    Under torchrun the units not yet stored are shared: rank r does every W-th, starting at r, into its part store
    <path>/part-r-of-W/ (a FeatureStore of the same key), and rank 0 copies the parts into the store in unit order
    once every rank is done. A run killed on any rank resumes: rank 0 first copies what the parts hold."""
    rank, world = ranks()
    clips = list(dict((c.key, c) for c in clips).values())
    main, error = None, None
    if rank == 0:
        try:
            main = FeatureStore(path, key, row_shape, write=True, wait=log)
            merge_parts(main, log=log)  # what an interrupted sharded run left
        except StoreError as e:
            error = str(e)
    try:
        _agree(error)
        stored = set(main.index if rank == 0 else FeatureStore(path, key).index)
        todo = [c for c in clips if c.key not in stored]
        failed = {}
        if todo:
            plan = plan_units(clips, seconds(clips), budget_seconds)
            units = [u for u in plan if any(c.key not in stored for c in u)][rank::world]
            if world == 1:
                work(main, units, stored, todo, failed)
            else:
                error = None
                try:
                    out = FeatureStore(part_path(path, rank, world), key, row_shape, write=True, wait=log)
                    try:
                        work(out, units, stored, todo, failed)
                    finally:
                        out.close()
                except Exception as e:  # every rank stops with it, not only this one
                    error = f"{type(e).__name__}: {e}" if not isinstance(e, StoreError) else str(e)
                gathered = [None] * world
                torch.distributed.all_gather_object(gathered, (failed, error))
                bad = [f"rank {r}: {e}" for r, (_, e) in enumerate(gathered) if e]
                if bad:
                    raise StoreError("; ".join(bad))
                failed = {k: v for f, _ in gathered for k, v in f.items()}
                if rank == 0:
                    merge_parts(main, [c.key for u in plan for c in u], log)
        return failed
    finally:
        if main is not None:
            main.close()


# ------------------------------------------------------------------------------------------------------------------
# extraction into the store

def extract(ext, clips, encoder, path, key, device, batch_seconds, log=print, workers=0):
    """Extracts the clips not yet in the store at `path` (under torchrun, this rank's share: extract_units) and
    returns {clip key: reason} for those that could not be used. A unit (about `batch_seconds` of audio) is encoded
    in calls of up to that much audio, a long clip's windows spanning several, and committed once all its clips are
    done. workers: decoding processes (0: threads; decode_ahead)."""
    num_states, dim = encoder.cfg.layers + 1, encoder.cfg.dim
    budget = unit_budget(ext, encoder, batch_seconds)
    rank, world = ranks()

    def work(store, units, stored, todo, failed):
        nonlocal encoder
        encoder = encoder.to(device)
        batch = []

        def flush():
            windows = [w for _, ws in batch for w in ws]
            pooled, i = [], 0
            while i < len(windows):  # a long track's windows are split over several encoder calls
                j, n = i + 1, len(windows[i])
                while j < len(windows) and n + len(windows[j]) <= budget:
                    n, j = n + len(windows[j]), j + 1
                pooled.append(pooled_hidden_states(encoder, windows[i:j], device).numpy())
                # glibc keeps freed blocks under its (adaptive, up to 32 MB) mmap threshold in the heap; without a
                # trim, the activations of one call and the audio decoded by the reader threads pile up, and a
                # 10-minute track ends ~70 MB higher than its audio needs (tests/test_probe_mtg.py)
                _malloc_trim(0)
                i = j
            pooled = np.concatenate(pooled) if pooled else None
            done, start = [], 0
            for clip, ws in batch:
                a = pooled[start:start + len(ws)]
                start += len(ws)
                if clip.key in stored or clip.key in store.index:
                    continue  # encoded again only because its unit was not complete
                peak = float(np.abs(a).max())
                if not np.isfinite(peak) or peak > np.finfo(DTYPE).max:
                    failed[clip.key] = (f"{clip.path}: hidden states reach {peak:.3g}, beyond float16 "
                                        f"(max {np.finfo(DTYPE).max:g}); the model's activations are not storable")
                else:
                    done.append((clip.key, a))
            store.append(done)
            batch.clear()

        unit_of = {c.key: i for i, u in enumerate(units) for c in u}
        current = None
        bar = tqdm(total=sum(len(u) for u in units), unit="clip",
                   desc=f"extract -> {path}" + (f" (rank {rank} of {world})" if world > 1 else ""))
        for clip, (windows, error) in decode_ahead(functools.partial(_read_windows, ext=ext),
                                                   [c for u in units for c in u], workers):
            if batch and unit_of[clip.key] != current:
                flush()
            current = unit_of[clip.key]
            if error is None and not windows:
                error = f"{clip.path}: too short for one window ({describe_windows(ext)})"
            if error is not None:
                failed[clip.key] = error
            else:
                batch.append((clip, windows))
            bar.update(1)
        if batch:
            flush()
        bar.close()

    crop = ext.crop if ext.cut == "16k" else None
    return extract_units(path, key, (num_states, dim), clips, lambda cs: header_seconds(cs, crop), batch_seconds,
                         work, log)


def describe_windows(ext):
    if ext.cut == "vocalset":
        return (f"{ext.window:g} s chunks at {ext.cut_rate} Hz, more than one chunk's length needed after trimming "
                "leading silence")
    crop = f"the first {ext.crop:g} s, " if ext.crop else ""
    return f"{crop}{ext.window:g} s windows, a last window under {ext.min_last:g} s dropped"
