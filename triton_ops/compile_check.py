"""Compile the project's Triton kernels for a named NVIDIA GPU on any machine, no GPU needed, and check what each
launch would ask of that GPU.

    python -m triton_ops.compile_check                     # representative subset, sm_80 (A100) and sm_90 (H100/H200)
    python -m triton_ops.compile_check --full --json out.jsonl

How: the launchers in triton_ops/attention.py and triton_ops/kmeans.py are called on small CPU tensors with Triton's
launch machinery intercepted, so every launch is recorded with the exact arguments, specialisations (pointer and
stride divisibility, constants) and the configs its autotuner would try after pruning for the target; each of those
is compiled with `triton.compile(ASTSource(...), target=GPUTarget("cuda", arch, 32))`. From each compile:
`metadata.shared` (the shared memory the launch will request), and from the `ptxas -v` log of the ptxas in Triton's
wheel, registers per thread and spill bytes; from the SASS (cuobjdump, also in the wheel) the instruction count;
from the PTX the atomics' memory semantics and from the SASS the fences around them. Results are cached per compile key (kernel source hash, specialisation,
options, target, Triton version) under $MUSICSSL_COMPILE_CACHE (default ~/.cache/musicssl/compile_check), so a
re-run only compiles what changed.

What it cannot tell: speed, whether the autotuner picks well, numerical results on the device, or behaviour on
GPUs other than the named targets (see README, Kernels). Must run with TRITON_INTERPRET unset or 0.
"""
import argparse
import contextlib
import dataclasses
import hashlib
import io
import json
import os
import re
import subprocess
import sys
import tempfile
import time
import warnings

import torch

if os.environ.get("TRITON_INTERPRET", "0") == "1":
    raise SystemExit("triton_ops.compile_check compiles real kernels: run it with TRITON_INTERPRET unset or 0")

import triton  # noqa: E402

import triton_ops  # noqa: E402

try:  # compiler internals (Triton 3.4+): how a launch is specialised and compiled
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.autotuner import Autotuner
    from triton.runtime.jit import JITFunction, create_function_from_signature
except ImportError as e:
    print(f"triton_ops.compile_check needs Triton >= 3.4's compiler internals, this is Triton {triton.__version__}: {e}",
          file=sys.stderr)
    sys.exit(3)

# Named targets: compute capability -> (GPU, max dynamic shared memory per block in bytes, opt-in;
# CUDA C Programming Guide, "Technical Specifications per Compute Capability": 163 KB on 8.0, 227 KB on 9.0).
TARGETS = {80: ("A100", 166_912), 90: ("H100/H200", 232_448)}

# Bound on spilled bytes per thread (ptxas "spill stores") for any config an autotuner may pick. Spills go to local
# memory, cached in L1; a few stores of loop-invariant values outside the hot loop cost nothing measurable, while
# hundreds of bytes per thread inside the key loop turn every iteration into L1/L2 traffic (the 504-byte and 8 KB
# cases this check was written for). 64 bytes = 16 registers' worth: above what a scheduling hiccup produces, far
# below a tile that does not fit the register file.
MAX_SPILL_BYTES = 64

# The per-key autotuner budget: each candidate is compiled and timed on the first step of every new shape.
MAX_CONFIGS_PER_LAUNCH = 6

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def cache_dir():
    return os.environ.get("MUSICSSL_COMPILE_CACHE",
                          os.path.join(os.path.expanduser("~"), ".cache", "musicssl", "compile_check"))


def triton_tool(name):
    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)


# ------------------------------------------------------------------------------------------------ recording launches

@dataclasses.dataclass
class Launch:
    case: str  # e.g. "attention fwd bf16 d64 dropout"
    kernel: str  # the Triton function's name
    fn: object  # the JITFunction
    args: tuple
    kwargs: dict  # constexprs and scalars passed by name
    configs: list  # [(config kwargs, num_warps, num_stages)]: what the autotuner would try, or the fixed launch
    meta: dict = dataclasses.field(default_factory=dict)  # what the launch is for (kind, dtype, head dim, ...)


