"""data/debian_music.py on a tiny generated input, without the Debian packages: fake game-music packages (ogg files
and a DEP-5 copyright file), a small synthetic SoundFont written here, and a stub renderer that reads the MIDI files
the builder writes and synthesises their notes (the same interface as FluidSynth). With fluidsynth installed, one
more test renders the synthetic SoundFont with the real thing."""
import hashlib
import json
import os
import shutil
import struct

import numpy as np
import pytest
import soundfile as sf

from data import debian_music as dm
from data.downstream import read_nsynth
from data.manifest import read_manifest


# ---------------------------------------------------------------------------------------------- MIDI reader (stub)
def read_midi(path):
    """-> (program, [(on s, off s, key, velocity)], [All Sound Off times]) of a format-0 file (no running status)."""
    data = open(path, "rb").read()
    assert data[:4] == b"MThd"
    _, fmt, ntracks, tpq = struct.unpack(">IHHH", data[4:14])
    assert (fmt, ntracks) == (0, 1) and data[14:18] == b"MTrk"
    end = 22 + struct.unpack(">I", data[18:22])[0]
    pos, tick, tempo, program, on, notes, sound_off = 22, 0, 500_000, None, {}, [], []
    while pos < end:
        delta = 0
        while True:
            b = data[pos]
            pos += 1
            delta = (delta << 7) | (b & 0x7F)
            if b < 0x80:
                break
        tick += delta
        t = tick * tempo / 1e6 / tpq  # one tempo for the whole file (set at tick 0)
        status = data[pos]
        if status == 0xFF:
            kind, n = data[pos + 1], data[pos + 2]
            if kind == 0x51:
                tempo = int.from_bytes(data[pos + 3: pos + 6], "big")
            pos += 3 + n
        elif status & 0xF0 == 0xC0:
            program = data[pos + 1]
            pos += 2
        else:
            a, b = data[pos + 1], data[pos + 2]
            if status & 0xF0 == 0x90 and b > 0:
                on[a] = (t, b)
            elif status & 0xF0 == 0x80:
                start, vel = on.pop(a)
                notes.append((start, t, a, vel))
            elif status & 0xF0 == 0xB0 and a == 120:
                sound_off.append(t)
            pos += 3
    return program, sorted(notes), sound_off


class StubRenderer:
    """renderer(midi_path, wav_path) like dm.FluidSynth: a harmonic tone per note whose spectrum depends on the
    program. shift: {program: semitones} plays those programs out of tune; shift_unless_velocity: (v, semitones)
    shifts every note whose velocity is not v."""

    def __init__(self, sample_rate=16000, shift=None, shift_unless_velocity=None):
        self.sr, self.shift, self.shift_unless_velocity = sample_rate, shift or {}, shift_unless_velocity

    def __call__(self, midi_path, wav_path):
        program, notes, sound_off = read_midi(midi_path)
        length = max(sound_off) + 0.5
        y = np.zeros(int(length * self.sr))
        rng = np.random.default_rng(program)
        amps = np.arange(1, 9, dtype=float) ** -(1 + (program % 5) * 0.3)
        for on, off, key, vel in notes:
            key = key + self.shift.get(program, 0)
            if self.shift_unless_velocity and vel != self.shift_unless_velocity[0]:
                key += self.shift_unless_velocity[1]
            stop = min(t for t in sound_off if t > on)
            t = np.arange(int((stop - on) * self.sr)) / self.sr
            f0 = 440.0 * 2 ** ((key - 69) / 12)
            x = sum(a * np.sin(2 * np.pi * f0 * k * t + rng.uniform(0, 6.28))
                    for k, a in enumerate(amps, 1) if f0 * k < 0.45 * self.sr)
            env = np.minimum(1, t / 0.01) * np.where(t < off - on, 1.0, np.exp(-(t - (off - on)) / 0.2))
            i0 = int(round(on * self.sr))
            y[i0: i0 + len(t)] += vel / 127 * x * env
        sf.write(wav_path, y.astype(np.float32), self.sr, subtype="FLOAT")


