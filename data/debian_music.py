"""A real-music development set that anyone on Debian/Ubuntu can rebuild: songs for pre-training and an
NSynth-layout note set for probe.py, from freely licensed Debian packages.

    python data/debian_music.py build --out data/devset [--max-song-seconds 90] [--notes 800,300,300] [--seed 0]
    python data/debian_music.py check          # which packages are there, and the apt-get line for the missing ones

Songs: the music of four free games (supertuxkart-data, hedgewars-data, supertux-data, neverball-common), decoded
from ogg, mono, 16 kHz, the first --max-song-seconds of each song cut into clips of at most --clip-seconds,
written as 16-bit wav with fairseq manifests. Notes: General MIDI programs of a sampled-instrument soundfont
(timgm6mb-soundfont) rendered with fluidsynth, 4 s each (key held 3 s, as NSynth), written in NSynth's own layout
(nsynth-{train,valid,test}/examples.json + audio/) with instruments split-disjoint between train and valid/test.

What goes into the note set, and why (each step is logged and recorded in build_info.json):
  1. GM program -> NSynth family (GM_FAMILY). Programs with no NSynth family (pads, effects, drums) are left out.
  2. A program is kept only if an f0 estimate of its rendered notes (test notes over its range) names the MIDI key
     it was played at (nearest semitone) for at least 80% of them: soundfont presets that sound a fifth or an
     octave away from their key (bells, "guitar harmonics", a whistle) would give wrong pitch labels.
  3. Soundfonts reuse samples between programs (TimGM6mb plays Violin, Viola and Fiddle from the same recordings).
     Programs that share a sample at the keys we play are one instrument for the split, so a held-out instrument is
     never heard in train; where the sharing crosses families (a synth lead built from pan-flute samples), the
     program that plays the shared samples over the smaller share of its keys is left out.
  4. Per family, a seeded third of these instruments plays in valid/test only (as NSynth: valid/test instruments
     do not occur in train). Every note is then checked once more by its f0 estimate (f0_check.tsv); the build
     stops if under 90% agree (a wrong sample rate or a transposing renderer would be caught here).

It installs nothing: a missing package stops it with the `apt-get install` line it needs. Everything is a pure
function of the installed files and --seed; the output is written to OUT.partial and renamed to OUT when complete.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run as a script from anywhere

import argparse
import fnmatch
import glob
import hashlib
import json
import re
import shutil
import struct
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from multiprocessing import Pool

import numpy as np
import soundfile as sf

from data.audio import SAMPLE_RATE, load_audio
from data.manifest import write_manifest
from data.synth import FAMILIES, PITCH_RANGE

SR = SAMPLE_RATE


# ------------------------------------------------------------------------------------------------------ sources
@dataclass
class SongSource:
    name: str  # folder under songs/
    package: str  # Debian package that installs the files
    root: str  # installed folder
    patterns: tuple  # globs under root
    source_prefix: str = ""  # where root's files live in the package's source tree (for debian/copyright)
    skip: str = ""  # regex on the relative path: files left out
    copyright: str = ""  # DEP-5 copyright file (default /usr/share/doc/<package>/copyright)

    def copyright_path(self):
        return self.copyright or f"/usr/share/doc/{self.package}/copyright"


SONG_SOURCES = [
    # supertuxkart's *_fast.ogg are the same tracks played faster for the last lap: left out as near-duplicates
    SongSource("supertuxkart", "supertuxkart-data", "/usr/share/games/supertuxkart", ("data/music/*.ogg",),
               source_prefix="", skip=r"_fast\.ogg$"),
    SongSource("hedgewars", "hedgewars-data", "/usr/share/games/hedgewars", ("Data/Music/*.ogg",),
               source_prefix="share/hedgewars/"),
    SongSource("supertux", "supertux-data", "/usr/share/games/supertux2", ("music/**/*.ogg",), source_prefix="data/"),
    # neverball-data depends on neverball-common, which holds the music
    SongSource("neverball", "neverball-common", "/usr/share/games/neverball", ("bgm/*.ogg",), source_prefix="data/"),
]
SOUNDFONT = "/usr/share/sounds/sf2/TimGM6mb.sf2"
SOUNDFONT_PACKAGE = "timgm6mb-soundfont"  # (FluidR3_GM.sf2 from fluid-soundfont-gm works too: --soundfont)


def find_songs(src):
    """Sorted paths (relative to src.root) of src's songs."""
    found = set()
    for pat in src.patterns:
        for p in glob.glob(os.path.join(src.root, pat), recursive=True):
            rel = os.path.relpath(p, src.root)
            if os.path.isfile(p) and not (src.skip and re.search(src.skip, rel)):
                found.add(rel)
    return sorted(found)


class MissingPackages(RuntimeError):
    """str(err) lists what is missing and the apt-get line that installs it."""


