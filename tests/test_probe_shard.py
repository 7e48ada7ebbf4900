"""probe.py under torchrun: extraction shared over ranks gives the feature store one process gives (the same keys,
bit-identical rows, the same cache key), a killed rank resumes into it, and decoding processes (--workers) give the
rows that threads give. Ranks are two local gloo processes, as `torchrun --nproc_per_node=2` starts them."""
import json
import os
import socket

import numpy as np
import pytest
import soundfile as sf
import torch.multiprocessing as tmp_mp

import probe
from probing import features as pf
from test_probe import SR, tone, write_nsynth
from test_probe_beat import make_beat_folder


def varied_nsynth(root):
    """The NSynth fixture with notes of 1.5 to 9.5 s: clips of several windows and of different lengths, so the
    encoder calls pad, and a unit boundary (--batch-seconds) falls between any two clips."""
    write_nsynth(root, per_split=(12, 6, 6))
    for i, path in enumerate(sorted(root.glob("nsynth-*/audio/*.wav"))):
        sf.write(path, tone(220 + 30 * i, 1.5 + (i * 7) % 9, SR, harmonics=1 + i % 3, seed=i), SR, subtype="PCM_16")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank(rank, world, port, argv, die_after):
    """One rank, as torchrun starts it. die_after: rank 1 dies (os._exit, as a kill) after that many commits."""
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    if die_after is not None and rank == 1:
        append, commits = pf.FeatureStore.append, [0]

        def dying_append(self, clips):
            append(self, clips)
            commits[0] += 1
            if commits[0] >= die_after:
                os._exit(9)
        pf.FeatureStore.append = dying_append
    probe.main(argv)


def run_ranks(world, argv, die_after=None):
    tmp_mp.start_processes(_rank, args=(world, free_port(), argv, die_after), nprocs=world, join=True,
                           start_method="spawn")


def argv_for(task, root, cache, results, *extra):
    return ["--task", task, "--model", "random", "--model-config", "tiny", "--data-root", str(root), "--cache-dir",
            str(cache), "--results", str(results), "--device", "cpu", "--epochs", "2", *extra]


def store_rows(cache):
    """{clip key: its rows} and the cache key of the one store under `cache`."""
    metas = list(cache.glob("**/meta.json"))
    assert len(metas) == 1, metas
    store = pf.FeatureStore(str(metas[0].parent))
    assert not list(metas[0].parent.glob("part-*")), "part stores left behind"
    return {k: np.array(store.array()[s:s + n]) for k, (s, n) in store.index.items()}, store.key


def assert_same_store(a, b):
    (rows_a, key_a), (rows_b, key_b) = a, b
    assert key_a == key_b
    assert sorted(rows_a) == sorted(rows_b)
    for k in rows_a:
        assert rows_a[k].tobytes() == rows_b[k].tobytes(), k  # bit for bit


@pytest.mark.slow
def test_two_ranks_write_the_store_one_process_writes_and_a_killed_rank_resumes(tmp_path):
    varied_nsynth(tmp_path / "nsynth")
    extra = ("--batch-seconds", "20", "--workers", "0", "--window", "2")
    one = argv_for("nsynth_pitch", tmp_path / "nsynth", tmp_path / "one", tmp_path / "one.jsonl", *extra)
    probe.main(one)
    reference = store_rows(tmp_path / "one")
    assert len(reference[0]) == 24 and sum(len(r) for r in reference[0].values()) > 24  # clips of several windows

    # what the equality below rests on: batch composition changes rows (the padding, GroupNorm over the padded
    # input), so ranks that batched their clips as they came would not give this store
    probe.main(argv_for("nsynth_pitch", tmp_path / "nsynth", tmp_path / "b7", tmp_path / "b7.jsonl", *extra,
                        "--batch-seconds", "7"))
    rows7 = store_rows(tmp_path / "b7")[0]
    assert any(rows7[k].tobytes() != reference[0][k].tobytes() for k in rows7)

    two = argv_for("nsynth_pitch", tmp_path / "nsynth", tmp_path / "two", tmp_path / "two.jsonl", *extra)
    run_ranks(2, two)
    assert_same_store(store_rows(tmp_path / "two"), reference)
    # rank 0 alone trained and wrote the results line, the one a single process writes
    lines = [json.loads(x) for x in open(tmp_path / "two.jsonl")]
    single = [json.loads(x) for x in open(tmp_path / "one.jsonl")]
    assert len(lines) == 1 and lines[0]["metrics"] == single[0]["metrics"] and lines[0]["clips"] == single[0]["clips"]

    # rank 1 dies after its first unit: the run stops; the next start copies what its part holds and finishes
    killed = argv_for("nsynth_pitch", tmp_path / "nsynth", tmp_path / "killed", tmp_path / "k.jsonl", *extra)
    with pytest.raises(Exception):
        run_ranks(2, killed, die_after=1)
    parts = list((tmp_path / "killed").glob("**/part-1-of-2/index.jsonl"))
    assert parts and len(open(parts[0]).readlines()) >= 1  # the dead rank's first unit is on disk
    run_ranks(2, killed)
    assert_same_store(store_rows(tmp_path / "killed"), reference)


@pytest.mark.slow
def test_beat_frames_over_two_ranks_equal_one_process(tmp_path):
    make_beat_folder(tmp_path / "beats", 6, seconds=7.0)
    extra = ("--batch-seconds", "10", "--workers", "0")
    probe.main(argv_for("beat", tmp_path / "beats", tmp_path / "one", tmp_path / "one.jsonl", *extra))
    run_ranks(2, argv_for("beat", tmp_path / "beats", tmp_path / "two", tmp_path / "two.jsonl", *extra))
    assert_same_store(store_rows(tmp_path / "two"), store_rows(tmp_path / "one"))


def test_worker_processes_give_the_rows_threads_give(tmp_path):
    varied_nsynth(tmp_path / "nsynth")
    for name, workers in (("threads", "0"), ("procs", "2")):
        probe.main(argv_for("nsynth_pitch", tmp_path / "nsynth", tmp_path / name, tmp_path / f"{name}.jsonl",
                            "--workers", workers, "--batch-seconds", "20", "--window", "2"))
    assert_same_store(store_rows(tmp_path / "procs"), store_rows(tmp_path / "threads"))
    assert 2 in pf._POOLS  # the processes did the decoding


def test_units_are_a_function_of_the_clip_list():
    class C:
        def __init__(self, k):
            self.key = k
    clips = [C(i) for i in range(6)]
    units = pf.plan_units(clips, [5, 5, 12, 1, 30, 2], 11)
    assert [[c.key for c in u] for u in units] == [[0, 1], [2], [3], [4], [5]]  # a long clip is a unit alone
    assert [c.key for u in units[1::2] for c in u] == [2, 4]  # rank 1 of 2