# ---------------------------------------------------------------------------------------------- SoundFont writer
def write_sf2(path, presets, sample_rate=44000):
    """A minimal SoundFont 2.01. presets: [(program, name, [(lo key, hi key, sample index)])]; sample i is a looped
    harmonic tone of 440 Hz (root key 69) with a spectrum of its own; bank 0."""
    n_samples = 1 + max(s for _, _, zones in presets for _, _, s in zones)
    t = np.arange(sample_rate) / sample_rate  # 1 s = 440 periods of 100 samples, loop [4400, 44000)
    smpl, shdr = b"", b""
    for i in range(n_samples):
        wave = sum(np.sin(2 * np.pi * 440 * k * t) / k ** (1 + 0.5 * i) for k in range(1, 6))
        pcm = (wave / np.abs(wave).max() * 20000).astype("<i2").tobytes()
        start = len(smpl) // 2
        smpl += pcm + b"\0" * 92  # each sample is followed by 46 zero data points
        shdr += struct.pack("<20sIIIIIBbHH", f"tone{i}".encode(), start, start + sample_rate, start + 4400,
                            start + sample_rate, sample_rate, 69, 0, 0, 1)
    shdr += struct.pack("<20sIIIIIBbHH", b"EOS", 0, 0, 0, 0, 0, 0, 0, 0, 0)
    phdr = pbag = pgen = inst = ibag = igen = b""
    n_pbag = n_pgen = n_ibag = n_igen = 0
    for j, (program, name, zones) in enumerate(presets):
        phdr += struct.pack("<20sHHHIII", name.encode(), program, 0, n_pbag, 0, 0, 0)
        pbag += struct.pack("<HH", n_pgen, 0)
        n_pbag += 1
        pgen += struct.pack("<HH", 41, j)  # instrument j
        n_pgen += 1
        inst += struct.pack("<20sH", name.encode(), n_ibag)
        for lo, hi, s in zones:
            ibag += struct.pack("<HH", n_igen, 0)
            n_ibag += 1
            igen += struct.pack("<HH", 43, lo | hi << 8) + struct.pack("<HH", 54, 1) + struct.pack("<HH", 53, s)
            n_igen += 3
    phdr += struct.pack("<20sHHHIII", b"EOP", 0, 0, n_pbag, 0, 0, 0)
    pbag += struct.pack("<HH", n_pgen, 0)
    pgen += struct.pack("<HH", 0, 0)
    inst += struct.pack("<20sH", b"EOI", n_ibag)
    ibag += struct.pack("<HH", n_igen, 0)
    igen += struct.pack("<HH", 0, 0)

    def chunk(cid, data):
        return cid + struct.pack("<I", len(data)) + data + (b"\0" if len(data) % 2 else b"")

    info = chunk(b"ifil", struct.pack("<HH", 2, 1)) + chunk(b"isng", b"EMU8000\0") + chunk(b"INAM", b"test\0\0")
    pdta = b"".join(chunk(c, d) for c, d in [(b"phdr", phdr), (b"pbag", pbag), (b"pmod", b"\0" * 10),
                                             (b"pgen", pgen), (b"inst", inst), (b"ibag", ibag),
                                             (b"imod", b"\0" * 10), (b"igen", igen), (b"shdr", shdr)])
    body = b"sfbk" + chunk(b"LIST", b"INFO" + info) + chunk(b"LIST", b"sdta" + chunk(b"smpl", smpl)) \
        + chunk(b"LIST", b"pdta" + pdta)
    with open(path, "wb") as f:
        f.write(b"RIFF" + struct.pack("<I", len(body)) + body)


# Programs of the fixture: 0 and 1 share a sample (one keyboard instrument); 24 (guitar) and 81 (synth lead) share
# sample 5 over all of 81's keys, so 81 (a GM synth patch) is left out; 9 (glockenspiel) is rendered a fifth off by
# the stub and must fail the pitch screen; 46 (harp) has no family.
FIXTURE_PRESETS = [(0, "Piano A", [(0, 127, 0)]), (1, "Piano B", [(0, 59, 0), (60, 127, 1)]),
                   (4, "E.Piano", [(0, 127, 2)]), (6, "Harpsichord", [(0, 127, 3)]),
                   (24, "Nylon", [(0, 127, 4), (70, 127, 5)]), (25, "Steel", [(0, 127, 6)]),
                   (26, "Jazz", [(0, 127, 7)]), (32, "Bass A", [(0, 127, 8)]), (33, "Bass B", [(0, 127, 9)]),
                   (40, "Violin", [(0, 127, 10)]), (41, "Viola", [(0, 127, 11)]), (81, "Saw", [(0, 127, 5)]),
                   (9, "Glock", [(0, 127, 12)]), (11, "Vibes", [(0, 127, 13)]), (46, "Harp", [(0, 127, 14)])]
LICENCES = """Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/

Files: *
Copyright: 2020 Game Team
License: GPL-2+

Files: data/music/*
Copyright: Composer A
License: CC-BY-SA-3.0

Files: data/music/b*.ogg
 data/music/extra/*
Copyright: Composer B
License: CC0
"""