def check_packages(song_sources=SONG_SOURCES, soundfont=SOUNDFONT, need_fluidsynth=True):
    """Raise MissingPackages naming every missing package and the apt-get line; return nothing when all is there."""
    missing = []  # (package, what is missing)
    for src in song_sources:
        if not find_songs(src):
            missing.append((src.package, f"no {os.path.join(src.root, src.patterns[0])}"))
    if not os.path.isfile(soundfont):
        missing.append((SOUNDFONT_PACKAGE if soundfont == SOUNDFONT else f"the soundfont {soundfont}",
                        f"no {soundfont}"))
    if need_fluidsynth and shutil.which("fluidsynth") is None:
        missing.append(("fluidsynth", "no `fluidsynth` on PATH"))
    if missing:
        pkgs = [p for p, _ in missing if not p.startswith("the soundfont")]
        lines = "\n".join(f"  {p}: {why}" for p, why in missing)
        hint = f"Install with:\n    sudo apt-get install {' '.join(pkgs)}\nthen run this again." if pkgs else ""
        raise MissingPackages(f"missing Debian packages or files:\n{lines}\n{hint}")


def package_version(package):
    try:
        out = subprocess.run(["dpkg-query", "-W", "-f=${Version}", package], capture_output=True, text=True)
        return out.stdout.strip() if out.returncode == 0 and out.stdout.strip() else "unknown"
    except OSError:
        return "unknown"


def read_dep5(path):
    """A machine-readable debian/copyright file -> [(file globs, licence short name, copyright text)] in file
    order (DEP-5: the last paragraph whose Files: glob matches a path applies; `*` also matches `/`)."""
    paragraphs, cur, key = [], {}, None
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f.read().split("\n") + [""]:
            if not line.strip():
                if cur:
                    paragraphs.append(cur)
                cur, key = {}, None
            elif line[0] in " \t":
                if key:
                    cur[key] += "\n" + line.strip()
            elif ":" in line:
                key, _, val = line.partition(":")
                key = key.strip().lower()
                cur[key] = val.strip()
    out = []
    for p in paragraphs:
        if "files" in p:
            out.append((p["files"].split(), p.get("license", "").split("\n")[0].strip(),
                        " ".join(p.get("copyright", "").split())))
    return out


def licence_of(dep5, source_path):
    found = ("unknown", "")
    for globs, lic, holder in dep5:
        if any(fnmatch.fnmatchcase(source_path, g) for g in globs):
            found = (lic, holder)
    return found


# ------------------------------------------------------------------------------------------------------ songs
def _write_song(job):
    """Decode one song, keep its first max_seconds, cut it into equal clips of at most clip_seconds."""
    path, out_root, rel_base, max_seconds, clip_seconds = job
    x = load_audio(path, frames=int(max_seconds * SR))
    n_clips = max(1, int(np.ceil(len(x) / (clip_seconds * SR))))
    entries = []
    for k, piece in enumerate(np.array_split(x, n_clips)):
        rel = f"{rel_base}_{k:02d}.wav"
        sf.write(os.path.join(out_root, rel), np.clip(piece, -1.0, 1.0), SR, subtype="PCM_16")
        entries.append((rel, len(piece)))
    return entries


def build_songs(out, final_root, song_sources, max_song_seconds, clip_seconds, valid_percent, seed, pool, log):
    """songs/<source>/*.wav, songs/{train,valid}.tsv (valid: whole songs), songs/LICENSES.tsv; returns a summary."""
    jobs, meta = [], []
    for src in song_sources:
        dep5 = read_dep5(src.copyright_path()) if os.path.isfile(src.copyright_path()) else []
        os.makedirs(os.path.join(out, "songs", src.name), exist_ok=True)
        for rel in find_songs(src):
            # clip names: the path below the patterns' common folder, folders joined by "__"
            base = os.path.commonpath([os.path.dirname(pat.split("*")[0] + "x") for pat in src.patterns])
            stem = os.path.splitext(os.path.relpath(rel, base) if base else rel)[0].replace(os.sep, "__")
            stem = re.sub(r"[^A-Za-z0-9_.-]+", "_", stem)
            rel_base = f"songs/{src.name}/{stem}"
            jobs.append((os.path.join(src.root, rel), out, rel_base, max_song_seconds, clip_seconds))
            lic, holder = licence_of(dep5, src.source_prefix + rel)
            meta.append(dict(source=src.name, package=src.package, file=os.path.join(src.root, rel), licence=lic,
                             copyright=holder))
    log(f"songs: decoding {len(jobs)} files (first {max_song_seconds:g} s of each, clips of <= {clip_seconds:g} s)")
    per_song = list(pool.imap(_write_song, jobs))
    n_valid = int(round(len(jobs) * valid_percent / 100))
    is_valid = np.zeros(len(jobs), dtype=bool)
    is_valid[np.random.default_rng([seed, 11]).permutation(len(jobs))[:n_valid]] = True
    train = [e for entries, v in zip(per_song, is_valid) if not v for e in entries]
    valid = [e for entries, v in zip(per_song, is_valid) if v for e in entries]
    write_manifest(os.path.join(out, "songs", "train.tsv"), final_root, train)
    write_manifest(os.path.join(out, "songs", "valid.tsv"), final_root, valid)
    with open(os.path.join(out, "songs", "LICENSES.tsv"), "w", encoding="utf-8") as f:
        f.write("clips\tsplit\tpackage\tfile\tlicence\tcopyright\n")
        for m, entries, v in zip(meta, per_song, is_valid):
            f.write(f"{entries[0][0].rsplit('_', 1)[0]}_*.wav\t{'valid' if v else 'train'}\t{m['package']}\t"
                    f"{m['file']}\t{m['licence']}\t{m['copyright']}\n")
    summary = {}
    for src in song_sources:
        idx = [i for i, m in enumerate(meta) if m["source"] == src.name]
        lic = {}
        for i in idx:
            lic[meta[i]["licence"]] = lic.get(meta[i]["licence"], 0) + 1
        summary[src.name] = dict(package=src.package, version=package_version(src.package), songs=len(idx),
                                 clips=sum(len(per_song[i]) for i in idx),
                                 hours=round(sum(n for i in idx for _, n in per_song[i]) / SR / 3600, 4),
                                 licences=dict(sorted(lic.items())))
    return train, valid, summary