@contextlib.contextmanager
def recording(into):
    """Within the block, autotuned and plain Triton launches are recorded into `into` instead of running."""
    original_tuned, original_plain = Autotuner.run, JITFunction.run

    def tuned(self, *args, **kwargs):
        kwargs.pop("grid", None)
        kwargs.pop("warmup", None)
        self.nargs = dict(zip(self.arg_names, args))
        try:
            configs = [(dict(c.kwargs), c.num_warps, c.num_stages) for c in self.prune_configs(kwargs)]
        except Exception as e:  # triton raises when early_config_prune leaves nothing
            configs = []
            kwargs["_prune_error"] = f"{type(e).__name__}: {e}"
        self.nargs = None
        into.append((self.fn, args, kwargs, configs))

    def plain(self, *args, grid, warmup, **kwargs):
        warps, stages = kwargs.pop("num_warps", 4), kwargs.pop("num_stages", 3)
        names = [p.name for p in self.params if p.is_constexpr]
        meta = {k: kwargs.pop(k) for k in list(kwargs) if k in names and k.startswith("BLOCK")}
        into.append((self, args, kwargs, [(meta, warps, stages)]))

    Autotuner.run, JITFunction.run = tuned, plain
    try:
        yield
    finally:
        Autotuner.run, JITFunction.run = original_tuned, original_plain


def _plan_for(arch):
    """Tell the kernel modules which GPU to plan configs for (they read the current device otherwise)."""
    triton_ops.GPU_TARGET = (arch, TARGETS[arch][1])