def make_sources(tmp):
    """Two fake packages: game1 (music/a.ogg 7 s, music/b.ogg 3 s, music/b_fast.ogg skipped, music/extra/c.ogg
    2.5 s) and game2 (bgm/d.ogg 5 s)."""
    rng = np.random.default_rng(0)
    songs = {"game1/music/a.ogg": 7.0, "game1/music/b.ogg": 3.0, "game1/music/b_fast.ogg": 3.0,
             "game1/music/extra/c.ogg": 2.5, "game2/bgm/d.ogg": 5.0}
    for rel, seconds in songs.items():
        path = os.path.join(tmp, "pkgs", rel)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        t = np.arange(int(seconds * 44100)) / 44100
        x = 0.3 * np.sin(2 * np.pi * 220 * t)[:, None] * np.ones(2) + 0.01 * rng.standard_normal((len(t), 2))
        sf.write(path, x, 44100, format="OGG", subtype="VORBIS")
    copyright = os.path.join(tmp, "pkgs", "copyright")
    with open(copyright, "w") as f:
        f.write(LICENCES)
    return [dm.SongSource("game1", "game1-data", os.path.join(tmp, "pkgs", "game1"), ("music/**/*.ogg",),
                          source_prefix="data/", skip=r"_fast\.ogg$", copyright=copyright),
            dm.SongSource("game2", "game2-data", os.path.join(tmp, "pkgs", "game2"), ("bgm/*.ogg",),
                          source_prefix="data/", copyright=copyright)]


def tiny_build(tmp, out, renderer=None, notes=(24, 8, 8)):
    sources = make_sources(tmp)
    sf2 = os.path.join(tmp, "test.sf2")
    write_sf2(sf2, FIXTURE_PRESETS)
    return dm.build(out, song_sources=sources, soundfont=sf2, renderer=renderer or StubRenderer(shift={9: 7}),
                    max_song_seconds=6.0, clip_seconds=4.0, valid_percent=25, notes=notes, workers=2,
                    log=lambda *a: None)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    tmp = str(tmp_path_factory.mktemp("devset"))
    info = tiny_build(tmp, os.path.join(tmp, "devset"))
    return tmp, os.path.join(tmp, "devset"), info


# ---------------------------------------------------------------------------------------------- tests
def test_midi_file_plays_the_notes_asked_for(tmp_path):
    notes = [(0.0, 3.0, 60, 100), (4.5, 3.0, 72, 25), (9.0, 3.0, 36, 127)]
    dm.write_midi(str(tmp_path / "a.mid"), 41, notes)
    program, got, sound_off = read_midi(str(tmp_path / "a.mid"))
    assert program == 41
    assert [(k, v) for _, _, k, v in got] == [(60, 100), (72, 25), (36, 127)]
    np.testing.assert_allclose([(a, b) for a, b, _, _ in got], [(0, 3), (4.5, 7.5), (9, 12)], atol=1e-3)
    np.testing.assert_allclose(sound_off, [4.0, 8.5, 13.0], atol=1e-3)


def test_read_sf2_keys_and_shared_samples(tmp_path):
    write_sf2(str(tmp_path / "t.sf2"), FIXTURE_PRESETS)
    presets, names = dm.read_sf2(str(tmp_path / "t.sf2"))
    assert names[:2] == ["tone0", "tone1"] and len(names) == 16  # 15 samples + the terminal record
    assert sorted(presets) == sorted((0, p) for p, _, _ in FIXTURE_PRESETS)
    name, keys = presets[(0, 1)]
    assert name == "Piano B" and keys[59] == {0} and keys[60] == {1} and len(keys) == 128
    assert presets[(0, 24)][1][69] == {4} and presets[(0, 24)][1][70] == {4, 5}
    (tmp_path / "x.sf2").write_bytes(b"RIFF\0\0\0\0WAVEfmt ")
    with pytest.raises(dm.SoundFontError, match="x.sf2: not a SoundFont 2 file"):
        dm.read_sf2(str(tmp_path / "x.sf2"))


def test_yin_f0():
    t = np.arange(16000) / 16000
    for f in (65.4, 261.6, 1000.0):  # within 5 cents (parabolic interpolation of a 16-sample period at 1 kHz)
        assert abs(1200 * np.log2(dm.yin_f0(np.sin(2 * np.pi * f * t)) / f)) < 5
    # missing fundamental: partials 2..6 of 110 Hz still have period 1/110 s
    x = sum(np.sin(2 * np.pi * 110 * k * t) / k for k in range(2, 7))
    assert abs(dm.cents_off(dm.yin_f0(x), 45)) < 5
    assert np.isnan(dm.yin_f0(np.random.default_rng(0).standard_normal(16000)))
    assert dm.pitch_verdict(-1195.0, "organ") == "octave" and dm.agrees("octave", "organ")
    assert not dm.agrees("octave", "flute") and dm.pitch_verdict(700.0, "flute") == "off"


