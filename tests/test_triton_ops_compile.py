"""The Triton kernels compiled for the GPUs the project names (sm_80 A100, sm_90 H100/H200) on the CPU, no GPU needed:
every config the autotuners may pick fits the target's shared memory, spills at most compile_check.MAX_SPILL_BYTES,
and every dtype x head dim x target keeps a config; atomics are relaxed, the dropout seed is not specialised, k-means
centroid rows are aligned, dropout's instruction cost is bounded, and the kernel modules' static shared-memory
estimates are upper bounds of the compiler's figures. See triton_ops/compile_check.py.

The default run compiles a representative subset (triton_ops.compile_check.subset_launches) in one subprocess (Triton
must not be in interpreter mode there); results are cached per compile key under $MUSICSSL_COMPILE_CACHE (default
~/.cache/musicssl/compile_check), so a re-run only compiles what changed. MUSICSSL_COMPILE_FULL=1 compiles every
dtype, head dim and k-means variant instead (about 10x the compiles).
"""
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FULL = os.environ.get("MUSICSSL_COMPILE_FULL") == "1"

triton = pytest.importorskip("triton")
PTXAS = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
pytestmark = pytest.mark.skipif(not os.path.exists(PTXAS), reason="this Triton wheel has no ptxas (not a CUDA build)")

CHECKS = ["shared memory", "no config left", "spills", "compile error", "too many configs", "fenced atomics",
          "seed specialised", "shared memory estimate", "unaligned centroids", "dropout cost"]


@pytest.fixture(scope="module")
def compile_results(tmp_path_factory):
    out = tmp_path_factory.mktemp("compile")
    env = dict(os.environ, TRITON_INTERPRET="0", PYTHONPATH=ROOT, TRITON_DEFAULT_FP_FUSION="1")
    cmd = [sys.executable, "-m", "triton_ops.compile_check", "--quiet", "--json", str(out / "rows.jsonl"),
           "--failures-json", str(out / "failures.json"), "--workers", str(min(2, os.cpu_count() or 1))]
    result = subprocess.run(cmd + (["--full"] if FULL else []), cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=3600)
    if result.returncode == 3:  # a Triton without the compiler internals the check drives
        pytest.skip(result.stderr.strip())
    if not os.path.exists(out / "failures.json"):
        pytest.fail(f"triton_ops.compile_check did not finish:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    rows = [json.loads(line) for line in open(out / "rows.jsonl")]
    return rows, json.load(open(out / "failures.json")), result.stdout


@pytest.mark.slow
@pytest.mark.parametrize("check", CHECKS)
def test_kernels_compile_for_named_gpus(compile_results, check):
    rows, failed, stdout = compile_results
    assert check in stdout or not failed.get(check)  # the check ran (it is listed when all pass)
    assert not failed.get(check), f"{check}:\n" + "\n".join(failed[check])


@pytest.mark.slow
def test_compile_check_covers_both_targets_and_every_kernel(compile_results):
    rows, _, _ = compile_results
    assert {r["arch"] for r in rows} == {80, 90}
    kernels = {r["kernel"] for r in rows}
    assert kernels == {"_attn_fwd_kernel", "_attn_bwd_dkdv_kernel", "_attn_bwd_dq_kernel", "_dropout_mask_kernel",
                       "_assign_kernel", "_cluster_sums_kernel"}
    compiled = [r for r in rows if r["config"] is not None and "error" not in r]
    assert len(compiled) >= 40
    # the facts each check relies on were really extracted (a parsing failure would pass every check vacuously)
    assert all(r["registers"] and r["spill_stores"] is not None and r["sass_instructions"] > 100 for r in compiled)
    assert any(r["shared"] > 0 for r in compiled)
    assert any(r["atomics"] for r in compiled)  # the k-means accumulation was compiled and its atomics found


def test_compile_check_catches_what_it_claims():
    """The checks themselves, on hand-made rows: each kind of defect is reported, a clean row is not."""
    code = r"""
import json, triton_ops.compile_check as cc
base = dict(arch=80, gpu="A100", max_shared=166912, case="attention fwd bf16 d64 dropout", kernel="_attn_fwd_kernel",
            num_configs=4, prune_error=None, do_not_specialize=["seed", "threshold"],
            meta=dict(module="attention", kind="fwd", dtype="bf16", head_dim=64, dropout=True),
            config=dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=3), shared=45056, registers=168,
            stack=0, spill_stores=0, spill_loads=0, atomics=[], sass_instructions=2000, sass_ops={}, specialised={})
plain = dict(base, case="attention fwd bf16 d64", meta=dict(base["meta"], dropout=False), sass_instructions=1600)
bad = [dict(base, shared=200000), dict(base, spill_stores=504), dict(base, do_not_specialize=[]),
       dict(base, num_configs=19), dict(base, error="OutOfResources"),
       dict(base, kernel="_assign_kernel", meta=dict(module="kmeans", kind="assign", variant="fp32", D=39,
            accumulate=True), config=dict(BLOCK_N=64, BLOCK_K=64, num_warps=4, num_stages=2),
            atomics=["atom.global.gpu.acq_rel.add.f32"], sass_ops={"MEMBAR": 3},
            specialised={"stride_ck": []}),
       dict(base, sass_instructions=4000)]
print(json.dumps({"clean": sorted(cc.failures([base, plain])),
                  "bad": [sorted(cc.failures([b, plain])) for b in bad]}))
"""
    env = dict(os.environ, TRITON_INTERPRET="0", PYTHONPATH=ROOT)
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    found = json.loads(result.stdout.strip().splitlines()[-1])
    assert found["clean"] == []
    expected = [["shared memory"], ["spills"], ["seed specialised"], ["too many configs"],
                ["compile error", "no config left"], ["fenced atomics", "unaligned centroids"], ["dropout cost"]]
    for got, want in zip(found["bad"], expected):
        assert set(want) <= set(got), (got, want)