def attention_launches(arch, dtypes, head_dims, dropouts, T=1500):
    """Forward and both backward launches, in model.py's layout (B x T x H x D projections viewed as B x H x T x D)."""
    import triton_ops.attention as attn
    _plan_for(arch)
    out = []
    for dname in dtypes:
        for D in head_dims:
            for p in dropouts:
                B, H = 2, 2
                q, k, v, do = (torch.randn(B, T, H, D).to(DTYPES[dname]).transpose(1, 2) for _ in range(4))
                lengths = torch.tensor([T, T // 2], dtype=torch.int32)
                rec = []
                with recording(rec):
                    o, lse = attn._attention_forward(q, k, v, lengths, p, 12345)
                    o, lse = torch.zeros_like(q), torch.zeros(B, H, T)
                    attn._attention_backward(q, k, v, o, lse, do, lengths, p, 12345)
                tag = f"{dname} d{D}" + (" dropout" if p else "")
                for (fn, args, kwargs, configs), (part, kind) in zip(rec, (("fwd", "fwd"), ("bwd dkdv", "dkdv"),
                                                                            ("bwd dq", "dq"))):
                    meta = dict(module="attention", kind=kind, dtype=dname, head_dim=D, dropout=bool(p))
                    out.append(Launch(f"attention {part} {tag}", fn.__name__, fn, args, kwargs, configs, meta))
    return out


def dropout_mask_launches(arch):
    import triton_ops.attention as attn
    _plan_for(arch)
    rec = []
    with recording(rec):
        attn.dropout_keep_mask(12345, 2, 2, 1500, 0.1)
    return [Launch("attention dropout_keep_mask", fn.__name__, fn, args, kwargs, configs)
            for fn, args, kwargs, configs in rec]


def kmeans_launches(arch, variants, dims, K=500, N=4099):
    """variants: "fp32" (3xTF32), "tf32" (fp32 with allow_tf32), "bf16", "fp16"; each as assign, fused assign+sum
    and (fp32/bf16) the separate cluster_sums."""
    import triton_ops.kmeans as km
    _plan_for(arch)
    km._use_triton = lambda *a, **k: True  # the launchers refuse CPU tensors outside the interpreter; here nothing runs
    out = []
    for variant in variants:
        dtype = torch.float32 if variant in ("fp32", "tf32") else DTYPES[variant]
        for D in dims:
            x = torch.randn(N, D).to(dtype)
            c = torch.randn(K, D)
            for fused in (False, True):
                rec = []
                with recording(rec), km.use_backend("triton"):
                    (km.assign_and_sum if fused else km.assign_nearest)(x, c, allow_tf32=variant == "tf32")
                for fn, args, kwargs, configs in rec:
                    part = "assign+sum" if fused else "assign"
                    meta = dict(module="kmeans", kind="assign", variant=variant, D=D, accumulate=fused)
                    out.append(Launch(f"kmeans {part} {variant} D{D}", fn.__name__, fn, args, kwargs, configs, meta))
            if variant in ("fp32", "bf16"):
                rec = []
                with recording(rec), km.use_backend("triton"):
                    km.cluster_sums(x, torch.randint(0, K, (N,)), K)
                for fn, args, kwargs, configs in rec:
                    meta = dict(module="kmeans", kind="cluster_sums", variant=variant, D=D)
                    out.append(Launch(f"kmeans cluster_sums {variant} D{D}", fn.__name__, fn, args, kwargs, configs,
                                      meta))
    return out


# The default run compiles a representative subset (the full sweep is --full): the settings the project trains with
# (bf16, head dim 64, dropout 0.1), the hardest case the code accepts (fp32, head dim 128, dropout: largest tiles,
# 3xTF32), the no-dropout forward (the dropout's cost is measured against it), and the k-means kernels at MFCC and
# hidden-feature widths with atomics. Every kernel and both one-tile and chunked k-means variants are covered.
def subset_launches(arch):
    def first_config(launches):  # enough to cover a code path (and the dropout-cost comparison)
        for launch in launches:
            launch.configs = launch.configs[:1]
        return launches

    return (attention_launches(arch, ["bf16"], [64], [0.1]) + attention_launches(arch, ["fp32"], [128], [0.1])
            + first_config([l for l in attention_launches(arch, ["bf16"], [64], [0.0]) if " fwd " in l.case])
            + dropout_mask_launches(arch)
            + [l for l in kmeans_launches(arch, ["fp32"], [39, 768]) if "assign+sum" in l.case
               or l.case == "kmeans cluster_sums fp32 D39"]
            + first_config([l for l in kmeans_launches(arch, ["bf16"], [768]) if l.case == "kmeans assign bf16 D768"]))


def full_launches(arch):
    return (attention_launches(arch, ["fp16", "bf16", "fp32"], [16, 32, 64, 128], [0.0, 0.1])
            + dropout_mask_launches(arch) + kmeans_launches(arch, ["fp32", "tf32", "bf16", "fp16"], [39, 768]))


def all_launches(arch, full):
    return full_launches(arch) if full else subset_launches(arch)


# ------------------------------------------------------------------------------------------------ compiling

_PTXAS_SPILL = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_PTXAS_REGS = re.compile(r"Used (\d+) registers")


def _specialise(fn, args, kwargs, meta, warps, stages, arch):
    """What JITFunction.run would hand triton.compile for this launch on `arch`."""
    target = GPUTarget("cuda", arch, 32)
    backend = make_backend(target)
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    call = {k: v for k, v in kwargs.items() if not k.startswith("_")}
    call.update(meta, num_warps=warps, num_stages=stages)
    bound, specialization, options = binder(*args, **call)
    options, signature, constexprs, attrs = fn._pack_args(backend, call, bound, specialization, options)
    return target, backend, ASTSource(fn, signature, constexprs, attrs), options, attrs


def _ptx_atomics(ptx):
    """The distinct atomic instructions of the PTX, e.g. ["atom.global.gpu.acq_rel.add.f32"]."""
    found = set()
    for line in ptx.splitlines():
        m = re.match(r"\s*(@!?%p\d+\s+)?((atom|red)\.[\w.]+)", line)
        if m:
            found.add(m.group(2))
    return sorted(found)


def _sass_facts(cubin):
    """(instruction count, {opcode: count} for the opcodes the checks look at) of the compiled SASS."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        sass = subprocess.run([triton_tool("cuobjdump"), "-sass", f.name], capture_output=True, text=True).stdout
    count, ops = 0, {}
    for line in sass.splitlines():
        m = re.match(r"\s+/\*[0-9a-f]{4,}\*/\s+(@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*)", line)
        if m:
            count += 1
            if m.group(2) in ("MEMBAR", "CCTL", "ERRBAR", "ATOMG", "RED", "REDG", "ATOM"):
                ops[m.group(2)] = ops.get(m.group(2), 0) + 1
    return count, ops


def compile_one(launch, meta, warps, stages, arch):
    """-> dict of facts about one compiled config (cached)."""
    target, backend, src, options, attrs = _specialise(launch.fn, launch.args, launch.kwargs, meta, warps, stages,
                                                       arch)
    key_text = json.dumps([src.hash(), backend.hash(), sorted((k, str(v)) for k, v in options.__dict__.items()),
                           triton.__version__], sort_keys=True)
    key = hashlib.sha256(key_text.encode()).hexdigest()[:32]
    path = os.path.join(cache_dir(), f"{key}.json")
    if os.path.exists(path):
        with open(path) as f:
            return json.load(f)
    knobs.nvidia.dump_ptxas_log = True
    knobs.compilation.always_compile = True  # Triton's own cache would skip ptxas and so its -v log
    log = io.StringIO()
    t = time.time()
    try:
        with contextlib.redirect_stdout(log), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            compiled = triton.compile(src, target=target, options=options.__dict__)
    except Exception as e:  # e.g. OutOfResources raised at compile time, or a ptxas failure: report, don't stop
        facts = dict(error=f"{type(e).__name__}: {str(e)[:300]}")
    else:
        text = log.getvalue()
        spill, regs = _PTXAS_SPILL.search(text), _PTXAS_REGS.search(text)
        instructions, ops = _sass_facts(compiled.asm["cubin"])
        facts = dict(shared=int(compiled.metadata.shared), registers=int(regs.group(1)) if regs else None,
                     stack=int(spill.group(1)) if spill else None, spill_stores=int(spill.group(2)) if spill else None,
                     spill_loads=int(spill.group(3)) if spill else None, atomics=_ptx_atomics(compiled.asm["ptx"]),
                     sass_instructions=instructions, sass_ops=ops)
    facts["compile_s"] = round(time.time() - t, 2)
    facts["specialised"] = {launch.fn.arg_names[i[0]]: v for i, v in attrs.items()}
    if "error" not in facts:  # an error may be the machine's (a killed ptxas): compile again next time
        os.makedirs(cache_dir(), exist_ok=True)
        tmp = f"{path}.{os.getpid()}.tmp"
        with open(tmp, "w") as f:
            json.dump(facts, f)
        os.replace(tmp, path)
    return facts


_LAUNCHES = {}


def _compile_job(job):
    launch_index, arch, full, meta, warps, stages = job
    if (arch, full) not in _LAUNCHES:  # once per worker process
        _LAUNCHES[(arch, full)] = all_launches(arch, full)
    return compile_one(_LAUNCHES[(arch, full)][launch_index], meta, warps, stages, arch)


def run(archs, full=False, workers=1, on_row=None):
    """-> list of result rows, one per (arch, launch, config) plus one per launch with no config."""
    rows, jobs = [], []
    for arch in archs:
        for i, launch in enumerate(all_launches(arch, full)):
            base = dict(arch=arch, gpu=TARGETS[arch][0], max_shared=TARGETS[arch][1], case=launch.case,
                        kernel=launch.kernel, num_configs=len(launch.configs), meta=launch.meta,
                        prune_error=launch.kwargs.get("_prune_error"),
                        do_not_specialize=[p.name for p in launch.fn.params if p.do_not_specialize])
            if not launch.configs:
                rows.append(dict(base, config=None))
                continue
            for meta, warps, stages in launch.configs:
                rows.append(dict(base, config=dict(meta, num_warps=warps, num_stages=stages)))
                jobs.append((len(rows) - 1, (i, arch, full, meta, warps, stages), launch))
    if workers > 1:
        import concurrent.futures
        import multiprocessing
        with concurrent.futures.ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as ex:
            futures = {ex.submit(_compile_job, job): r for r, job, _ in jobs}
            for fut in concurrent.futures.as_completed(futures):
                rows[futures[fut]].update(fut.result())
                if on_row:
                    on_row(rows[futures[fut]])
    else:
        for r, (_, arch, _, meta, warps, stages), launch in jobs:
            rows[r].update(compile_one(launch, meta, warps, stages, arch))
            if on_row:
                on_row(rows[r])
    return rows


# ------------------------------------------------------------------------------------------------ checks

CHECKS = {
    "shared memory": "a config the autotuner may pick asks for more shared memory than the target has",
    "no config left": "a dtype x head dim (x k-means variant) x target combination has no config that fits",
    "spills": f"a config spills more than {MAX_SPILL_BYTES} bytes per thread",
    "compile error": "a config does not compile for the target",
    "too many configs": f"more than {MAX_CONFIGS_PER_LAUNCH} autotune candidates for one launch",
    "fenced atomics": "atomics with acquire/release semantics (a GPU-wide fence and an L1 invalidate each)",
    "seed specialised": "the dropout seed is specialised on, so 1 step in 16 recompiles",
    "shared memory estimate": "a kernel module's static shared-memory estimate is below the compiler's figure",
    "unaligned centroids": "k-means centroid rows are not 16-element aligned",
    "dropout cost": "the forward with dropout compiles to over 2.2x the SASS instructions of the forward without",
}
# Dropout costs one 10-round Philox call per 8 scores: the bf16 head-dim-64 forward compiles to 1.7-2.1x the SASS
# instructions of the forward without dropout on sm_80/sm_90 (it was 2.8-4.0x with one call per score, of which it
# used a quarter). 2.2x leaves room for compiler changes, not for a return to one call per score.
MAX_DROPOUT_INSTRUCTION_RATIO = 2.2


def failures(rows):
    """{check name: [failure lines]} for the checks that failed (see CHECKS)."""
    out = {name: [] for name in CHECKS}
    for r in rows:
        where = f"sm_{r['arch']} {r['case']}"
        if r["config"] is None:
            out["no config left"].append(f"{where}: {r['prune_error'] or 'no config'}")
            continue
        cfg = " ".join(f"{k}={v}" for k, v in r["config"].items())
        if r["num_configs"] > MAX_CONFIGS_PER_LAUNCH:
            out["too many configs"].append(f"{where}: {r['num_configs']} configs")
        if r["meta"].get("module") == "attention" and "seed" not in r["do_not_specialize"]:
            out["seed specialised"].append(f"{where}: `seed` is specialised on")
        if r["kernel"] == "_dropout_mask_kernel" and "seed" not in r["do_not_specialize"]:
            out["seed specialised"].append(f"{where}: `seed` is specialised on")
        if "error" in r:
            out["compile error"].append(f"{where} [{cfg}]: {r['error']}")
            continue
        if r["shared"] > r["max_shared"]:
            out["shared memory"].append(f"{where} [{cfg}]: {r['shared']} B > {r['max_shared']} B")
        if (r["spill_stores"] or 0) > MAX_SPILL_BYTES:
            out["spills"].append(f"{where} [{cfg}]: {r['spill_stores']} B/thread spill stores, "
                                 f"{r['registers']} registers")
        # acq_rel atomics compile to a MEMBAR (+ L1 invalidate) per atomic; relaxed ones to plain RED. A few MEMBARs
        # elsewhere (sm_90's async-proxy fences around wgmma) are not the atomics' doing.
        fences = r["sass_ops"].get("MEMBAR", 0)
        n_atomic = sum(r["sass_ops"].get(op, 0) for op in ("ATOMG", "ATOM", "RED", "REDG"))
        if r["atomics"] and (fences >= n_atomic or any(".acq_rel." in a or ".release." in a or ".acquire." in a
                                                       for a in r["atomics"])):
            out["fenced atomics"].append(f"{where} [{cfg}]: {r['atomics']}, {fences} MEMBAR for {n_atomic} atomics "
                                         "in SASS")
        if r["meta"].get("kind") == "assign":
            spec = r["specialised"].get("stride_ck")
            if spec is None or ["tt.divisibility", 16] not in spec:
                out["unaligned centroids"].append(f"{where} [{cfg}]: centroid row stride not divisible by 16")
        estimate = _estimate(r)
        if estimate is not None and estimate < r["shared"]:
            out["shared memory estimate"].append(f"{where} [{cfg}]: estimate {estimate} B < compiled {r['shared']} B")
    # a launch whose every config fails to fit or compile has nothing left for the autotuner
    by_launch = {}
    for r in rows:
        if r["config"] is not None:
            by_launch.setdefault((r["arch"], r["case"]), []).append(r)
    for (arch, case), rs in by_launch.items():
        if not any("error" not in r and r["shared"] <= r["max_shared"] for r in rs):
            out["no config left"].append(f"sm_{arch} {case}: all {len(rs)} configs exceed shared memory or fail")
    out["no config left"] += _static_configs_left(sorted({r["arch"] for r in rows}))
    # dropout's instruction cost: the same forward config with and without dropout
    plain = {(r["arch"], r["meta"].get("dtype"), r["meta"].get("head_dim"), _cfg(r["config"])): r for r in rows
             if r["meta"].get("kind") == "fwd" and not r["meta"].get("dropout") and "sass_instructions" in r}
    for r in rows:
        if r["meta"].get("kind") == "fwd" and r["meta"].get("dropout") and "sass_instructions" in r:
            base = plain.get((r["arch"], r["meta"]["dtype"], r["meta"]["head_dim"], _cfg(r["config"])))
            if base and r["sass_instructions"] > MAX_DROPOUT_INSTRUCTION_RATIO * base["sass_instructions"]:
                out["dropout cost"].append(
                    f"sm_{r['arch']} {r['case']} [{_cfg(r['config'])}]: {r['sass_instructions']} SASS instructions, "
                    f"{r['sass_instructions'] / base['sass_instructions']:.2f}x the {base['sass_instructions']} "
                    "without dropout")
    for name in ("too many configs", "seed specialised"):
        out[name] = sorted(set(out[name]))
    return {k: v for k, v in out.items() if v}


def _estimate(row):
    """The kernel module's own shared-memory estimate for a compiled row, or None where it has none."""
    meta, cfg = row["meta"], row["config"]
    if meta.get("module") == "attention":
        import triton_ops.attention as attn
        if not hasattr(attn, "shared_memory_estimate"):
            return None
        elt = DTYPES[meta["dtype"]].itemsize
        return attn.shared_memory_estimate(meta["kind"], (cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["num_warps"],
                                                          cfg["num_stages"]), elt, meta["head_dim"], meta["dropout"],
                                           row["arch"])
    if meta.get("module") == "kmeans" and meta.get("kind") == "assign":
        import triton_ops.kmeans as km
        if not hasattr(km, "shared_memory_estimate"):
            return None
        return km.shared_memory_estimate((cfg["BLOCK_N"], cfg["BLOCK_K"], cfg["num_warps"], cfg["num_stages"]),
                                         meta["variant"], meta["D"], row["arch"])
    return None


def _static_configs_left(archs):
    """Every input the kernels accept, on every target: the configs the modules would offer the autotuner."""
    import triton_ops.attention as attn
    import triton_ops.kmeans as km
    lines = []
    for arch in archs:
        if hasattr(attn, "kernel_configs"):
            _plan_for(arch)
            for dname, dtype in DTYPES.items():
                for D in attn.SUPPORTED_HEAD_DIMS:
                    for dropout in (False, True):
                        for kind in attn.KINDS:
                            if not attn.kernel_configs(kind, torch.device("cuda"), dtype, D, dropout):
                                lines.append(f"sm_{arch} attention {kind} {dname} d{D}"
                                             + (" dropout" if dropout else "") + ": no config fits")
        if hasattr(km, "kernel_configs"):
            _plan_for(arch)
            for variant in ("fp32", "tf32", "bf16", "fp16"):
                for D in (13, 39, 60, 128, 129, 768, 1024):
                    if not km.kernel_configs(torch.device("cuda"), variant, D):
                        lines.append(f"sm_{arch} kmeans assign {variant} D{D}: no config fits")
    return lines


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--arch", type=int, nargs="+", default=sorted(TARGETS), choices=sorted(TARGETS))
    ap.add_argument("--full", action="store_true", help="every dtype, head dim and k-means variant (slow)")
    ap.add_argument("--workers", type=int, default=1, help="compile processes")
    ap.add_argument("--json", help="write one JSON line per compiled config here")
    ap.add_argument("--failures-json", help="write {check: [failures]} here")
    ap.add_argument("--quiet", action="store_true")
    args = ap.parse_args(argv)
    t = time.time()
    progress = (lambda r: None) if args.quiet else (
        lambda r: print(f"sm_{r['arch']} {r['case']:<36} {_cfg(r['config']):<28} " + _facts(r), flush=True))
    rows = run(args.arch, args.full, args.workers, progress)
    if args.json:
        with open(args.json, "w") as f:
            for r in rows:
                f.write(json.dumps(r) + "\n")
    failed = failures(rows)
    if args.failures_json:
        with open(args.failures_json, "w") as f:
            json.dump(failed, f, indent=1)
    compiled = sum(1 for r in rows if r["config"] is not None)
    print(f"{compiled} configs of {len({(r['arch'], r['case']) for r in rows})} launches for "
          f"{', '.join(f'sm_{a}' for a in args.arch)} in {time.time() - t:.0f} s")
    for name, lines in failed.items():
        print(f"FAILED {name} ({CHECKS[name]}): {len(lines)}")
        for line in lines:
            print(f"  {line}")
    if not failed:
        print("all checks passed: " + "; ".join(CHECKS))
    return 1 if failed else 0


def _cfg(cfg):
    if cfg is None:
        return "(none)"
    return ",".join(str(v) for v in cfg.values())


def _facts(r):
    if r["config"] is None:
        return "NO CONFIG"
    if "error" in r:
        return "ERROR " + r["error"][:80]
    return (f"shared {r['shared']:>6} regs {r['registers']} spill {r['spill_stores']} sass {r['sass_instructions']}"
            + (f" atomics {','.join(r['atomics'])} membar {r['sass_ops'].get('MEMBAR', 0)}" if r["atomics"] else ""))


if __name__ == "__main__":
    sys.exit(main())