def test_dep5_last_matching_paragraph_wins(tmp_path):
    (tmp_path / "copyright").write_text(LICENCES)
    dep5 = dm.read_dep5(str(tmp_path / "copyright"))
    assert dm.licence_of(dep5, "data/music/a.ogg") == ("CC-BY-SA-3.0", "Composer A")
    assert dm.licence_of(dep5, "data/music/b.ogg")[0] == "CC0"
    assert dm.licence_of(dep5, "data/music/extra/c.ogg")[0] == "CC0"  # a second glob on a continuation line
    assert dm.licence_of(dep5, "data/bgm/d.ogg")[0] == "GPL-2+"


def test_missing_packages_name_the_apt_line(tmp_path):
    src = dm.SongSource("x", "x-music-data", str(tmp_path / "nowhere"), ("*.ogg",))
    with pytest.raises(dm.MissingPackages) as e:
        dm.check_packages([src], soundfont=str(tmp_path / "none.sf2"), need_fluidsynth=False)
    assert "sudo apt-get install x-music-data" in str(e.value) and "none.sf2" in str(e.value)
    with pytest.raises(dm.MissingPackages, match="sudo apt-get install x-music-data"):
        dm.build(str(tmp_path / "out"), song_sources=[src], soundfont=str(tmp_path / "none.sf2"),
                 renderer=StubRenderer())
    assert not os.path.exists(tmp_path / "out") and not os.path.exists(tmp_path / "out.partial")


def test_songs_clips_manifests_licences(built):
    tmp, out, info = built
    assert not os.path.exists(out + ".partial")
    train_root, train = read_manifest(os.path.join(out, "songs", "train.tsv"))
    valid_root, valid = read_manifest(os.path.join(out, "songs", "valid.tsv"))
    assert train_root == valid_root == out
    entries = train + valid
    # a.ogg: its first 6 s (max_song_seconds) in 2 clips of 3 s (clip_seconds 4); b 3 s and c 2.5 s: one clip
    # each; d 5 s: 2 clips of 2.5 s; b_fast is skipped
    names = sorted(rel for rel, _ in entries)
    assert names == ["songs/game1/a_00.wav", "songs/game1/a_01.wav", "songs/game1/b_00.wav",
                     "songs/game1/extra__c_00.wav", "songs/game2/d_00.wav", "songs/game2/d_01.wav"]
    for rel, n in entries:
        x, sr = sf.read(os.path.join(out, rel))
        assert sr == 16000 and x.ndim == 1 and len(x) == n and len(x) <= 4 * 16000
    assert dict(entries)["songs/game1/a_00.wav"] + dict(entries)["songs/game1/a_01.wav"] == 6 * 16000
    assert len({rel.rsplit("_", 1)[0] for rel, _ in valid}) == 1  # 25% of 4 songs, whole songs
    lic = [line.split("\t") for line in open(os.path.join(out, "songs", "LICENSES.tsv")).read().splitlines()[1:]]
    assert {row[0]: row[4] for row in lic} == {"songs/game1/a_*.wav": "CC-BY-SA-3.0", "songs/game1/b_*.wav": "CC0",
                                               "songs/game1/extra__c_*.wav": "CC0", "songs/game2/d_*.wav": "GPL-2+"}
    assert info["songs"]["sources"]["game1"]["songs"] == 3


