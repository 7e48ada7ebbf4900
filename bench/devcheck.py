"""The first-GPU check: what triton_ops/compile_check.py cannot see (numerics on the device, speed, the autotuner's picks),
in one script of under 5 minutes on one H100/H200.

    python bench/devcheck.py --out devcheck.jsonl              # on a GPU
    python bench/devcheck.py --small --out /tmp/dc.jsonl        # CPU: tiny shapes under TRITON_INTERPRET=1 (a test)

Writes one JSON line per measurement as it goes (a timeout still leaves everything measured so far) and a readable
line to stdout. Sections (--sections to pick):
  configs    every attention config of CONFIGS pinned one at a time (bf16, 4 x 4 x 1500 x 64, lengths
             [1500, 753, 17, 1], p = 0.1), forward + backward against an fp32 reference that uses the kernel's own
             keep mask: finite, max error / max |reference| (<= 2e-2), padded rows and their gradients exactly 0,
             padded keys without influence, keep rate (~0.9)
  fp32       fp32 attention as 3xTF32 and as plain TF32 against a float64 reference (~1e-6 and ~1e-3 relative)
  speed      8 x 12 x 1500 x 64 bf16, lengths uniform in [250, 1500]: ours, SDPA with a boolean mask (efficient
             and cuDNN backends), SDPA flash on unpadded clips; forward and forward + backward at p = 0 and 0.1;
             TFLOP/s counting unpadded work only; the autotuner's picks
  kmeans     N = 2^21 points, K = 500, D in {39, 768}: ours (3xTF32, TF32) vs chunked addmm + argmin (fp32, TF32),
             label agreement with float64, assign_and_sum vs index_add, all points in one cluster (worst atomic
             contention)
With --small every section runs on tiny shapes (fp16 for bf16, the first config of each kernel) so the code paths are
exercised on the CPU in about a minute; its timings mean nothing.
"""
import argparse
import contextlib
import json
import os
import sys
import time

ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
ap.add_argument("--small", action="store_true", help="tiny shapes under the Triton interpreter on CPU (a test)")
ap.add_argument("--out", default="devcheck.jsonl", help="JSON lines, appended as measured")
ap.add_argument("--sections", default="configs,fp32,speed,kmeans")
ap.add_argument("--budget-s", type=float, default=285.0, help="skip what is left after this many seconds")
args = ap.parse_args()
if args.small:
    os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from triton_ops import attention as attn  # noqa: E402
from triton_ops import kmeans as km  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() and not args.small else "cpu"
# Under the interpreter bf16 dots multiply raw bit patterns (Triton 3.x; tests/test_kernels.py patches around it), so
# --small runs the bf16 sections in fp16, which takes the same kernel code paths.
HALF = torch.float16 if args.small else torch.bfloat16
START = time.time()
OUT = open(args.out, "a")


def record(section, name, **values):
    row = dict(section=section, name=name, device=DEVICE, small=args.small, t=round(time.time() - START, 1), **values)
    OUT.write(json.dumps(row) + "\n")
    OUT.flush()
    shown = ", ".join(f"{k}={_short(v)}" for k, v in values.items())
    print(f"[{row['t']:6.1f} s] {section}: {name}: {shown}", flush=True)


def _short(v):
    return f"{v:.4g}" if isinstance(v, float) else v


def out_of_time():
    return time.time() - START > args.budget_s


def timed_ms(fn):
    """Median milliseconds (GPU: triton's do_bench; CPU: one run, meaningless under the interpreter)."""
    if DEVICE == "cuda":
        import triton.testing
        return triton.testing.do_bench(fn, warmup=10, rep=40)
    t = time.perf_counter()
    fn()
    return (time.perf_counter() - t) * 1e3


def gpu_name():
    return torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu (interpreter)"


# ------------------------------------------------------------------------------------------------ attention

