"""fairseq audio manifests (.tsv): line 1 = root folder, then `relative_path<TAB>num_samples`.

    python data/manifest.py AUDIO_DIR --out train.tsv [--valid-percent 1] [--ext wav,flac,ogg,mp3] [--workers 8]
                            [--sample-rate 16000]

walks AUDIO_DIR, reads every header in worker processes and writes the manifest (sorted, so the same folder always
gives the same file). With --valid-percent P a random P% of the files (fixed by --seed) goes to valid.tsv next to
--out (or --valid-out). Files that cannot be read are listed in <out>.skipped with the reason, never dropped silently.

num_samples is counted at --sample-rate (default 16000), the rate the model trains at (load_audio resamples every
file to it): 24000 for a MERT-like model. fairseq's manifests count at the audio's own rate, which is the same thing
for audio stored at the model's rate. The rate is not written into the file (fairseq's readers take exactly two
columns and a bare root line); instead check_sample_counts compares a few entries with their files' headers, so a
manifest counted at another rate (ours or fairseq's) is refused in one line before training.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run as a script from anywhere

import argparse
from multiprocessing import Pool

import numpy as np

from data.audio import AUDIO_EXTENSIONS, SAMPLE_RATE, AudioError, audio_info


class ManifestError(ValueError):
    """A manifest line is malformed; the message names the file and the 1-based line."""


def read_manifest(tsv_path):
    """-> (root_dir, [(relative_path, num_samples), ...]) in file order."""
    with open(tsv_path, encoding="utf-8") as f:
        lines = f.read().split("\n")
    if lines and lines[-1] == "":
        lines.pop()  # the final newline
    if not lines or not lines[0].strip():
        raise ManifestError(f"{tsv_path}:1: missing root folder line (line 1 must be the audio root folder)")
    root = lines[0].rstrip("\r")
    if "\t" in root:
        raise ManifestError(f"{tsv_path}:1: line 1 must be the root folder alone, found a tab-separated line "
                            f"{root[:80]!r}")
    entries = []
    for lineno, line in enumerate(lines[1:], start=2):
        line = line.rstrip("\r")
        if not line.strip():
            raise ManifestError(f"{tsv_path}:{lineno}: empty line")
        cols = line.split("\t")
        if len(cols) != 2:
            raise ManifestError(f"{tsv_path}:{lineno}: expected 2 tab-separated columns "
                                f"(relative_path, num_samples), found {len(cols)}: {line[:80]!r}")
        try:
            n = int(cols[1])
        except ValueError:
            raise ManifestError(f"{tsv_path}:{lineno}: num_samples must be an integer, found {cols[1]!r}") from None
        if n < 0:
            raise ManifestError(f"{tsv_path}:{lineno}: num_samples must be >= 0, found {n}")
        entries.append((cols[0], n))
    return root, entries


def check_sample_counts(name, root, entries, sample_rate, num_checked=8, tolerance=0.01):
    """Refuse a manifest whose num_samples were counted at another rate than `sample_rate`: up to `num_checked`
    entries spread over the manifest are compared with their files' headers (audio_info, the count load_audio
    gives at that rate). A count more than `tolerance` (relative) away stops with a ManifestError naming the
    manifest, the line, both counts and the rate the manifest's count implies. Files that cannot be read are passed
    over here (loading them reports them). 16 vs 24 kHz differ by 50 %, 44.1 vs 48 kHz by 9 %."""
    if not entries:
        return
    picks = sorted({round(i * (len(entries) - 1) / max(1, num_checked - 1)) for i in range(num_checked)})
    for i in picks:
        rel, n = entries[i]
        try:
            want = audio_info(os.path.join(root, rel), sample_rate)[0]
        except AudioError:
            continue
        if abs(n - want) > max(1, tolerance * want):
            implied = int(round(n / want * sample_rate))
            raise ManifestError(f"{name}:{i + 2}: {rel} has {want} samples at {sample_rate} Hz but the manifest says "
                                f"{n} (counted at about {implied} Hz?); remake it with python data/manifest.py "
                                f"... --sample-rate {sample_rate}")


def write_manifest(tsv_path, root, entries):
    bad = [p for p, _ in entries if "\t" in p or "\n" in p or "\r" in p]
    if bad:
        raise ManifestError(f"{tsv_path}: paths with tabs or newlines cannot be written to a manifest: {bad[:3]}")
    os.makedirs(os.path.dirname(os.path.abspath(tsv_path)), exist_ok=True)
    with open(tsv_path, "w", encoding="utf-8") as f:
        f.write(f"{root}\n")
        for rel, n in entries:
            f.write(f"{rel}\t{int(n)}\n")


def find_audio(audio_dir, extensions=AUDIO_EXTENSIONS):
    """Sorted relative paths of files under audio_dir whose extension (case-insensitive) is in `extensions`."""
    exts = {"." + e.lower().lstrip(".") for e in extensions}
    found = []
    for dirpath, dirnames, filenames in os.walk(audio_dir, followlinks=True):
        dirnames.sort()
        for name in filenames:
            if os.path.splitext(name)[1].lower() in exts:
                found.append(os.path.relpath(os.path.join(dirpath, name), audio_dir))
    return sorted(found)


def _probe(args):
    root, rel, sample_rate = args
    if "\t" in rel or "\n" in rel or "\r" in rel:
        return rel, None, "path contains a tab or newline, which the manifest format cannot hold"
    try:
        return rel, audio_info(os.path.join(root, rel), sample_rate)[0], None
    except AudioError as e:
        path = os.path.join(root, rel)
        reason = str(e)
        return rel, None, reason[len(path) + 2:] if reason.startswith(path + ": ") else reason


def build_manifest(audio_dir, out, valid_percent=0.0, valid_out=None, extensions=AUDIO_EXTENSIONS, workers=None,
                   seed=0, progress=True, sample_rate=SAMPLE_RATE):
    """Write the manifest(s) for audio_dir (a folder, or a list of folders: the root is then their deepest common
    folder and each file appears once), sample counts at `sample_rate`; returns (train_entries, valid_entries,
    skipped [(path, reason)])."""
    from tqdm import tqdm

    dirs = [audio_dir] if isinstance(audio_dir, (str, os.PathLike)) else list(audio_dir)
    for d in dirs:
        if not os.path.isdir(d):
            raise FileNotFoundError(f"{d}: not a folder")
    if not 0 <= valid_percent < 100:
        raise ValueError(f"--valid-percent must be in [0, 100), got {valid_percent}")
    real = [os.path.realpath(d) for d in dirs]
    root = os.path.commonpath(real)
    rels = sorted({os.path.normpath(os.path.join(os.path.relpath(d, root), r))
                   for d in real for r in find_audio(d, extensions)})
    workers = workers or min(8, os.cpu_count() or 1)
    jobs = [(root, r, sample_rate) for r in rels]
    bar = tqdm(total=len(jobs), desc="reading headers", unit="file", disable=not progress)
    results = []
    if workers > 1 and len(jobs) > 1:
        with Pool(workers) as pool:
            for r in pool.imap(_probe, jobs, chunksize=64):
                results.append(r)
                bar.update()
    else:
        for j in jobs:
            results.append(_probe(j))
            bar.update()
    bar.close()
    good = [(rel, n) for rel, n, err in results if err is None]
    skipped = [(os.path.join(root, rel), err) for rel, n, err in results if err is not None]

    # The valid draw depends only on the sorted list and the seed, so re-running gives the same split.
    n_valid = int(round(len(good) * valid_percent / 100))
    is_valid = np.zeros(len(good), dtype=bool)
    is_valid[np.random.default_rng(seed).permutation(len(good))[:n_valid]] = True
    train = [e for e, v in zip(good, is_valid) if not v]
    valid = [e for e, v in zip(good, is_valid) if v]
    write_manifest(out, root, train)
    if valid_percent > 0:
        write_manifest(valid_out or os.path.join(os.path.dirname(os.path.abspath(out)), "valid.tsv"), root, valid)
    skipped_path = out + ".skipped"
    if skipped:
        with open(skipped_path, "w", encoding="utf-8") as f:
            for path, reason in skipped:
                f.write(f"{path}\t{reason}\n")
    elif os.path.exists(skipped_path):
        os.remove(skipped_path)  # a stale list from an earlier run would be misleading
    return train, valid, skipped


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("audio_dir", nargs="+", help="one or more folders (searched recursively); with several, the "
                   "manifest's root is their deepest common folder")
    p.add_argument("--out", required=True, help="manifest to write (e.g. manifests/train.tsv)")
    p.add_argument("--valid-percent", type=float, default=0.0, help="percent of files for the valid manifest")
    p.add_argument("--valid-out", default=None, help="valid manifest path (default: valid.tsv next to --out)")
    p.add_argument("--ext", default=",".join(AUDIO_EXTENSIONS), help="comma-separated extensions")
    p.add_argument("--workers", type=int, default=None, help="header-reading processes (default min(8, cpus))")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--sample-rate", type=int, default=SAMPLE_RATE,
                   help="count num_samples at this rate: the model's (16000; 24000 for MERT-like models)")
    a = p.parse_args(argv)
    if a.sample_rate <= 0:
        p.error(f"--sample-rate must be a positive number of Hz, got {a.sample_rate}")
    train, valid, skipped = build_manifest(a.audio_dir, a.out, a.valid_percent, a.valid_out, a.ext.split(","),
                                           a.workers, a.seed, sample_rate=a.sample_rate)
    hours = sum(n for _, n in train + valid) / a.sample_rate / 3600
    print(f"{len(train)} train + {len(valid)} valid files ({hours:.2f} h) -> {a.out}")
    if skipped:
        print(f"{len(skipped)} unreadable files skipped; list with reasons in {a.out}.skipped", file=sys.stderr)


if __name__ == "__main__":
    main()