def test_notes_in_nsynth_layout_split_disjoint(built):
    tmp, out, info = built
    root = os.path.join(out, "nsynth")
    inst = read_nsynth(root, "instrument").clips
    pitch = read_nsynth(root, "pitch").clips
    assert [c.key for c in inst] == [c.key for c in pitch]
    counts = {s: sum(c.split == s for c in inst) for s in ("train", "valid", "test")}
    assert counts == {"train": 24, "valid": 8, "test": 8}
    programs = {}
    for split in ("train", "valid", "test"):
        ex = json.load(open(os.path.join(root, f"nsynth-{split}", "examples.json")))
        programs[split] = {e["gm_program"] for e in ex.values()}
        for ns, e in ex.items():
            assert ns == f"{e['instrument_str']}-{e['pitch']:03d}-{e['velocity']:03d}"
            assert e["instrument_family_str"] == dm.GM_FAMILY[e["gm_program"]]
            assert dm.PITCH_MIN <= e["pitch"] <= dm.PITCH_MAX and e["velocity"] in dm.VELOCITIES
            x, sr = sf.read(os.path.join(root, f"nsynth-{split}", "audio", ns + ".wav"))
            assert sr == 16000 and len(x) == 64000
            assert abs(np.abs(x).max() - 0.9 * e["velocity"] / 127) < 1e-3
            assert abs(dm.cents_off(dm.yin_f0(x), e["pitch"])) < 50
    held = programs["valid"] | programs["test"]
    assert not programs["train"] & held
    assert programs["train"] | held <= {0, 1, 4, 6, 24, 25, 26, 32, 33, 40, 41, 11}
    # 0 and 1 share a sample: one instrument, on one side
    assert {0, 1} <= programs["train"] | held and ({0, 1} <= programs["train"] or not {0, 1} & programs["train"])
    left_out = info["notes"]["left_out"]
    assert "Saw: shares samples with 24 Nylon (guitar)" == left_out["81"]
    assert "Glock: f0 names the key for 0 of 9" in left_out["9"]
    assert "46" not in left_out and "9" in left_out
    f0 = [line.split("\t") for line in open(os.path.join(root, "f0_check.tsv")).read().splitlines()[1:]]
    assert len(f0) == 40 and {row[6] for row in f0} == {"ok"} and info["notes"]["f0_check"]["agree"] == 1.0
    pre_root, pre = read_manifest(os.path.join(out, "pretrain.tsv"))
    train_songs = read_manifest(os.path.join(out, "songs", "train.tsv"))[1]
    assert pre_root == out and pre[: len(train_songs)] == train_songs
    assert sorted(rel for rel, _ in pre[len(train_songs):]) == sorted(
        f"nsynth/nsynth-train/audio/{c.key.split('/')[-1]}" for c in inst if c.split == "train")


def test_build_is_deterministic(built, tmp_path):
    tmp, out, _ = built
    again = str(tmp_path / "again")
    tiny_build(str(tmp_path), again)

    def digest(root):
        out = {}
        for d, _, files in os.walk(root):
            for f in files:
                if f not in ("build_info.json", "train.tsv", "valid.tsv", "pretrain.tsv", "LICENSES.tsv"):
                    out[os.path.relpath(os.path.join(d, f), root)] = hashlib.md5(open(os.path.join(d, f), "rb")
                                                                                 .read()).hexdigest()
        return out

    assert digest(out) == digest(again) and len(digest(out)) > 40
    for tsv in ("songs/train.tsv", "pretrain.tsv"):  # the same entries under another root
        assert read_manifest(os.path.join(out, tsv))[1] == read_manifest(os.path.join(again, tsv))[1]


def test_f0_gate_stops_a_mistuned_build(tmp_path):
    # the test notes (velocity 100) are in tune, so every program passes the screen; the other velocities are a
    # semitone sharp, so the per-note check must stop the build, and nothing is left at --out
    with pytest.raises(RuntimeError, match="f0 check failed"):
        tiny_build(str(tmp_path), str(tmp_path / "out"), StubRenderer(shift={9: 7}, shift_unless_velocity=(100, 1)))
    assert not os.path.exists(tmp_path / "out")


def test_existing_out_is_kept(built, tmp_path):
    (tmp_path / "out").mkdir()
    with pytest.raises(FileExistsError, match="already exists"):
        tiny_build(str(tmp_path), str(tmp_path / "out"))


@pytest.mark.skipif(shutil.which("fluidsynth") is None, reason="fluidsynth not installed (apt-get install fluidsynth)")
def test_fluidsynth_renders_the_midi_at_its_pitch_and_time(tmp_path):
    write_sf2(str(tmp_path / "t.sf2"), FIXTURE_PRESETS)
    notes = [(0.0, 3.0, 48, 100), (4.5, 3.0, 69, 100), (9.0, 3.0, 80, 50)]
    dm.write_midi(str(tmp_path / "a.mid"), 25, notes)
    dm.FluidSynth(str(tmp_path / "t.sf2"))(str(tmp_path / "a.mid"), str(tmp_path / "a.wav"))
    x = dm.load_audio(str(tmp_path / "a.wav"))
    for start, _, key, _ in notes:
        i = int(start * 16000)
        note = x[i: i + 64000]
        assert abs(dm.cents_off(dm.yin_f0(note), key)) < 10
        onset = np.argmax(np.abs(note) > 0.05 * np.abs(note).max()) / 16000
        assert onset < 0.02  # the note starts at its slot (fluidsynth renders in 64-sample blocks)
        assert np.abs(x[i - 1600: i - 10]).max() < 1e-3 if i else True  # All Sound Off silenced the last tail