def attention_inputs(B, H, T, D, dtype, lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    # model.py's layout: B x T x H x D projections viewed as B x H x T x D
    q, k, v = (torch.randn(B, T, H, D, generator=g).to(DEVICE, dtype).transpose(1, 2).requires_grad_()
               for _ in range(3))
    d_out = torch.randn(B, H, T, D, generator=g).to(DEVICE, dtype)
    return q, k, v, d_out, torch.tensor(lengths, device=DEVICE)


def check_configs():
    B, H, T, D = (4, 4, 1500, 64) if not args.small else (4, 1, 24, 16)
    lengths = [1500, 753, 17, 1] if not args.small else [24, 13, 5, 1]
    p, seed = 0.1, 1234
    q, k, v, d_out, lens = attention_inputs(B, H, T, D, HALF, lengths)
    mask = attn.dropout_keep_mask(seed, B, H, T, p, device=DEVICE)
    valid = torch.arange(T, device=DEVICE)[None, :] < lens[:, None]  # B x T
    pair_valid = valid[:, None, :, None] & valid[:, None, None, :]
    pairs = pair_valid.sum().item() * H
    keep_rate = (mask & pair_valid).sum().item() / pairs
    keep_tol = max(0.005, 4 * ((1 - p) * p / pairs) ** 0.5)  # 4 standard errors (0.005 at the full shape)
    q32, k32, v32 = (t.detach().float().requires_grad_() for t in (q, k, v))
    ref = attn.attention_reference(q32, k32, v32, lens, p, dropout_mask=mask)
    ref_grads = torch.autograd.grad(ref, (q32, k32, v32), d_out.float())
    scale = [ref.abs().max().item()] + [g.abs().max().item() for g in ref_grads]
    record("configs", "reference", gpu=gpu_name(), shape=[B, H, T, D], lengths=lengths, p=p,
           keep_rate=keep_rate, keep_rate_ok=abs(keep_rate - (1 - p)) < keep_tol)
    elt, dim_class = 2, attn.dim_class(D)
    for kind in attn.KINDS:
        for config in attn.CONFIGS[(kind, elt, dim_class)][:1 if args.small else None]:  # --small: the first only
            if out_of_time():
                return
            try:
                with attn.pin_config(kind, config):
                    out = attn.attention_triton(q, k, v, lens, dropout_p=p, seed=seed)
                    grads = torch.autograd.grad(out, (q, k, v), d_out)
            except Exception as e:  # a config the GPU refuses: record it and go on
                record("configs", f"{kind} {config}", ok=False, error=f"{type(e).__name__}: {str(e)[:200]}")
                continue
            errors = [((a.float() - r).abs().max().item() / max(s, 1e-30))
                      for a, r, s in zip((out, *grads), (ref, *ref_grads), scale)]
            finite = all(torch.isfinite(t).all().item() for t in (out, *grads))
            padded_zero = all((t.transpose(1, 2)[~valid] == 0).all().item() for t in (out, *grads))
            ok = finite and padded_zero and max(errors) <= 2e-2
            record("configs", f"{kind} {config}", ok=ok, finite=finite, padded_rows_zero=padded_zero,
                   rel_err_out=errors[0], rel_err_dq=errors[1], rel_err_dk=errors[2], rel_err_dv=errors[3])
    # padded keys have no influence: change them and the output of every clip stays the same
    k2, v2 = k.detach().clone(), v.detach().clone()
    for b, n in enumerate(lengths):
        k2[b, :, n:] = 30.0
        v2[b, :, n:] = -7.0
    with torch.no_grad():
        a = attn.attention_triton(q.detach(), k.detach(), v.detach(), lens, dropout_p=p, seed=seed)
        b_ = attn.attention_triton(q.detach(), k2, v2, lens, dropout_p=p, seed=seed)
    record("configs", "padded keys changed", ok=bool(torch.equal(a, b_)))


def check_fp32():
    B, H, T, D = (2, 4, 1500, 64) if not args.small else (2, 1, 20, 16)
    lengths = [T, T // 2 + 3]
    q, k, v, d_out, lens = attention_inputs(B, H, T, D, torch.float32, lengths, seed=1)
    ref = attn.attention_reference(q.detach().double(), k.detach().double(), v.detach().double(), lens)
    scale = ref.abs().max().item()
    for precision in ("tf32x3", "tf32"):
        old, attn.FP32_PRECISION = attn.FP32_PRECISION, precision
        try:
            with torch.no_grad():
                out = attn.attention_triton(q.detach(), k.detach(), v.detach(), lens)
        finally:
            attn.FP32_PRECISION = old
        err = (out.double() - ref).abs().max().item() / scale
        record("fp32", f"attention {precision}", rel_err_vs_float64=err,
               ok=err < (1e-5 if precision == "tf32x3" else 1e-2))


def check_speed():
    B, H, T, D = (8, 12, 1500, 64) if not args.small else (2, 1, 16, 16)
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(T // 6, T + 1, (B,), generator=g)
    lengths[0] = T
    q, k, v, d_out, lens = attention_inputs(B, H, T, D, HALF, lengths.tolist(), seed=2)
    full = torch.full((B,), T, device=DEVICE)
    key_mask = (torch.arange(T, device=DEVICE)[None, :] < lens[:, None])[:, None, None, :]
    work_padded = 4 * H * D * float((lengths.double() ** 2).sum())  # forward FLOPs of the unpadded work
    work_full = 4 * H * D * B * T * T
    record("speed", "shape", gpu=gpu_name(), B=B, H=H, T=T, D=D, lengths=lengths.tolist(),
           valid_fraction=lengths.sum().item() / (B * T))
    if DEVICE == "cuda":
        from torch.nn.attention import SDPBackend, sdpa_kernel
        backends = {"sdpa+mask efficient": [SDPBackend.EFFICIENT_ATTENTION],
                    "sdpa+mask cudnn": [SDPBackend.CUDNN_ATTENTION], "sdpa flash unpadded": [SDPBackend.FLASH_ATTENTION]}
    else:
        sdpa_kernel = None
        backends = {"sdpa+mask efficient": None, "sdpa+mask cudnn": None, "sdpa flash unpadded": None}
    for p in (0.0, 0.1):
        rows = [("ours padded", lambda: attn.attention_triton(q, k, v, lens, dropout_p=p), work_padded, None),
                ("ours unpadded", lambda: attn.attention_triton(q, k, v, full, dropout_p=p), work_full, None),
                ("sdpa+mask efficient", lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=key_mask,
                                                                               dropout_p=p), work_padded,
                 backends["sdpa+mask efficient"]),
                ("sdpa+mask cudnn", lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=key_mask, dropout_p=p),
                 work_padded, backends["sdpa+mask cudnn"]),
                ("sdpa flash unpadded", lambda: F.scaled_dot_product_attention(q, k, v, dropout_p=p), work_full,
                 backends["sdpa flash unpadded"])]
        for name, fn, work, backend in rows:
            if out_of_time():
                return
            ctx = sdpa_kernel(backend) if (sdpa_kernel and backend) else contextlib.nullcontext()
            try:
                with ctx:
                    def fwd():
                        with torch.no_grad():
                            fn()

                    def fwd_bwd():
                        torch.autograd.grad(fn(), (q, k, v), d_out)

                    ms_f, ms_fb = timed_ms(fwd), timed_ms(fwd_bwd)
            except Exception as e:  # e.g. a backend this GPU / torch build does not have
                record("speed", f"{name} p={p}", error=f"{type(e).__name__}: {str(e)[:200]}")
                continue
            record("speed", f"{name} p={p}", fwd_ms=ms_f, fwd_tflops=work / ms_f / 1e9, fwd_bwd_ms=ms_fb,
                   fwd_bwd_tflops=3.5 * work / ms_fb / 1e9)
    if DEVICE == "cuda":
        picks = {}
        for kernel, tuned in attn._TUNED.items():
            picks[kernel.__name__] = {str(key): str(cfg) for key, cfg in tuned.cache.items()}
        record("speed", "autotuner picks", picks=picks)


# ------------------------------------------------------------------------------------------------ k-means

def check_kmeans():
    N, K = (1 << 21, 500) if not args.small else (40, 20)
    for D in (39, 768) if not args.small else (39, 136):  # one-tile and chunked kernel variants
        if out_of_time():
            return
        g = torch.Generator().manual_seed(D)
        centers = torch.randn(K, D, generator=g) * 3
        x = (centers[torch.randint(0, K, (N,), generator=g)] + torch.randn(N, D, generator=g)).to(DEVICE)
        c = (centers + 0.3 * torch.randn(K, D, generator=g)).to(DEVICE)
        # float64 truth, in chunks
        truth = torch.cat([torch.cdist(x[a:a + 65536].double(), c.double()).argmin(1)
                           for a in range(0, N, 65536)])
        work = 2 * N * K * D
        for name, fn in [
                ("ours 3xTF32", lambda: _with(km.assign_nearest, x, c, False)),
                ("ours TF32", lambda: _with(km.assign_nearest, x, c, True)),
                ("torch addmm+argmin fp32", lambda: _torch_tf32(False, km.assign_nearest_reference, x, c)),
                ("torch addmm+argmin TF32", lambda: _torch_tf32(True, km.assign_nearest_reference, x, c))]:
            labels = fn()[0]
            ms = timed_ms(fn)
            record("kmeans", f"D={D} {name}", N=N, K=K, ms=ms, tflops=work / ms / 1e9,
                   label_agreement_float64=(labels == truth).double().mean().item())
        # the fused Lloyd pass against assign + index_add
        labels, dists, sums, counts = _with(km.assign_and_sum, x, c, False)
        ref_sums, ref_counts = km.cluster_sums_reference(x, labels, K)
        record("kmeans", f"D={D} assign_and_sum", ms=timed_ms(lambda: _with(km.assign_and_sum, x, c, False)),
               ms_assign_then_index_add=timed_ms(lambda: km.cluster_sums_reference(
                   x, _with(km.assign_nearest, x, c, False)[0], K)),
               counts_equal=bool(torch.equal(counts, ref_counts)),
               sums_rel_err=((sums - ref_sums).abs().max() / ref_sums.abs().max()).item())
        # worst contention: every point in one cluster, so every atomic of the pass hits the same K = 0 row
        one = c[:1] + 0.01 * torch.randn(N, D, generator=g).to(DEVICE)
        labels, _, sums, counts = _with(km.assign_and_sum, one, c, False)
        record("kmeans", f"D={D} all points in one cluster", ms=timed_ms(lambda: _with(km.assign_and_sum, one, c, False)),
               counts_ok=counts[labels[0]].item() == N,
               sums_rel_err=((sums[labels[0]] - one.double().sum(0)).abs().max() / one.double().sum(0).abs().max()).item())


def _with(fn, x, c, tf32):
    with km.use_backend("triton"):
        return fn(x, c, allow_tf32=tf32)


def _torch_tf32(on, fn, *a):
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = on
    try:
        return fn(*a)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old


def main():
    if DEVICE == "cpu" and not args.small:
        raise SystemExit("no GPU here: run with --small to exercise the code paths under the interpreter")
    record("start", "device", gpu=gpu_name(), torch=torch.__version__,
           triton=__import__("triton").__version__, sections=args.sections)
    sections = {"configs": check_configs, "fp32": check_fp32, "speed": check_speed, "kmeans": check_kmeans}
    for name in args.sections.split(","):
        if out_of_time():
            record(name, "skipped", reason=f"past --budget-s {args.budget_s}")
            continue
        t = time.time()
        try:
            sections[name]()
        except Exception as e:  # keep going: the other sections still measure
            record(name, "failed", error=f"{type(e).__name__}: {str(e)[:300]}")
        record(name, "done", seconds=round(time.time() - t, 1))
    record("end", "total", seconds=round(time.time() - START, 1))


if __name__ == "__main__":
    main()