# ------------------------------------------------------------------------------------------------------ soundfont
class SoundFontError(ValueError):
    """The file is not a SoundFont 2 file that this reader understands; str(err) starts with the path."""


def _riff_chunks(f, start, end):
    """(id, data offset, size) of the RIFF chunks between file offsets start and end."""
    pos = start
    while pos + 8 <= end:
        f.seek(pos)
        cid, size = struct.unpack("<4sI", f.read(8))
        yield cid, pos + 8, size
        pos += 8 + size + (size & 1)


def read_sf2(path):
    """-> ({(bank, program): (preset name, {MIDI key: frozenset of sample indices played at that key})},
    [sample names]). Reads only the preset/instrument tables (the pdta chunk), not the sample data."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(12)
        if len(head) < 12 or head[:4] != b"RIFF" or head[8:12] != b"sfbk":
            raise SoundFontError(f"{path}: not a SoundFont 2 file (no RIFF 'sfbk' header)")
        pdta = {}
        for cid, off, n in _riff_chunks(f, 12, size):
            f.seek(off)
            if cid == b"LIST" and f.read(4) == b"pdta":
                for cid2, off2, n2 in _riff_chunks(f, off + 4, off + n):
                    f.seek(off2)
                    pdta[cid2.decode("latin1")] = f.read(n2)
    need = ("phdr", "pbag", "pgen", "inst", "ibag", "igen", "shdr")
    if any(k not in pdta for k in need):
        raise SoundFontError(f"{path}: SoundFont has no {[k for k in need if k not in pdta]} table(s) in its pdta")

    def records(name, fmt):
        n, data = struct.calcsize(fmt), pdta[name]
        return [struct.unpack_from(fmt, data, i) for i in range(0, len(data) - n + 1, n)]

    phdr, pbag, pgen = records("phdr", "<20sHHHIII"), records("pbag", "<HH"), records("pgen", "<HH")
    inst, ibag, igen = records("inst", "<20sH"), records("ibag", "<HH"), records("igen", "<HH")
    shdr = records("shdr", "<20sIIIIIBbHH")
    text = lambda b: b.split(b"\0")[0].decode("latin1").strip()  # noqa: E731

    def zones(bags, gens, first, last):
        # each zone: {generator operator: amount}; zone z's generators are gens[bags[z][0]:bags[z+1][0]]
        return [dict(gens[g] for g in range(bags[z][0], bags[z + 1][0])) for z in range(first, last)]

    def key_range(zone, default):
        # generator 43 keyRange: lo in the low byte, hi in the high byte
        return (zone[43] & 0xFF, zone[43] >> 8) if 43 in zone else default

    presets = {}
    for i in range(len(phdr) - 1):  # the last record is the terminal "EOP"
        name, program, bank, bag = phdr[i][:4]
        pz = zones(pbag, pgen, bag, phdr[i + 1][3])
        pglobal = pz[0] if pz and 41 not in pz[0] else {}  # a first zone without an instrument is the global zone
        keys = {}
        for z in pz:
            if 41 not in z:  # generator 41: instrument
                continue
            if z[41] + 1 >= len(inst):
                raise SoundFontError(f"{path}: preset {text(name)!r} points at instrument {z[41]}, which does not "
                                     f"exist")
            plo, phi = key_range(z, key_range(pglobal, (0, 127)))
            iz = zones(ibag, igen, inst[z[41]][1], inst[z[41] + 1][1])
            iglobal = iz[0] if iz and 53 not in iz[0] else {}
            for y in iz:
                if 53 not in y:  # generator 53: sampleID
                    continue
                lo, hi = key_range(y, key_range(iglobal, (0, 127)))
                for k in range(max(lo, plo), min(hi, phi) + 1):
                    keys.setdefault(k, set()).add(y[53])
        presets[(bank, program)] = (text(name), {k: frozenset(v) for k, v in keys.items()})
    return presets, [text(s[0]) for s in shdr]


# ------------------------------------------------------------------------------------------------------ GM -> NSynth
# General MIDI program (0-based) -> NSynth family, by GM's instrument groups. Left out: harp (46) and timpani (47),
# which NSynth's families do not settle; orchestra hit (55); pads (88-95), effects (96-103), percussion (113, 115-119)
# and sound effects (120-127). Free reeds (reed organ, accordion, harmonica, bandoneon: 20-23) are "reed", as the
# reed organ shares its samples with the accordion in GM soundfonts; struck tuned percussion outside GM's
# chromatic-percussion group (kalimba 108, tinkle bell 112, steel drums 114) is "mallet".
GM_FAMILY = {}
for _programs, _family in [(range(0, 8), "keyboard"), (range(8, 16), "mallet"), ((108, 112, 114), "mallet"),
                           (range(16, 20), "organ"), (range(20, 24), "reed"), (range(24, 32), "guitar"),
                           (range(104, 108), "guitar"), (range(32, 40), "bass"), (range(40, 46), "string"),
                           (range(48, 52), "string"), ((110,), "string"), (range(52, 55), "vocal"),
                           (range(56, 64), "brass"), (range(64, 72), "reed"), ((109, 111), "reed"),
                           (range(72, 80), "flute"), (range(80, 88), "synth_lead")]:
    for _p in _programs:
        GM_FAMILY[_p] = _family
# NSynth's instrument_source: electric instruments (electric pianos, clavinet, electric organs, guitars and basses)
# are "electronic", GM's synth patches "synthetic", everything else "acoustic"
GM_ELECTRONIC = {2, 4, 5, 7, 16, 17, 18, *range(26, 32), *range(33, 38)}
GM_SYNTHETIC = {38, 39, 50, 51, 54, 62, 63, *range(80, 88)}
PITCH_MIN, PITCH_MAX = 36, 84  # MIDI keys the notes use (C2-C6), as the synthetic set: within every family's range
MIN_KEYS = 12  # a program that plays fewer keys than this in its family's range is left out
OCTAVE_OK = {"organ"}  # a 16' stop sounds an octave below the key, as on real organs; the key is still the label
MAX_CENTS = 50.0  # an f0 estimate within 50 cents names the MIDI key (the nearest semitone)
SCREEN_AGREE = 0.8  # share of a program's test notes whose f0 must name the key
MIN_F0_AGREE = 0.9  # share of all notes whose f0 must name the key, or the build stops
VELOCITIES = (25, 50, 75, 100, 127)  # NSynth's
NOTE_SECONDS, HOLD_SECONDS, SLOT_SECONDS = 4.0, 3.0, 4.5  # NSynth: 4 s notes, key held 3 s


def gm_source(program):
    return "electronic" if program in GM_ELECTRONIC else "synthetic" if program in GM_SYNTHETIC else "acoustic"


def playable_keys(family, keys):
    lo, hi = PITCH_RANGE[family]
    return [k for k in range(max(lo, PITCH_MIN), min(hi, PITCH_MAX) + 1) if keys.get(k)]


# ------------------------------------------------------------------------------------------------------ MIDI
def _vlq(n):
    out = [n & 0x7F]
    n >>= 7
    while n:
        out.append(0x80 | (n & 0x7F))
        n >>= 7
    return bytes(reversed(out))


def write_midi(path, program, notes, ticks_per_quarter=480, tempo_us=500_000):
    """A standard MIDI file (format 0, channel 1) playing `notes` [(start s, held s, key, velocity)] on GM
    `program`; every note is followed by All Sound Off (CC 120) at start + NOTE_SECONDS so that no release tail
    reaches the next note."""
    ticks_per_s = ticks_per_quarter * 1e6 / tempo_us
    events = [(0, 0, bytes([0xC0, program]))]
    for start, held, key, velocity in notes:
        events.append((round(start * ticks_per_s), 2, bytes([0x90, key, velocity])))
        events.append((round((start + held) * ticks_per_s), 1, bytes([0x80, key, 0])))
        events.append((round((start + NOTE_SECONDS) * ticks_per_s), 0, bytes([0xB0, 120, 0])))
    events.sort(key=lambda e: (e[0], e[1]))  # at one tick: sound off, then note off, then note on
    track, last = b"\x00\xFF\x51\x03" + tempo_us.to_bytes(3, "big"), 0
    for tick, _, msg in events:
        track += _vlq(tick - last) + msg
        last = tick
    track += b"\x00\xFF\x2F\x00"
    with open(path, "wb") as f:
        f.write(b"MThd" + struct.pack(">IHHH", 6, 0, 1, ticks_per_quarter))
        f.write(b"MTrk" + struct.pack(">I", len(track)) + track)


class FluidSynth:
    """Renderer: renderer(midi_path, wav_path) writes the MIDI file rendered with `soundfont` as a wav file (any
    rate and channel count: the builder reads it with load_audio). Reverb and chorus are off (NSynth's notes are
    dry); float output, so nothing clips; 44.1 kHz, so the resampler to 16 kHz, not fluidsynth, band-limits."""

    def __init__(self, soundfont, executable="fluidsynth", sample_rate=44100):
        self.soundfont, self.executable, self.sample_rate = soundfont, executable, sample_rate

    def __call__(self, midi_path, wav_path):
        cmd = [self.executable, "-ni", "-q", "-R", "0", "-C", "0", "-g", "1.0", "-r", str(self.sample_rate),
               "-T", "wav", "-O", "float", "-F", wav_path, self.soundfont, midi_path]
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode != 0 or not os.path.isfile(wav_path):
            raise RuntimeError(f"{midi_path}: fluidsynth failed (exit {r.returncode}): {r.stderr.strip()[-500:]}")


# ------------------------------------------------------------------------------------------------------ f0
def yin_f0(x, sr=SR, fmin=30.0, fmax=2500.0, threshold=0.15, window=2048, hop=512, start=0.05, stop=1.0):
    """Median f0 (Hz) of x[start:stop] by YIN (de Cheveigne & Kawahara 2002: cumulative-mean-normalised difference
    function, first dip under `threshold`, parabolic interpolation); nan when fewer than 3 frames are voiced."""
    x = np.asarray(x, dtype=np.float64)[int(start * sr): int(stop * sr)]
    tau_max, tau_min = int(sr / fmin), max(2, int(sr / fmax))
    n_fft = 1 << int(np.ceil(np.log2(2 * (window + tau_max))))
    taus = np.arange(tau_max + 1)
    f0s = []
    for s in range(0, len(x) - window - tau_max + 1, hop):
        frame = x[s: s + window + tau_max]
        if np.sqrt(np.mean(frame[:window] ** 2)) < 1e-5:
            continue
        # d(tau) = sum_{j<W} (x_j - x_{j+tau})^2 = e(0) + e(tau) - 2 r(tau), r by FFT cross-correlation
        r = np.fft.irfft(np.fft.rfft(frame, n_fft) * np.conj(np.fft.rfft(frame[:window], n_fft)), n_fft)
        energy = np.concatenate([[0.0], np.cumsum(frame ** 2)])
        d = energy[window] + (energy[taus + window] - energy[taus]) - 2 * r[: tau_max + 1]
        d[0] = 0.0
        cmnd = np.ones(tau_max + 1)
        cmnd[1:] = d[1:] * taus[1:] / np.maximum(np.cumsum(d[1:]), 1e-12)
        below = np.nonzero(cmnd[tau_min:tau_max] < threshold)[0]
        if len(below) == 0:
            continue
        t = below[0] + tau_min
        while t + 1 < tau_max and cmnd[t + 1] < cmnd[t]:
            t += 1
        a, b, c = cmnd[t - 1], cmnd[t], cmnd[t + 1]
        shift = 0.5 * (a - c) / (a - 2 * b + c) if a - 2 * b + c > 0 else 0.0
        f0s.append(sr / (t + shift))
    return float(np.median(f0s)) if len(f0s) >= 3 else float("nan")


def cents_off(f0, key):
    return float(1200 * np.log2(f0 / (440.0 * 2 ** ((key - 69) / 12)))) if f0 > 0 else float("nan")


def pitch_verdict(cents, family):
    """'ok' (names the key), 'octave' (names the key an octave off; accepted for OCTAVE_OK families), 'off',
    'unvoiced' (no f0 found)."""
    if not np.isfinite(cents):
        return "unvoiced"
    if abs(cents) < MAX_CENTS:
        return "ok"
    if abs(cents - 1200 * round(cents / 1200)) < MAX_CENTS:
        return "octave"
    return "off"


def agrees(verdict, family):
    return verdict == "ok" or (verdict == "octave" and family in OCTAVE_OK)


# ------------------------------------------------------------------------------------------------------ notes
def _render_program(job):
    """Render one program's notes in one MIDI file; cut, level and (optionally) write each 4 s note; f0 of each.
    -> [(f0 Hz, peak before levelling)] in note order."""
    renderer, program, notes, paths, tmp_dir = job
    fd, midi = tempfile.mkstemp(prefix=f"program_{program:03d}_", suffix=".mid", dir=tmp_dir)
    os.close(fd)
    wav = midi[:-4] + ".wav"
    write_midi(midi, program, [(i * SLOT_SECONDS, HOLD_SECONDS, key, vel) for i, (_, key, vel) in enumerate(notes)])
    renderer(midi, wav)
    audio = load_audio(wav)
    os.remove(midi)
    os.remove(wav)
    results = []
    for i, ((_, key, velocity), path) in enumerate(zip(notes, paths)):
        start = int(round(i * SLOT_SECONDS * SR))
        x = audio[start: start + int(NOTE_SECONDS * SR)]
        x = np.pad(x, (0, int(NOTE_SECONDS * SR) - len(x)))
        peak = float(np.abs(x).max())
        if path is not None:
            # levelled as data/synth.py does: the peak follows the velocity (the probe z-normalises each clip)
            y = x / peak * 0.9 * velocity / 127 if peak > 0 else x
            sf.write(path, y.astype(np.float32), SR, subtype="PCM_16")
        results.append((yin_f0(x), peak))
    return results


def _screen_programs(presets, renderer, pool, tmp_dir, log):
    """Steps 1-2: GM programs with an NSynth family and enough keys whose test notes name their keys.
    -> ({program: (family, name, keys)}, {program: reason left out})"""
    candidates, excluded = {}, {}
    for program, family in sorted(GM_FAMILY.items()):
        if (0, program) not in presets:
            excluded[program] = "not in the soundfont's bank 0"
            continue
        name, keymap = presets[(0, program)]
        keys = playable_keys(family, keymap)
        if len(keys) < MIN_KEYS:
            excluded[program] = f"{name}: plays {len(keys)} keys in {family}'s range (< {MIN_KEYS})"
            continue
        candidates[program] = (family, name, keys)
    jobs = []
    for program, (family, name, keys) in candidates.items():
        test_keys = sorted({keys[int(round(i))] for i in np.linspace(0, len(keys) - 1, 9)})
        jobs.append((renderer, program, [(program, k, 100) for k in test_keys], [None] * len(test_keys), tmp_dir))
    log(f"notes: pitch-checking {len(jobs)} GM programs ({sum(len(j[2]) for j in jobs)} test notes)")
    kept = {}
    for job, res in zip(jobs, pool.imap(_render_program, jobs)):
        program = job[1]
        family, name, keys = candidates[program]
        cents = [cents_off(f0, key) for (f0, _), (_, key, _) in zip(res, job[2])]
        good = [agrees(pitch_verdict(c, family), family) for c in cents]
        silent = sum(peak < 1e-4 for _, peak in res)
        if silent:
            excluded[program] = f"{name}: {silent} of {len(res)} test notes silent"
        elif np.mean(good) < SCREEN_AGREE:
            excluded[program] = (f"{name}: f0 names the key for {sum(good)} of {len(good)} test notes (cents off: "
                                 + " ".join(f"{c:+.0f}" for c in cents) + ")")
        else:
            kept[program] = candidates[program]
    return kept, excluded


def _group_programs(kept, presets, excluded):
    """Step 3: resolve sample sharing across families, then group programs that share samples.
    -> list of groups (sorted lists of programs), each within one family."""
    used = {p: frozenset().union(*(presets[(0, p)][1][k] for k in keys)) for p, (_, _, keys) in kept.items()}
    alive = set(kept)

    def conflicts(p):  # programs of other families that play a sample p plays
        return [q for q in sorted(alive) if q != p and kept[q][0] != kept[p][0] and used[p] & used[q]]

    def borrowed(p):  # share of p's samples that programs of other families play too
        return len(used[p] & frozenset().union(*(used[q] for q in conflicts(p)))) / len(used[p])

    # Sample sharing across families comes from patches built out of other instruments' recordings (a synth lead
    # layering clavinet and distorted-guitar samples). Leave out, one at a time, the program in the most conflicts,
    # then a GM synth patch, then the one whose samples are more borrowed, then the higher GM number.
    while True:
        conflicted = [p for p in sorted(alive) if conflicts(p)]
        if not conflicted:
            break
        loser = max(conflicted, key=lambda p: (len(conflicts(p)), p in GM_SYNTHETIC, borrowed(p), p))
        others = ", ".join(f"{q} {kept[q][1]} ({kept[q][0]})" for q in conflicts(loser))
        excluded[loser] = f"{kept[loser][1]}: shares samples with {others}"
        alive.remove(loser)
    alive = sorted(alive)
    parent = {p: p for p in alive}

    def root(p):
        while parent[p] != p:
            p = parent[p]
        return p

    for a in alive:
        for b in alive:
            if a < b and used[a] & used[b]:
                parent[root(b)] = root(a)
    groups = {}
    for p in alive:
        groups.setdefault(root(p), []).append(p)
    return sorted(groups.values())


def _split_groups(groups, kept, seed, heldout_fraction):
    """Step 4: per family a seeded share of the instrument groups plays only in valid/test; a family with a single
    group stays in train (a family absent from train could not be learned). -> (train programs, held-out programs)"""
    rng = np.random.default_rng([seed, 12])
    train, heldout = [], []
    for family in FAMILIES:
        fam_groups = [g for g in groups if kept[g[0]][0] == family]
        order = rng.permutation(len(fam_groups))
        n_held = 0 if len(fam_groups) < 2 else min(len(fam_groups) - 1,
                                                   max(1, int(round(len(fam_groups) * heldout_fraction))))
        for rank, i in enumerate(order):
            (heldout if rank < n_held else train).extend(fam_groups[i])
    return sorted(train), sorted(heldout)


def build_notes(out, soundfont, renderer, counts, seed, heldout_fraction, pool, log):
    """nsynth/nsynth-{train,valid,test}/{examples.json,audio/*.wav} and nsynth/f0_check.tsv; returns a summary."""
    presets, _ = read_sf2(soundfont)
    nsynth = os.path.join(out, "nsynth")
    tmp_dir = tempfile.mkdtemp(prefix="render_", dir=out)
    kept, excluded = _screen_programs(presets, renderer, pool, tmp_dir, log)
    groups = _group_programs(kept, presets, excluded)
    train_programs, heldout_programs = _split_groups(groups, kept, seed, heldout_fraction)
    log(f"notes: {len(train_programs)} train / {len(heldout_programs)} valid+test instruments "
        f"({len(excluded)} GM programs left out, reasons in build_info.json)")

    rng = np.random.default_rng([seed, 13])
    notes_by_program, examples, note_id = {}, {}, 0
    for split, count, programs in (("train", counts[0], train_programs), ("valid", counts[1], heldout_programs),
                                   ("test", counts[2], heldout_programs)):
        available = sum(len(kept[p][2]) for p in programs) * len(VELOCITIES)
        if count > available - (counts[1] if split == "test" else 0):
            raise ValueError(f"{count} distinct {split} notes requested; the {len(programs)} {split} instruments "
                             f"have {available} (key, velocity) pairs")
        os.makedirs(os.path.join(nsynth, f"nsynth-{split}", "audio"), exist_ok=True)
        examples[split] = {}
        while len(examples[split]) < count:
            program = programs[rng.integers(len(programs))]
            family, name, keys = kept[program]
            key, velocity = int(keys[rng.integers(len(keys))]), int(VELOCITIES[rng.integers(len(VELOCITIES))])
            inst_str = f"{family}_{gm_source(program)}_{program:03d}"
            note_str = f"{inst_str}-{key:03d}-{velocity:03d}"
            if note_str in examples.get("valid", {}) or note_str in examples[split]:  # valid and test share instruments
                continue
            examples[split][note_str] = {
                "note": note_id, "note_str": note_str, "instrument": program, "instrument_str": inst_str,
                "instrument_family": FAMILIES.index(family), "instrument_family_str": family,
                "instrument_source": ["acoustic", "electronic", "synthetic"].index(gm_source(program)),
                "instrument_source_str": gm_source(program), "pitch": key, "velocity": velocity,
                "sample_rate": SR, "qualities": [0] * 10, "qualities_str": [],
                "gm_program": program, "gm_preset": name, "soundfont": os.path.basename(soundfont)}
            notes_by_program.setdefault(program, []).append(
                ((split, note_str), key, velocity))
            note_id += 1
    jobs = []
    for program in sorted(notes_by_program):
        notes = notes_by_program[program]
        paths = [os.path.join(nsynth, f"nsynth-{split}", "audio", f"{ns}.wav") for (split, ns), _, _ in notes]
        jobs.append((renderer, program, notes, paths, tmp_dir))
    log(f"notes: rendering {note_id} notes of {len(jobs)} instruments")
    rows = []
    for job, res in zip(jobs, pool.imap(_render_program, jobs)):
        for ((split, ns), key, _), (f0, peak) in zip(job[2], res):
            family = kept[job[1]][0]
            c = cents_off(f0, key)
            rows.append((split, ns, family, key, f0, c, pitch_verdict(c, family), peak))
    shutil.rmtree(tmp_dir)
    silent = [r[1] for r in rows if r[7] < 1e-4]
    if silent:
        raise RuntimeError(f"{len(silent)} rendered notes are silent, e.g. {silent[:5]}")
    for split in examples:
        with open(os.path.join(nsynth, f"nsynth-{split}", "examples.json"), "w") as f:
            json.dump(examples[split], f, indent=2, sort_keys=True)
    rows.sort(key=lambda r: (["train", "valid", "test"].index(r[0]), r[1]))
    with open(os.path.join(nsynth, "f0_check.tsv"), "w") as f:
        f.write("split\tnote_str\tfamily\tpitch\tf0_hz\tcents_off\tverdict\n")
        for split, ns, family, key, f0, c, verdict, _ in rows:
            f.write(f"{split}\t{ns}\t{family}\t{key}\t{f0:.2f}\t{c:+.1f}\t{verdict}\n")
    verdicts = {}
    for r in rows:
        verdicts[r[6]] = verdicts.get(r[6], 0) + 1
    agree = float(np.mean([agrees(r[6], r[2]) for r in rows]))
    f0_summary = dict(notes=len(rows), agree=round(agree, 4), verdicts=dict(sorted(verdicts.items())),
                      median_abs_cents_ok=round(float(np.median([abs(r[5]) for r in rows if r[6] == "ok"])), 1)
                      if verdicts.get("ok") else None)
    log(f"notes: f0 check on all {len(rows)} notes: {agree:.1%} name their key ({f0_summary['verdicts']})")
    if agree < MIN_F0_AGREE:
        raise RuntimeError(f"f0 check failed: only {agree:.1%} of the rendered notes have an f0 that names their MIDI "
                           f"key (need {MIN_F0_AGREE:.0%}); see {os.path.join(nsynth, 'f0_check.tsv')}")
    split_programs = {"train": train_programs, "valid": heldout_programs, "test": heldout_programs}
    summary = dict(
        soundfont=soundfont, soundfont_md5=_md5(soundfont), notes={s: len(examples[s]) for s in examples},
        instruments={s: [f"{p} {kept[p][1]} ({kept[p][0]})" for p in split_programs[s]] for s in split_programs},
        families={s: sorted({kept[p][0] for p in split_programs[s]}, key=FAMILIES.index) for s in split_programs},
        instrument_groups=[[f"{p} {kept[p][1]}" for p in g] for g in groups if len(g) > 1],
        left_out={str(p): r for p, r in sorted(excluded.items())}, f0_check=f0_summary)
    return [(os.path.relpath(os.path.join(nsynth, "nsynth-train", "audio", f"{ns}.wav"), out), int(NOTE_SECONDS * SR))
            for ns in sorted(examples["train"])], summary


def _md5(path):
    h = hashlib.md5()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# ------------------------------------------------------------------------------------------------------ build
def build(out, song_sources=SONG_SOURCES, soundfont=SOUNDFONT, renderer=None, max_song_seconds=90.0,
          clip_seconds=30.0, valid_percent=5.0, notes=(800, 300, 300), heldout_fraction=1 / 3, seed=0, workers=None,
          overwrite=False, log=print):
    """Build the development set into `out` (see the module docstring); returns build_info (also in
    out/build_info.json). renderer: callable(midi_path, wav_path), default FluidSynth(soundfont)."""
    t0 = time.time()
    check_packages(song_sources, soundfont, need_fluidsynth=renderer is None)
    renderer = renderer or FluidSynth(soundfont)
    out = os.path.abspath(out)
    if os.path.exists(out) and not overwrite:
        raise FileExistsError(f"{out}: already exists; remove it or pass --overwrite")
    partial = out + ".partial"
    if os.path.exists(partial):
        shutil.rmtree(partial)  # an interrupted earlier build
    os.makedirs(partial)
    workers = workers or min(4, os.cpu_count() or 1)
    with Pool(workers) as pool:
        song_train, song_valid, song_summary = build_songs(partial, out, song_sources, max_song_seconds,
                                                           clip_seconds, valid_percent, seed, pool, log)
        note_train, note_summary = build_notes(partial, soundfont, renderer, notes, seed, heldout_fraction, pool, log)
    # pre-training audio: the training songs and the training notes, unlabelled (the probe's valid and test notes,
    # played by held-out instruments, stay unseen)
    write_manifest(os.path.join(partial, "pretrain.tsv"), out, song_train + note_train)
    info = dict(
        command="python data/debian_music.py build", out=out,
        args=dict(max_song_seconds=max_song_seconds, clip_seconds=clip_seconds, valid_percent=valid_percent,
                  notes=list(notes), heldout_fraction=heldout_fraction, seed=seed),
        songs=dict(train_clips=len(song_train), valid_clips=len(song_valid),
                   train_hours=round(sum(n for _, n in song_train) / SR / 3600, 4),
                   valid_hours=round(sum(n for _, n in song_valid) / SR / 3600, 4), sources=song_summary),
        notes=note_summary, fluidsynth=package_version("fluidsynth") if isinstance(renderer, FluidSynth) else None,
        pretrain=dict(clips=len(song_train) + len(note_train),
                      hours=round(sum(n for _, n in song_train + note_train) / SR / 3600, 4)),
        build_seconds=round(time.time() - t0, 1))
    with open(os.path.join(partial, "build_info.json"), "w") as f:
        json.dump(info, f, indent=2)
    if os.path.exists(out):
        old = out + ".old"
        shutil.rmtree(old, ignore_errors=True)
        os.rename(out, old)
        os.rename(partial, out)
        shutil.rmtree(old)
    else:
        os.rename(partial, out)
    log(f"done in {info['build_seconds']:.0f} s: {len(song_train)} + {len(song_valid)} song clips "
        f"({info['songs']['train_hours']:.2f} + {info['songs']['valid_hours']:.2f} h), notes "
        f"{note_summary['notes']} -> {out} (pre-training manifest: {out}/pretrain.tsv, probe: --data-root "
        f"{out}/nsynth)")
    return info


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", help="build the development set")
    b.add_argument("--out", required=True)
    b.add_argument("--max-song-seconds", type=float, default=90.0, help="keep the first N s of each song")
    b.add_argument("--clip-seconds", type=float, default=30.0, help="cut songs into equal clips of at most N s")
    b.add_argument("--valid-percent", type=float, default=5.0, help="songs (whole) held out in songs/valid.tsv")
    b.add_argument("--notes", default="800,300,300", help="notes in train,valid,test")
    b.add_argument("--soundfont", default=SOUNDFONT)
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--workers", type=int, default=None)
    b.add_argument("--overwrite", action="store_true", help="replace an existing --out (only once the new build "
                   "is complete)")
    c = sub.add_parser("check", help="say which packages are missing")
    c.add_argument("--soundfont", default=SOUNDFONT)
    a = p.parse_args(argv)
    try:
        if a.cmd == "check":
            check_packages(soundfont=a.soundfont)
            for src in SONG_SOURCES:
                print(f"{src.package} {package_version(src.package)}: {len(find_songs(src))} songs in {src.root}")
            print(f"soundfont {a.soundfont}; fluidsynth {package_version('fluidsynth')}: all there")
            return
        counts = tuple(int(n) for n in a.notes.split(","))
        if len(counts) != 3:
            p.error(f"--notes must be three counts train,valid,test, got {a.notes!r}")
        build(a.out, soundfont=a.soundfont, max_song_seconds=a.max_song_seconds, clip_seconds=a.clip_seconds,
              valid_percent=a.valid_percent, notes=counts, seed=a.seed, workers=a.workers, overwrite=a.overwrite)
    except (MissingPackages, FileExistsError, SoundFontError) as e:
        print(f"data/debian_music.py: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
