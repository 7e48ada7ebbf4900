"""The pre-training data pipeline: manifest -> random crops (+ k-means labels) -> batches.

fairseq's behaviour is the reference (spec/pretrain.md §1.3, §4.2): clips shorter than min_sample_size are dropped,
every clip of a batch is cropped to the shortest one at a random offset (no padding), and HuBERT labels are cropped
in step with the audio. What we add: the crop offset is a pure function of (seed, epoch, index), so a run is
reproducible whatever the number of workers; only the cropped part of a file is decoded; the batch sampler can skip
the batches a resumed run already consumed in the current epoch.
"""
import os
import sys

if __name__ == "__main__":  # run as a script (the `stats` command): make the repository importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import glob
import logging
import math

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from data.audio import SAMPLE_RATE, AudioError, audio_info, load_audio
from data.manifest import read_manifest

log = logging.getLogger(__name__)


class LabelError(ValueError):
    """A .km label file does not match its manifest; the message names the file and the 1-based line."""


def load_labels(km_path, manifest_entries, label_rate, tolerance_seconds=0.1, sample_rate=SAMPLE_RATE):
    """Read a fairseq .km file (one line per manifest entry, space-separated cluster ids at `label_rate` Hz).

    Returns a list of int arrays (uint16 when every id < 65536) aligned with manifest_entries. Stops with a
    LabelError when the line count differs from the manifest or a line's length differs from
    num_samples * label_rate / sample_rate (the manifest's counts are at the model's rate) by more than
    tolerance_seconds (fairseq only warns; a misaligned label file silently trains on wrong targets, so here it is
    an error).
    """
    tol = tolerance_seconds * label_rate
    labels = []
    with open(km_path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if lineno > len(manifest_entries):
                raise LabelError(f"{km_path}:{lineno}: more label lines than the {len(manifest_entries)} "
                                 f"manifest entries")
            try:
                ids = np.array(line.split(), dtype=np.int64)
            except ValueError:
                raise LabelError(f"{km_path}:{lineno}: labels must be space-separated integers, found "
                                 f"{line[:60]!r}") from None
            if len(ids) and ids.min() < 0:
                raise LabelError(f"{km_path}:{lineno}: negative label {ids.min()}")
            rel, num_samples = manifest_entries[lineno - 1]
            expected = num_samples * label_rate / sample_rate
            if abs(len(ids) - expected) > tol:
                raise LabelError(f"{km_path}:{lineno}: {len(ids)} labels for {rel} but its {num_samples} samples "
                                 f"({sample_rate} Hz audio) at {label_rate} Hz need {expected:.1f} (tolerance "
                                 f"{tolerance_seconds} s); is label_rate right and was the .km made from this "
                                 f"manifest?")
            labels.append(ids.astype(np.uint16) if len(ids) == 0 or ids.max() < 65536 else ids)
    if len(labels) != len(manifest_entries):
        raise LabelError(f"{km_path}: {len(labels)} label lines but the manifest has {len(manifest_entries)} entries")
    return labels


def crop_labels(labels, offset, num_samples, label_rate, sample_rate=SAMPLE_RATE):
    """Labels covering audio samples [offset, offset + num_samples), as fairseq's HubertDataset.collater_frm_label:
    start round(offset * rate / sample_rate), length round(num_samples * rate / sample_rate), clipped to what
    remains."""
    start = int(round(offset * label_rate / sample_rate))
    length = int(round(num_samples * label_rate / sample_rate))
    return labels[start:start + length]


# ------------------------------------------------------------------------------------- whole-file normalisation
# fairseq's data2vec normalises each *file* to zero mean and unit variance before cropping (RawAudioDataset
# `normalize`: F.layer_norm over the whole waveform). A crop normalised on its own would blow the quiet intro of a
# song up to the loudness of its chorus. Decoding the whole file at every step to get its statistics would cost
# far more than the crop, so they are computed once per manifest line and cached in a file next to the manifest
# (`<manifest>.stats` style, see default_stats_path):
#   line 1: the manifest's root folder; then one line per file: rel_path <TAB> num_samples <TAB> mean <TAB> std
# Several ranks share the work (split by audio duration so they finish together), each appending its results to
# its own `<stats>.part<rank>` as it goes, so an interrupted pass resumes where it stopped; the merged file is
# written atomically. A line is reused only when its path and sample count match the manifest.

WAVEFORM_NORM_EPS = 1e-5  # F.layer_norm's eps, which data2vec's per-utterance normalisation uses


def file_mean_std(path, block_seconds=60.0, sample_rate=SAMPLE_RATE):
    """(mean, population std) of all of a file's samples as load_audio returns them (mono, at sample_rate: the
    model's, as training reads them), read in blocks
    so that an hour-long recording never sits in memory. Blocks are merged with Chan et al.'s pairwise update in
    float64 (no sum-of-squares cancellation when the file has a DC offset)."""
    total = audio_info(path, sample_rate)[0]
    block = max(1, int(block_seconds * sample_rate))
    n, mean, m2 = 0, 0.0, 0.0
    for start in range(0, total, block):
        x = load_audio(path, sample_rate, start=start, frames=block).astype(np.float64)
        nb, mb = len(x), float(x.mean())
        m2b = float(((x - mb) ** 2).sum())
        delta, n_new = mb - mean, n + nb
        mean += delta * nb / n_new
        m2 += m2b + delta * delta * n * nb / n_new
        n = n_new
    return mean, math.sqrt(m2 / n)


def normalize_with(wav, mean, std):
    """(wav - mean) / sqrt(std^2 + eps): the whole file's normalisation applied to a crop of it."""
    return ((wav - mean) / math.sqrt(std * std + WAVEFORM_NORM_EPS)).astype(np.float32)


def default_stats_path(manifest_path):
    """train.tsv -> train.stats.tsv, next to the manifest."""
    base, ext = os.path.splitext(str(manifest_path))
    return base + ".stats" + (ext or ".tsv")


def _parse_stats_line(line):
    cols = line.rstrip("\n").rstrip("\r").split("\t")
    if len(cols) != 4:
        raise ValueError(f"expected 4 tab-separated columns, found {len(cols)}")
    return cols[0], int(cols[1]), float(cols[2]), float(cols[3])


def read_file_stats(stats_path, root, entries):
    """N x 2 float64 [mean, std] per manifest entry from the stats file and any partial files of an interrupted
    pass; NaN where a line is missing, has another root, or names another sample count (a changed file).
    A malformed line in the stats file is an error naming it; in a partial file (a kill mid-write) it is ignored."""
    index = {(rel, n): i for i, (rel, n) in enumerate(entries)}
    out = np.full((len(entries), 2), np.nan)
    for path in [stats_path] + sorted(glob.glob(glob.escape(stats_path) + ".part*")):
        if not os.path.isfile(path):
            continue
        partial = path != stats_path
        with open(path, encoding="utf-8") as f:
            lines = f.read().split("\n")
        if not lines or lines[0].rstrip("\r") != root:
            continue  # statistics of another folder's files
        for lineno, line in enumerate(lines[1:], start=2):
            if not line:
                continue
            try:
                rel, n, mean, std = _parse_stats_line(line)
            except ValueError as e:
                if partial:
                    continue
                raise ValueError(f"{path}:{lineno}: {e}; delete the file to recompute the statistics") from None
            i = index.get((rel, n))
            if i is not None and math.isfinite(mean) and math.isfinite(std) and std >= 0:
                out[i] = mean, std
    return out


def _stats_job(args):
    i, path, sample_rate = args
    try:
        # at the default rate, the call it has always been (tests spy on file_mean_std(path))
        stats = file_mean_std(path) if sample_rate == SAMPLE_RATE else file_mean_std(path, sample_rate=sample_rate)
        return i, stats, None
    except AudioError as e:
        return i, None, str(e)


def split_by_duration(indices, num_samples, parts):
    """Indices dealt into `parts` lists of near-equal total duration (longest first, each to the lightest part),
    so that ranks computing statistics finish together."""
    load = np.zeros(parts)
    out = [[] for _ in range(parts)]
    for i in sorted(indices, key=lambda i: (-int(num_samples[i]), i)):
        p = int(np.argmin(load))
        out[p].append(int(i))
        load[p] += num_samples[i]
    return out


def whole_file_stats(manifest, stats_path, workers=1, rank=0, world_size=1, all_gather=None, progress=True,
                     sample_rate=SAMPLE_RATE):
    """[mean, std] of every file of `manifest` (a .tsv path or (root, entries)), N x 2 float64 aligned with its
    entries, computed once and cached in `stats_path`; NaN for files that could not be decoded, with the reasons
    in the second return value {index: reason}.

    With several ranks, pass rank, world_size and all_gather (a function taking this rank's object and returning
    the list of every rank's, e.g. torch.distributed.all_gather_object; every rank must call this function): rank
    0's view of the cache decides what is missing, each rank computes its share in `workers` processes, and rank 0
    writes the merged file. Every rank returns the same result. sample_rate: the rate the statistics are taken at
    (the manifest's counts are at it too, so a cache line of another rate names another count and is recomputed)."""
    root, entries = read_manifest(manifest) if isinstance(manifest, (str, os.PathLike)) else manifest
    folder = os.path.dirname(os.path.abspath(stats_path))
    if not os.path.isdir(folder) or not os.access(folder, os.W_OK):
        raise OSError(f"{stats_path}: cannot write whole-file statistics there (folder missing or read-only); "
                      f"give a writable path (pretrain_music2vec.py --file_stats_tsv=..., data/dataset.py stats "
                      f"--out ...)")
    known = read_file_stats(stats_path, root, entries)
    if world_size > 1:  # ranks on other nodes may not see the same files: all split rank 0's list of missing lines
        known = all_gather(known)[0]
    todo = np.flatnonzero(np.isnan(known[:, 0]))
    lengths = np.array([n for _, n in entries], dtype=np.int64)
    mine = split_by_duration(todo, lengths, world_size)[rank]
    found, failed = {}, {}
    part = f"{stats_path}.part{rank}"
    if mine:
        from multiprocessing import Pool
        from tqdm import tqdm
        jobs = [(i, os.path.join(root, entries[i][0]), sample_rate) for i in mine]
        hours = lengths[mine].sum() / sample_rate / 3600
        bar = tqdm(total=len(jobs), unit="file", disable=not progress or rank != 0,
                   desc=f"whole-file statistics ({hours:.2f} h on rank {rank})")
        new_part = not os.path.exists(part)
        pool = Pool(workers) if workers > 1 and len(jobs) > 1 else None
        try:
            results = map(_stats_job, jobs) if pool is None else pool.imap_unordered(_stats_job, jobs, chunksize=4)
            with open(part, "a", encoding="utf-8") as f:  # appended as they come: a killed pass resumes from here
                if new_part:
                    f.write(root + "\n")
                for i, stats, error in results:
                    if error is None:
                        found[i] = stats
                        f.write(f"{entries[i][0]}\t{entries[i][1]}\t{float(stats[0])!r}\t{float(stats[1])!r}\n")
                        f.flush()
                    else:
                        failed[i] = error
                    bar.update()
        finally:
            if pool is not None:
                pool.close()
                pool.join()
            bar.close()
    if world_size > 1:
        gathered = all_gather((found, failed))
        found, failed = {}, {}
        for fo, fa in gathered:
            found.update(fo)
            failed.update(fa)
    for i, stats in found.items():
        known[i] = stats
    if found and rank == 0:
        tmp = f"{stats_path}.tmp{os.getpid()}"
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(root + "\n")
            for i, (rel, n) in enumerate(entries):
                if not np.isnan(known[i, 0]):
                    f.write(f"{rel}\t{n}\t{float(known[i, 0])!r}\t{float(known[i, 1])!r}\n")
        os.replace(tmp, stats_path)
    if world_size > 1:
        all_gather(None)  # the merged file exists before any rank drops its partial results
    if found:
        for path in glob.glob(glob.escape(stats_path) + ".part*") if rank == 0 else [part]:
            try:
                os.remove(path)
            except FileNotFoundError:  # the other rank removed it first (rank 0 also clears stale parts)
                pass
    return known, failed


class AudioClips(Dataset):
    """Clips of a manifest, each randomly cropped to at most crop_seconds.

    item = (index, waveform float32 tensor, crop offset in samples, label int64 tensor or None); the labels are
    fairseq's crop for the waveform plus up to 2 spare labels that collate_crop / collate_pad cut off
    manifest: a .tsv path or a (root, entries) pair. labels: a .km path or a list from load_labels (aligned with
    the full manifest). file_stats: None, or [mean, std] per manifest entry (whole_file_stats) to normalise every
    crop with its whole file's statistics (fairseq's data2vec; NaN rows are unreadable files). crop_seconds=None
    returns whole clips. sample_rate: the rate audio is read at (the model's); the manifest's counts, offsets and
    crops are in samples at it, seconds are converted with it. Call set_epoch(e) before each epoch (before the
    DataLoader starts its workers: make_loader does not keep workers alive between epochs, so they see it).
    """

    def __init__(self, manifest, crop_seconds, min_seconds=2.0, labels=None, label_rate=None, skip_bad_audio=False,
                 seed=0, file_stats=None, file_stats_errors=None, sample_rate=SAMPLE_RATE):
        is_path = isinstance(manifest, (str, os.PathLike))
        root, entries = read_manifest(manifest) if is_path else manifest
        self.name = str(manifest) if is_path else root
        if labels is not None:
            if not label_rate:
                raise ValueError("labels given without label_rate (Hz: 100 for MFCC k-means, 50 for HuBERT features)")
            if isinstance(labels, (str, os.PathLike)):
                labels = load_labels(labels, entries, label_rate)
            elif len(labels) != len(entries):
                raise ValueError(f"{len(labels)} label sequences for {len(entries)} manifest entries")
        self.sample_rate = sample_rate
        min_samples = int(round(min_seconds * sample_rate))
        keep = [i for i, (_, n) in enumerate(entries) if n >= min_samples]
        self.num_too_short = len(entries) - len(keep)
        if self.num_too_short:
            log.warning("%s: %d of %d clips are shorter than %.1f s and are left out", self.name,
                        len(entries) - len(keep), len(entries), min_seconds)
        if not keep:
            raise ValueError(f"{self.name}: no clip is at least {min_seconds} s long")
        self.root = root
        self.paths = [entries[i][0] for i in keep]
        self.num_samples = np.array([entries[i][1] for i in keep], dtype=np.int64)
        self.labels = None if labels is None else [labels[i] for i in keep]
        if file_stats is not None and len(file_stats) != len(entries):
            raise ValueError(f"{len(file_stats)} whole-file statistics for {len(entries)} manifest entries")
        self.file_stats = None if file_stats is None else np.asarray(file_stats, dtype=np.float64)[keep]
        errors = file_stats_errors or {}
        self.file_stats_errors = {j: errors[i] for j, i in enumerate(keep) if i in errors}
        self.label_rate = label_rate
        self.crop_samples = None if crop_seconds is None else int(round(crop_seconds * sample_rate))
        self.min_samples = min_samples
        self.skip_bad_audio = skip_bad_audio
        self.seed = seed
        self.epoch = 0
        self.num_bad = 0  # per process: each DataLoader worker counts its own

    def __len__(self):
        return len(self.paths)

    @property
    def lengths(self):
        """Length in samples of each item after the crop (for length-grouped batching)."""
        return self.num_samples if self.crop_samples is None else np.minimum(self.num_samples, self.crop_samples)

    def set_epoch(self, epoch):
        self.epoch = epoch

    def crop_offset(self, index):
        n = int(self.num_samples[index])
        if self.crop_samples is None or n <= self.crop_samples:
            return 0
        rng = np.random.default_rng([self.seed, self.epoch, index])
        return int(rng.integers(0, n - self.crop_samples + 1))

    def _load(self, index):
        offset = self.crop_offset(index)
        path = os.path.join(self.root, self.paths[index])
        if self.file_stats is not None and np.isnan(self.file_stats[index, 0]):
            reason = self.file_stats_errors.get(index, "not computed")
            reason = reason[len(path) + 2:] if reason.startswith(path + ": ") else reason
            raise AudioError(f"{path}: no whole-file statistics ({reason})")
        wav = load_audio(path, self.sample_rate, start=offset, frames=self.crop_samples)
        if self.file_stats is not None:
            wav = normalize_with(wav, *self.file_stats[index])
        labels = None
        if self.labels is not None:
            # fairseq's crop of the labels, plus 2 spare labels past its end: the batch crop (collate_crop) takes
            # round((offset + s) * r) ... and rounding twice can run up to 2 labels past round(offset * r) +
            # round(len * r); with the spares its result equals fairseq's single crop exactly. The collate
            # functions cut the spares off.
            start = int(round(offset * self.label_rate / self.sample_rate))
            length = int(round(len(wav) * self.label_rate / self.sample_rate)) + 2
            labels = torch.from_numpy(self.labels[index][start:start + length].astype(np.int64))
        return index, torch.from_numpy(wav), offset, labels

    def __getitem__(self, index):
        if not self.skip_bad_audio:
            return self._load(index)
        original = index
        for attempt in range(10):
            try:
                return self._load(index)
            except AudioError as e:
                self.num_bad += 1
                # a replacement that depends only on (seed, epoch, index, attempt): reproducible across workers
                index = int(np.random.default_rng([self.seed, self.epoch, original, attempt + 1]).integers(len(self)))
                log.warning("skipping bad audio (%d so far in this process): %s; using item %d instead",
                            self.num_bad, e, index)
        path = os.path.join(self.root, self.paths[original])
        raise AudioError(f"{path}: it and 10 replacement clips failed to load (see the warnings above)")


def _stack_labels(labels):
    if labels[0] is None:
        return None
    # -1 marks label positions with no label (pretrain losses ignore it, like fairseq's pad index)
    out = torch.full((len(labels), max(len(x) for x in labels)), -1, dtype=torch.int64)
    for i, x in enumerate(labels):
        out[i, :len(x)] = x
    return out


def collate_crop(items, label_rate=None, sample_rate=SAMPLE_RATE):
    """fairseq's pre-training batching: every clip is cropped to the shortest clip of the batch, no padding.

    The offset inside each clip is random but a pure function of the item (its index and its own crop offset,
    which depends on seed and epoch), so results do not depend on worker scheduling. "offset" is the absolute
    start of each row in its file. With labels, label_rate (Hz) and the audio's sample_rate are needed to crop
    them in step; make_loader passes the dataset's.
    -> {"wav": B x N float32, "lengths": None, "labels": B x L int64 (-1 = no label) or None, "index": B,
        "offset": B}
    """
    size = min(len(it[1]) for it in items)
    wavs, labels, offsets = [], [], []
    for index, wav, offset, lab in items:
        extra = len(wav) - size
        s = 0 if extra == 0 else int(np.random.default_rng([index, offset, size]).integers(0, extra + 1))
        wavs.append(wav[s:s + size])
        offsets.append(offset + s)
        if lab is not None:
            if not label_rate:
                raise ValueError("collate_crop: items have labels; pass label_rate (make_loader does)")
            # The item's labels start at round(offset * r); taking them from round((offset + s) * r) equals
            # cropping the file's labels at offset + s directly, as fairseq does (no double rounding).
            r = label_rate / sample_rate
            start = int(round((offset + s) * r)) - int(round(offset * r))
            lab = lab[start:start + int(round(size * r))]
        labels.append(lab)
    return {"wav": torch.stack(wavs), "lengths": None, "labels": _stack_labels(labels),
            "index": torch.tensor([it[0] for it in items], dtype=torch.int64),
            "offset": torch.tensor(offsets, dtype=torch.int64)}


def collate_pad(items, label_rate=None, sample_rate=SAMPLE_RATE):
    """Whole items, zero-padded to the longest; "lengths" holds the valid samples, labels are padded with -1.
    With labels, label_rate (Hz) is needed to cut them to round(length * rate / sample_rate); make_loader passes
    it and the dataset's sample_rate."""
    lengths = torch.tensor([len(it[1]) for it in items], dtype=torch.int64)
    wav = torch.zeros(len(items), int(lengths.max()), dtype=torch.float32)
    labels = []
    for i, (_, w, _, lab) in enumerate(items):
        wav[i, :len(w)] = w
        if lab is not None:
            if not label_rate:
                raise ValueError("collate_pad: items have labels; pass label_rate (make_loader does)")
            lab = lab[:int(round(len(w) * label_rate / sample_rate))]
        labels.append(lab)
    return {"wav": wav, "lengths": lengths, "labels": _stack_labels(labels),
            "index": torch.tensor([it[0] for it in items], dtype=torch.int64),
            "offset": torch.tensor([it[2] for it in items], dtype=torch.int64)}


class ClipBatchSampler(Sampler):
    """Batches of dataset indices for one rank; the same (seed, epoch) gives the same batches on every run.

    num_items_or_lengths: the dataset size, or per-item lengths (e.g. AudioClips.lengths) for group_by_length,
    which puts clips of similar length in a batch (fairseq sorts by length for the same reason: collate_crop cuts
    every clip to the shortest, so mixed lengths waste audio) and shuffles the order of the batches.
    Every rank gets the same number of batches: with drop_last the tail that does not fill a batch on every rank
    is dropped (ranks are disjoint); without it, batches from the start of the epoch are repeated to fill.
    Exact resume: set_epoch(epoch, start_batch=k) skips the first k batches of this rank in that epoch.
    """

    def __init__(self, num_items_or_lengths, batch_size, num_replicas=1, rank=0, seed=0, shuffle=True,
                 drop_last=True, group_by_length=False):
        if np.ndim(num_items_or_lengths) == 0:
            self.num_items, self.item_lengths = int(num_items_or_lengths), None
        else:
            self.item_lengths = np.asarray(num_items_or_lengths)
            self.num_items = len(self.item_lengths)
        if group_by_length and self.item_lengths is None:
            raise ValueError("group_by_length needs per-item lengths, not just a count")
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank {rank} outside [0, {num_replicas})")
        self.batch_size, self.num_replicas, self.rank = batch_size, num_replicas, rank
        self.seed, self.shuffle, self.drop_last, self.group_by_length = seed, shuffle, drop_last, group_by_length
        self.epoch, self.start_batch = 0, 0
        if self.batches_per_rank() == 0:
            raise ValueError(f"{self.num_items} items cannot fill one batch of {batch_size} on each of "
                             f"{num_replicas} ranks")

    def set_epoch(self, epoch, start_batch=0):
        self.epoch, self.start_batch = epoch, start_batch

    def batches_per_rank(self):
        n_batches = self.num_items // self.batch_size if self.drop_last else math.ceil(self.num_items / self.batch_size)
        return n_batches // self.num_replicas if self.drop_last else math.ceil(n_batches / self.num_replicas)

    def _all_batches(self):
        rng = np.random.default_rng([self.seed, self.epoch])
        order = rng.permutation(self.num_items) if self.shuffle else np.arange(self.num_items)
        if self.group_by_length:
            order = order[np.argsort(self.item_lengths[order], kind="stable")]  # random order among equal lengths
        batches = [order[i:i + self.batch_size] for i in range(0, self.num_items, self.batch_size)]
        if self.drop_last and len(batches[-1]) < self.batch_size:
            batches.pop()
        if self.group_by_length and self.shuffle:
            batches = [batches[i] for i in rng.permutation(len(batches))]
        return batches

    def __iter__(self):
        batches = self._all_batches()
        per_rank = self.batches_per_rank()
        needed = per_rank * self.num_replicas
        batches = (batches * math.ceil(needed / len(batches)))[:needed]
        for b in batches[self.rank::self.num_replicas][self.start_batch:]:
            yield b.tolist()

    def __len__(self):
        return max(0, self.batches_per_rank() - self.start_batch)


def _seed_worker(seed, worker_id):
    # torch already gives each worker its own seed (base seed from the loader's generator + worker_id);
    # numpy and random are derived from it so any augmentation drawn there differs per worker, reproducibly
    import random
    s = (torch.initial_seed() + seed) % 2**32
    np.random.seed(s)
    random.seed(s)


def make_loader(dataset, sampler, collate=collate_crop, num_workers=4, seed=0):
    """DataLoader over `sampler`'s batches. Workers are restarted every epoch (not persistent) so they see the
    dataset's current epoch; with labels, the dataset's label_rate and sample_rate are bound into the collate
    function."""
    import functools
    if getattr(dataset, "labels", None) is not None:
        collate = functools.partial(collate, label_rate=dataset.label_rate,
                                    sample_rate=getattr(dataset, "sample_rate", SAMPLE_RATE))
    return DataLoader(dataset, batch_sampler=sampler, collate_fn=collate, num_workers=num_workers,
                      worker_init_fn=functools.partial(_seed_worker, seed) if num_workers > 0 else None,
                      generator=torch.Generator().manual_seed(seed), pin_memory=torch.cuda.is_available(),
                      prefetch_factor=4 if num_workers > 0 else None)


def main(argv=None):
    """python data/dataset.py stats MANIFEST [--out PATH] [--workers N]: compute (or complete) the whole-file
    statistics cache before a run, e.g. on a CPU node; pretrain_music2vec.py then finds them."""
    import argparse
    p = argparse.ArgumentParser(description=main.__doc__.split(":", 1)[1].strip())
    sub = p.add_subparsers(dest="command", required=True)
    st = sub.add_parser("stats", help="whole-file mean and std of every file of a manifest, cached")
    st.add_argument("manifest")
    st.add_argument("--out", default=None, help="default: next to the manifest (train.tsv -> train.stats.tsv)")
    st.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1))
    st.add_argument("--sample-rate", type=int, default=SAMPLE_RATE,
                    help="the rate training reads the audio at (pretrain_music2vec.py sample_rate)")
    a = p.parse_args(argv)
    out = a.out or default_stats_path(a.manifest)
    try:
        stats, errors = whole_file_stats(a.manifest, out, workers=a.workers, sample_rate=a.sample_rate)
    except (OSError, ValueError) as e:
        sys.exit(f"error: {e}")
    print(f"{int((~np.isnan(stats[:, 0])).sum())} of {len(stats)} files -> {out}")
    for i, reason in sorted(errors.items()):
        print(f"unreadable: {reason}", file=sys.stderr)
    if errors:
        sys.exit(1)


if __name__ == "__main__":
    main()
