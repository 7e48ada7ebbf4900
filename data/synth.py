"""The embedded default corpus: synthetic music, so that every stage runs with no download.

    python data/synth.py [synth] --hours 1 [--clip-seconds 30] [--seed 0] [--valid-percent 5] [--nsynth 500]

writes synth/audio/*.wav (16 kHz, 16-bit mono), synth/train.tsv and synth/valid.tsv; with --nsynth N also a small
note set in NSynth's own layout under synth/nsynth/ (N notes in each of train, valid and test) for probe.py's
instrument and pitch tasks. Everything is a pure function of --seed.

The music is made to give a small model something to learn: eleven instrument families (the NSynth families) with
distinct spectra and envelopes (odd harmonics for reeds, all harmonics for brass and strings, decaying harmonics
for plucked strings, inharmonic partials for mallets, formants for voices, ...), chord progressions and melodies in
random keys and modes, a bass line, drums (kick, snare, hi-hat) on a tempo grid of 70-160 BPM, and a light reverb.
All numpy and vectorised per note; clips are rendered in worker processes.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run as a script from anywhere

import argparse
import json
from multiprocessing import Pool

import numpy as np
import soundfile as sf
from scipy.signal import fftconvolve, lfilter

from data.manifest import write_manifest

SR = 16000

# NSynth's 11 families, in NSynth's own id order (instrument_family)
FAMILIES = ["bass", "brass", "flute", "guitar", "keyboard", "mallet", "organ", "reed", "string", "synth_lead",
            "vocal"]
SOURCES = ["acoustic", "electronic", "synthetic"]
QUALITIES = ["bright", "dark", "distortion", "fast_decay", "long_release", "multiphonic", "nonlinear_env",
             "percussive", "reverb", "tempo-synced"]
# MIDI range each family plays, in the NSynth note set and in the music
PITCH_RANGE = {"bass": (28, 60), "brass": (48, 80), "flute": (60, 96), "guitar": (40, 80), "keyboard": (36, 96),
               "mallet": (48, 96), "organ": (36, 84), "reed": (48, 84), "string": (40, 88), "synth_lead": (48, 88),
               "vocal": (48, 80)}
# vowel formants (Hz, bandwidth Hz) for the vocal family
VOWELS = {"a": [(800, 80), (1150, 90), (2900, 120)], "e": [(400, 70), (1600, 80), (2700, 100)],
          "o": [(450, 70), (800, 80), (2830, 100)], "u": [(325, 50), (700, 60), (2530, 170)]}


def midi_to_hz(m):
    return 440.0 * 2.0 ** ((np.asarray(m, dtype=np.float64) - 69) / 12)


# ------------------------------------------------------------------------------------------------ instruments
def make_instrument(family, rng):
    """Parameters of one instrument of `family`; two draws from one family share the spectral shape that defines
    the family and differ in brightness, envelope times and vibrato."""
    u = rng.uniform
    n = 40  # partials (those above Nyquist are dropped per note)
    k = np.arange(1, n + 1, dtype=np.float64)
    inst = dict(family=family, ratios=k.copy(), decays=np.zeros(n), attack=0.01, decay=0.1, sustain=1.0,
                release=0.1, vibrato=0.0, vib_rate=5.0, noise=0.0, formants=None, detune=0.0, stretch=0.0)
    if family == "bass":  # electric/synth bass: saw-ish, dark, plucked decay
        inst.update(amps=k ** -u(1.3, 2.0), decays=u(1.0, 3.0) * k ** 0.7, attack=0.005, decay=0.2, sustain=0.5,
                    release=0.08)
    elif family == "brass":  # all harmonics, bright, slow attack, strong low-mid partials
        inst.update(amps=k ** -u(0.8, 1.2) * np.exp(-((k - u(2, 4)) ** 2) / 30), attack=u(0.04, 0.09),
                    decay=0.1, sustain=u(0.7, 0.9), release=u(0.08, 0.2), vibrato=u(0.0, 0.004))
    elif family == "flute":  # nearly sinusoidal + breath noise + vibrato
        inst.update(amps=np.where(k <= 3, [1.0, u(0.1, 0.3), u(0.02, 0.1)] + [0] * (n - 3), 0.0),
                    attack=u(0.05, 0.1), sustain=0.9, release=0.15, vibrato=u(0.004, 0.008), vib_rate=u(4.5, 5.5),
                    noise=u(0.02, 0.06))
    elif family == "guitar":  # plucked string: all harmonics, higher ones decay faster (Karplus-Strong-like)
        inst.update(amps=k ** -u(1.0, 1.5) * np.abs(np.sin(np.pi * k * u(0.1, 0.3))) + 1e-3,
                    decays=u(0.6, 1.5) * k ** u(0.8, 1.2), attack=0.002, decay=0.05, sustain=1.0, release=0.1)
    elif family == "keyboard":  # piano-like: stretched (slightly inharmonic) partials, decaying
        inst.update(amps=k ** -u(1.2, 1.8), decays=u(0.4, 1.0) + u(0.1, 0.3) * k, attack=0.003, release=0.2,
                    stretch=u(2e-4, 6e-4))
    elif family == "mallet":  # bar percussion: few strongly inharmonic partials, fast decay
        ratios = np.array([1.0, u(3.8, 4.1), u(9.0, 10.0), u(16.0, 18.0)] + [1.0] * (n - 4))
        inst.update(ratios=ratios, amps=np.array([1.0, u(0.3, 0.6), u(0.1, 0.3), 0.05] + [0.0] * (n - 4)),
                    decays=np.array([u(2, 5), u(6, 12), u(15, 25), 40.0] + [1.0] * (n - 4)), attack=0.001,
                    release=0.05)
    elif family == "organ":  # drawbars: octave/fifth partials, no decay, instant attack and release
        amps = np.zeros(n)
        for h in (1, 2, 3, 4, 6, 8):
            amps[h - 1] = u(0.2, 1.0)
        inst.update(amps=amps, attack=0.005, release=0.02, vibrato=u(0.0, 0.003), vib_rate=6.5)
    elif family == "reed":  # clarinet/sax: odd harmonics dominate
        even = u(0.05, 0.3)
        inst.update(amps=k ** -u(0.9, 1.3) * np.where(k % 2 == 1, 1.0, even), attack=u(0.02, 0.05),
                    sustain=0.85, release=0.08, vibrato=u(0.0, 0.005), noise=u(0.0, 0.01))
    elif family == "string":  # bowed: saw spectrum, slow attack, vibrato
        inst.update(amps=k ** -u(0.9, 1.2), attack=u(0.1, 0.25), sustain=0.9, release=u(0.2, 0.4),
                    vibrato=u(0.005, 0.01), vib_rate=u(5.0, 6.5))
    elif family == "synth_lead":  # detuned square/pulse waves
        duty = u(0.2, 0.5)
        inst.update(amps=np.abs(np.sin(np.pi * k * duty)) / k, attack=0.01, sustain=0.8, release=0.05,
                    detune=u(0.003, 0.01))
    elif family == "vocal":  # glottal pulse spectrum through vowel formants, vibrato
        inst.update(amps=k ** -u(1.0, 1.4), attack=u(0.05, 0.12), sustain=0.9, release=0.15,
                    vibrato=u(0.008, 0.015), vib_rate=u(5.0, 6.0), formants=VOWELS["aeou"[rng.integers(4)]],
                    noise=u(0.0, 0.01))
    else:
        raise ValueError(f"unknown family {family!r}; one of {FAMILIES}")
    return inst


def render_note(inst, midi, seconds, velocity, rng, tail=None):
    """One note: `seconds` held, then the release (plus `tail` seconds more, default the release time)."""
    f0 = midi_to_hz(midi)
    tail = inst["release"] if tail is None else tail
    n = int((seconds + tail) * SR)
    t = np.arange(n) / SR
    ratios = inst["ratios"] * (1 + inst["stretch"] * inst["ratios"] ** 2)
    # partials above Nyquist would alias; those 60 dB below the strongest are inaudible under it
    keep = (ratios * f0 < 0.45 * SR) & (inst["amps"] > 1e-3 * inst["amps"].max())
    ratios, amps, decays = ratios[keep], inst["amps"][keep], inst["decays"][keep]
    if inst["formants"] is not None:
        f = ratios * f0
        amps = amps * sum(np.exp(-0.5 * ((f - fc) / bw) ** 2) for fc, bw in inst["formants"]) + amps * 0.02
    vel = velocity / 127.0
    amps = amps * (ratios ** (0.6 * (vel - 0.7)))  # louder = brighter, as in most acoustic instruments
    # phase of the fundamental with vibrato (starting at zero depth, fading in over 0.3 s)
    vib = inst["vibrato"] * np.minimum(1.0, t / 0.3) * np.sin(2 * np.pi * inst["vib_rate"] * t)
    phase0 = 2 * np.pi * f0 * np.cumsum(1.0 + vib) / SR
    phases = rng.uniform(0, 2 * np.pi, size=len(ratios))
    x = np.zeros(n)
    detunes = [0.0] if inst["detune"] == 0 else [-inst["detune"], inst["detune"]]
    for d in detunes:
        # float32 from here: twice as fast, and phase error < 1e-2 rad over a 4 s note is inaudible
        arg = np.outer(ratios * (1 + d), phase0)
        arg += phases[:, None]
        partials = np.sin(arg.astype(np.float32))
        if decays.any():
            partials *= np.exp(-np.outer(decays, t).astype(np.float32))
        x += amps.astype(np.float32) @ partials
    if inst["noise"] > 0:  # breath: low-passed noise following the envelope
        x += inst["noise"] * np.abs(amps).sum() * lfilter([0.3], [1, -0.7], rng.standard_normal(n))
    a, d, s, r = inst["attack"], inst["decay"], inst["sustain"], inst["release"]
    points = np.maximum.accumulate(np.array([0.0, a, a + d, max(seconds, a + d), max(seconds, a + d) + r]))
    env = np.interp(t, points + np.arange(5) * 1e-6, [0.0, 1.0, s, s, 0.0])
    x *= env
    peak = np.abs(x).max()
    return (x / peak * vel if peak > 0 else x).astype(np.float32)


def _drum_kit(rng):
    """Kick (pitched sine sweep), snare (noise burst + tone), hi-hat (high-passed noise); one kit per song."""
    t = np.arange(int(0.5 * SR)) / SR
    f_start, f_end = rng.uniform(100, 180), rng.uniform(40, 60)
    freq = f_end + (f_start - f_end) * np.exp(-t / rng.uniform(0.02, 0.05))
    kick = np.sin(2 * np.pi * np.cumsum(freq) / SR) * np.exp(-t / rng.uniform(0.1, 0.25))
    ts = t[: int(0.25 * SR)]
    noise = lfilter([1, -1], [1, -rng.uniform(0.3, 0.8)], rng.standard_normal(len(ts)))
    snare = (0.6 * noise * np.exp(-ts / rng.uniform(0.04, 0.1))
             + 0.5 * np.sin(2 * np.pi * rng.uniform(160, 220) * ts) * np.exp(-ts / 0.05))
    th = t[: int(0.12 * SR)]
    hat = np.diff(rng.standard_normal(len(th) + 1)) * np.exp(-th / rng.uniform(0.01, 0.04))
    return {k: (v / np.abs(v).max()).astype(np.float32) for k, v in (("kick", kick), ("snare", snare), ("hat", hat))}


MODES = {"major": [0, 2, 4, 5, 7, 9, 11], "minor": [0, 2, 3, 5, 7, 8, 10], "dorian": [0, 2, 3, 5, 7, 9, 10],
         "mixolydian": [0, 2, 4, 5, 7, 9, 10], "phrygian": [0, 1, 3, 5, 7, 8, 10],
         "harmonic_minor": [0, 2, 3, 5, 7, 8, 11]}
PROGRESSIONS = [[0, 4, 5, 3], [0, 5, 3, 4], [0, 3, 4, 4], [1, 4, 0, 0], [0, 3, 0, 4], [5, 3, 0, 4], [0, 6, 5, 4],
                [0, 0, 3, 3]]
CHORD_FAMILIES = ["organ", "keyboard", "string", "guitar", "brass", "synth_lead", "mallet"]
MELODY_FAMILIES = ["flute", "reed", "brass", "synth_lead", "mallet", "vocal", "guitar", "keyboard", "string"]


def _add(out, x, start):
    start = int(start)
    if start >= len(out):
        return
    end = min(len(out), start + len(x))
    out[start:end] += x[: end - start]


def render_song(seed, seconds):
    """A clip of `seconds` of music, a pure function of `seed` (any int or list of ints)."""
    rng = np.random.default_rng(seed)
    cache = {}

    def note(inst, midi, dur, velocity):
        # a song repeats its notes (chords every bar, the bass line): render each distinct one once, like a sampler
        key = (id(inst), int(midi), round(dur, 3), int(velocity) // 8)
        if key not in cache:
            cache[key] = render_note(inst, midi, dur, velocity, rng)
        return cache[key]
    n = int(seconds * SR)
    bpm = rng.uniform(70, 160)
    beat = 60.0 / bpm
    beats_per_bar = 3 if rng.random() < 0.2 else 4
    mode = list(MODES.values())[rng.integers(len(MODES))]
    root = int(rng.integers(36, 48))  # key root, MIDI C2..B2
    prog = PROGRESSIONS[rng.integers(len(PROGRESSIONS))]
    bars_per_chord = int(rng.choice([1, 2]))

    def degree_to_midi(deg, octave):
        return root + 12 * (octave + deg // 7) + mode[deg % 7]

    parts = {}
    total_beats = int(np.ceil(seconds / beat)) + 1
    n_bars = total_beats // beats_per_bar + 1

    # chords: held, arpeggiated, or struck on every beat
    chord_inst = make_instrument(CHORD_FAMILIES[rng.integers(len(CHORD_FAMILIES))], rng)
    style = rng.choice(["held", "arpeggio", "beats"])
    x = np.zeros(n, dtype=np.float32)
    for bar in range(n_bars):
        deg = prog[(bar // bars_per_chord) % len(prog)]
        notes = [degree_to_midi(deg + i, 1) for i in (0, 2, 4)]
        t0 = bar * beats_per_bar * beat
        if style == "held":
            for m in notes:
                _add(x, 0.5 * note(chord_inst, m, beats_per_bar * beat * 0.95, 80), t0 * SR)
        elif style == "arpeggio":
            for step in range(beats_per_bar * 2):
                m = notes[step % 3] + (12 if step % 6 >= 3 else 0)
                _add(x, note(chord_inst, m, beat * 0.45, 70), (t0 + step * beat / 2) * SR)
        else:
            for b in range(beats_per_bar):
                for m in notes:
                    _add(x, 0.5 * note(chord_inst, m, beat * 0.6, 75), (t0 + b * beat) * SR)
    parts["chords"] = x

    # bass: root (sometimes fifth) on beats 1 and 3, or every beat
    if rng.random() < 0.85:
        bass_inst = make_instrument("bass", rng)
        every = int(rng.choice([1, 2]))
        x = np.zeros(n, dtype=np.float32)
        for b in range(0, total_beats, every):
            bar = b // beats_per_bar
            deg = prog[(bar // bars_per_chord) % len(prog)]
            deg = deg + (4 if (b % beats_per_bar) == 2 and rng.random() < 0.5 else 0)
            _add(x, note(bass_inst, degree_to_midi(deg, 0), beat * every * 0.8, 100), b * beat * SR)
        parts["bass"] = x

    # melody: a random walk on the scale, rhythms of 1/2 to 2 beats, some rests, leaning on chord tones
    if rng.random() < 0.9:
        mel_inst = make_instrument(MELODY_FAMILIES[rng.integers(len(MELODY_FAMILIES))], rng)
        lo, hi = PITCH_RANGE[mel_inst["family"]]
        octave = int(np.clip((max(lo, 55) - root) // 12, 1, 4))
        x = np.zeros(n, dtype=np.float32)
        pos, deg = 0.0, int(rng.integers(0, 7))
        while pos * beat < seconds:
            dur = float(rng.choice([0.5, 0.5, 1.0, 1.0, 1.5, 2.0]))
            if rng.random() > 0.15:
                deg = int(np.clip(deg + rng.choice([-2, -1, -1, 0, 1, 1, 2, 3, -3]), -3, 10))
                vel = int(rng.integers(70, 120))
                _add(x, note(mel_inst, degree_to_midi(deg, octave), dur * beat * 0.9, vel),
                     pos * beat * SR)
            pos += dur
        parts["melody"] = x

    # drums on a 16th grid
    if rng.random() < 0.85:
        kit = _drum_kit(rng)
        steps = beats_per_bar * 4
        kick = rng.random(steps) < 0.15
        kick[0] = True
        if beats_per_bar == 4:
            kick[8] |= rng.random() < 0.7
        snare = np.zeros(steps, dtype=bool)
        snare[4::8] = True
        hat_every = int(rng.choice([1, 2, 4]))
        x = np.zeros(n, dtype=np.float32)
        step_s = beat / 4
        for i in range(total_beats * 4):
            s = i % steps
            t = i * step_s * SR
            if kick[s]:
                _add(x, kit["kick"], t)
            if snare[s]:
                _add(x, 0.7 * kit["snare"], t)
            if s % hat_every == 0:
                _add(x, (0.25 if s % 4 else 0.35) * rng.uniform(0.7, 1.0) * kit["hat"], t)
        parts["drums"] = x

    levels = {"chords": rng.uniform(0.3, 0.6), "bass": rng.uniform(0.4, 0.8), "melody": rng.uniform(0.5, 0.9),
              "drums": rng.uniform(0.3, 0.7)}
    mix = np.zeros(n, dtype=np.float64)
    for name, x in parts.items():
        rms = np.sqrt(np.mean(x.astype(np.float64) ** 2)) + 1e-8
        mix += levels[name] * x / rms
    # light reverb: exponentially decaying noise as the room response
    tr = np.arange(int(rng.uniform(0.3, 1.2) * SR)) / SR
    ir = rng.standard_normal(len(tr)) * np.exp(-6.9 * tr / tr[-1])
    wet = fftconvolve(mix, ir)[:n]
    mix = mix + rng.uniform(0.05, 0.25) * wet * np.sqrt(np.mean(mix ** 2) / (np.mean(wet ** 2) + 1e-12))
    return (mix / (np.abs(mix).max() + 1e-8) * rng.uniform(0.5, 0.95)).astype(np.float32)


# ------------------------------------------------------------------------------------------------ corpus writers
def _write_clip(job):
    out_dir, rel, seed, seconds = job
    x = render_song(seed, seconds)
    sf.write(os.path.join(out_dir, rel), x, SR, subtype="PCM_16")
    return rel, len(x)


def write_corpus(out_dir, hours, clip_seconds=30.0, seed=0, valid_percent=5.0, workers=None, progress=True):
    """Render ceil(hours * 3600 / clip_seconds) clips into out_dir/audio and write train.tsv / valid.tsv."""
    from tqdm import tqdm

    n_clips = max(1, int(np.ceil(hours * 3600 / clip_seconds)))
    os.makedirs(os.path.join(out_dir, "audio"), exist_ok=True)
    jobs = [(out_dir, f"audio/song_{i:06d}.wav", [seed, i], clip_seconds) for i in range(n_clips)]
    workers = workers or min(8, os.cpu_count() or 1)
    with Pool(workers) as pool:
        entries = list(tqdm(pool.imap(_write_clip, jobs), total=n_clips, desc="rendering", unit="clip",
                            disable=not progress))
    n_valid = int(round(n_clips * valid_percent / 100))
    if valid_percent > 0:
        n_valid = min(max(1, n_valid), n_clips - 1)  # valid needs one clip, train must keep one
    is_valid = np.zeros(n_clips, dtype=bool)
    is_valid[np.random.default_rng([seed, 1 << 20]).permutation(n_clips)[:n_valid]] = True
    root = os.path.realpath(out_dir)
    write_manifest(os.path.join(out_dir, "train.tsv"), root, [e for e, v in zip(entries, is_valid) if not v])
    write_manifest(os.path.join(out_dir, "valid.tsv"), root, [e for e, v in zip(entries, is_valid) if v])
    return entries


def _nsynth_instruments(seed, per_family=6, held_out=2):
    """Instruments per family; the last `held_out` of each family play only in valid/test, as in NSynth, whose
    valid/test instruments do not occur in train (so the family, not the instrument, must be recognised)."""
    rng = np.random.default_rng([seed, 2 << 20])
    train, heldout = [], []
    for fam_id, fam in enumerate(FAMILIES):
        for j in range(per_family):
            source = int(rng.integers(3))
            inst = make_instrument(fam, rng)
            inst.update(instrument_str=f"{fam}_{SOURCES[source]}_{j:03d}", source=source, family_id=fam_id)
            (train if j < per_family - held_out else heldout).append(inst)
    for i, inst in enumerate(train + heldout):
        inst["instrument"] = i
    return train, heldout


def _write_note(job):
    path, inst, pitch, velocity, seed = job
    rng = np.random.default_rng(seed)
    # NSynth: 4 s notes, key held 3 s, then released
    x = render_note(inst, pitch, 3.0, velocity, rng, tail=1.0)[: 4 * SR]
    x = np.pad(x, (0, 4 * SR - len(x))) * 0.9
    sf.write(path, x, SR, subtype="PCM_16")


def write_nsynth(out_dir, n_train, n_valid, n_test, seed=0, workers=None):
    """Small synthetic note set in NSynth's layout: out_dir/nsynth-{train,valid,test}/{examples.json,audio/*.wav}."""
    train_insts, heldout_insts = _nsynth_instruments(seed)
    rng = np.random.default_rng([seed, 3 << 20])
    jobs, note_id = [], 0
    for split, count, insts in (("train", n_train, train_insts), ("valid", n_valid, heldout_insts),
                                ("test", n_test, heldout_insts)):
        split_dir = os.path.join(out_dir, f"nsynth-{split}")
        os.makedirs(os.path.join(split_dir, "audio"), exist_ok=True)
        examples = {}
        while len(examples) < count:
            inst = insts[rng.integers(len(insts))]
            lo, hi = PITCH_RANGE[inst["family"]]
            pitch = int(rng.integers(max(lo, 36), min(hi, 84) + 1))
            velocity = int(rng.choice([25, 50, 75, 100, 127]))
            note_str = f"{inst['instrument_str']}-{pitch:03d}-{velocity:03d}"
            if note_str in examples:
                if len(examples) >= len(insts) * 49 * 5:
                    raise ValueError(f"{count} distinct notes requested for {split}, only "
                                     f"{len(insts) * 49 * 5} exist")
                continue
            fam = inst["family"]
            qualities = [int(q in ({"guitar": ["fast_decay"], "mallet": ["fast_decay", "percussive"],
                                    "brass": ["bright"], "synth_lead": ["bright"], "bass": ["dark"],
                                    "flute": ["dark"], "string": ["long_release"]}.get(fam, [])))
                         for q in QUALITIES]
            examples[note_str] = {
                "note": note_id, "note_str": note_str, "instrument": inst["instrument"],
                "instrument_str": inst["instrument_str"], "instrument_family": inst["family_id"],
                "instrument_family_str": fam, "instrument_source": inst["source"],
                "instrument_source_str": SOURCES[inst["source"]], "pitch": pitch, "velocity": velocity,
                "sample_rate": SR, "qualities": qualities,
                "qualities_str": [q for q, on in zip(QUALITIES, qualities) if on]}
            jobs.append((os.path.join(split_dir, "audio", note_str + ".wav"), inst, pitch, velocity,
                         [seed, 4 << 20, note_id]))
            note_id += 1
        with open(os.path.join(split_dir, "examples.json"), "w") as f:
            json.dump(examples, f, indent=2, sort_keys=True)
    workers = workers or min(8, os.cpu_count() or 1)
    with Pool(workers) as pool:
        for _ in pool.imap_unordered(_write_note, jobs, chunksize=16):
            pass


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out_dir", nargs="?", default="synth")
    p.add_argument("--hours", type=float, default=1.0)
    p.add_argument("--clip-seconds", type=float, default=30.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--valid-percent", type=float, default=5.0)
    p.add_argument("--nsynth", type=int, default=500, help="notes per split (train/valid/test) of the NSynth-layout "
                   "set for probe.py (0: none)")
    p.add_argument("--workers", type=int, default=None)
    a = p.parse_args(argv)
    entries = write_corpus(a.out_dir, a.hours, a.clip_seconds, a.seed, a.valid_percent, a.workers)
    print(f"{len(entries)} clips ({sum(n for _, n in entries) / SR / 3600:.2f} h) -> {a.out_dir}/train.tsv, "
          f"{a.out_dir}/valid.tsv")
    if a.nsynth > 0:
        write_nsynth(os.path.join(a.out_dir, "nsynth"), a.nsynth, a.nsynth, a.nsynth, a.seed, a.workers)
        print(f"NSynth-layout notes: {a.nsynth} per split (train/valid/test) -> {a.out_dir}/nsynth")


if __name__ == "__main__":
    main()
