"""Tests for triton_ops/: the Triton attention and k-means kernels against their plain-torch references.

Without a GPU, conftest.py sets TRITON_INTERPRET=1 and the real kernel code runs on CPU tensors under Triton's
interpreter (tiles of 16, so the small odd shapes here span several blocks). With a GPU the same tests run natively.
Tolerances are stated per dtype against an fp32 reference computed from the same (rounded) inputs.
"""
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import triton_ops
import triton_ops.attention as attn
import triton_ops.kmeans as km

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.skipif(not attn.HAS_TRITON, reason="triton is not installed")

BF16_OK = True
if attn.HAS_TRITON and os.environ.get("TRITON_INTERPRET") == "1":
    # Triton 3.x's interpreter stores bf16 as uint16 and its tl.dot multiplies those raw integers. Widen bf16 dot
    # operands to fp32 first (exact; the GPU's bf16 MMA also forms exact products in fp32) so the kernels' own
    # bf16 code paths can be checked on CPU. If a Triton version lacks these internals, bf16 tests are skipped.
    import triton.language as tl
    from triton.runtime import interpreter as _interp

    BF16_OK = hasattr(_interp, "_convert_float") and hasattr(_interp.InterpreterBuilder, "create_dot")
    _create_dot = getattr(_interp.InterpreterBuilder, "create_dot", None)

    def _create_dot_bf16_as_fp32(self, a, b, d, input_precision, max_num_imprecise_acc):
        def widen(h):
            if h.dtype.scalar != tl.bfloat16:
                return h
            return _interp.TensorHandle(
                _interp._convert_float(h.data, tl.bfloat16, tl.float32, None).view(np.float32), tl.float32)
        return _create_dot(self, widen(a), widen(b), d, input_precision, max_num_imprecise_acc)

    if BF16_OK:
        _interp.InterpreterBuilder.create_dot = _create_dot_bf16_as_fp32

# max abs error allowed against the fp32 reference, for outputs of magnitude ~1 (outputs are stored in the dtype)
ATOL = {torch.float32: 2e-5, torch.float16: 3e-3, torch.bfloat16: 3e-2}
BF16 = pytest.param(torch.bfloat16, marks=pytest.mark.skipif(not BF16_OK, reason="interpreter cannot run bf16 dots"))
DTYPES = [torch.float32, torch.float16, BF16]


def qkv(B, H, T, D, dtype, seed=0, transposed=False):
    g = torch.Generator().manual_seed(seed)
    if transposed:  # as model.py makes them: B x T x H x D projections viewed as B x H x T x D (non-contiguous)
        return [torch.randn(B, T, H, D, generator=g).to(DEVICE, dtype).transpose(1, 2).requires_grad_()
                for _ in range(3)]
    return [torch.randn(B, H, T, D, generator=g).to(DEVICE, dtype).requires_grad_() for _ in range(3)]


def run_both(q, k, v, lengths, dropout_p=0.0, seed=0):
    """Kernel output and grads, and the fp32 reference's on the same inputs and the same output gradient."""
    lengths = None if lengths is None else torch.tensor(lengths, device=DEVICE)
    out = attn.attention_triton(q, k, v, lengths, dropout_p=dropout_p, seed=seed)
    d_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(DEVICE, out.dtype)
    grads = torch.autograd.grad(out, (q, k, v), d_out)
    q32, k32, v32 = (t.detach().float().requires_grad_() for t in (q, k, v))
    mask = None
    if dropout_p > 0:
        B, H, T, _ = q.shape
        mask = attn.dropout_keep_mask(seed, B, H, T, dropout_p, device=DEVICE)
    ref = attn.attention_reference(q32, k32, v32, lengths, dropout_p, dropout_mask=mask)
    ref_grads = torch.autograd.grad(ref, (q32, k32, v32), d_out.float())
    return out, grads, ref, ref_grads


def assert_close(out, grads, ref, ref_grads, atol):
    assert out.dtype == grads[0].dtype
    torch.testing.assert_close(out.float(), ref, atol=atol, rtol=0)
    for name, g, r in zip("qkv", grads, ref_grads):
        torch.testing.assert_close(g.float(), r, atol=2 * atol, rtol=0, msg=lambda m: f"grad {name}: {m}")


# ------------------------------------------------------------------------------------------------ attention

# (B, H, T, D, lengths): lengths not multiples of the block (16 under the interpreter), a clip of length 1, a fully
# padded tail (several key blocks skipped), one clip filling its blocks exactly next to one that does not, no padding,
# head dims 16/32/64/128.
ATTENTION_CASES = [
    ((3, 2, 37, 32), [37, 1, 20]),
    ((2, 2, 48, 64), [48, 5]),
    ((2, 1, 32, 16), [32, 16]),
    ((2, 2, 23, 32), None),
    ((1, 1, 1, 32), [1]),
    ((1, 2, 19, 128), [13]),
    ((2, 1, 20, 16), [0, 20]),  # an empty clip: all-zero output and gradients, no NaN
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape,lengths", ATTENTION_CASES)
def test_attention_forward_and_grads_match_reference(shape, lengths, dtype):
    q, k, v = qkv(*shape, dtype)
    out, grads, ref, ref_grads = run_both(q, k, v, lengths)
    assert_close(out, grads, ref, ref_grads, ATOL[dtype])


def test_attention_padding_gets_no_weight_and_no_gradient():
    B, H, T, D = 2, 2, 40, 32
    lengths = [40, 13]
    q, k, v = qkv(B, H, T, D, torch.float32, seed=3)
    out = attn.attention_triton(q, k, v, torch.tensor(lengths, device=DEVICE))
    assert out[1, :, 13:].abs().max().item() == 0.0  # query rows past the clip are exactly zero
    # changing padded keys/values of clip 1 changes nothing
    k2, v2 = k.detach().clone(), v.detach().clone()
    k2[1, :, 13:] = 100.0
    v2[1, :, 13:] = -7.0
    out2 = attn.attention_triton(q.detach(), k2, v2, torch.tensor(lengths, device=DEVICE))
    torch.testing.assert_close(out2, out.detach(), atol=0, rtol=0)
    # the output clip 1 gets equals attention over the clip alone
    alone = attn.attention_triton(q[1:, :, :13].detach(), k[1:, :, :13].detach(), v[1:, :, :13].detach())
    torch.testing.assert_close(out[1:, :, :13].detach(), alone, atol=1e-5, rtol=0)
    grads = torch.autograd.grad(out.square().sum(), (q, k, v))
    for g in grads:
        assert g[1, :, 13:].abs().max().item() == 0.0
        assert g[1, :, :13].abs().max().item() > 0.0


def test_attention_reference_matches_per_clip_attention():
    # The reference itself, against SDPA run on each clip cut to its length (an independent statement of the
    # semantics the kernel is held to).
    q, k, v = (t.detach() for t in qkv(3, 2, 21, 16, torch.float32, seed=4))
    lengths = torch.tensor([21, 1, 9])
    ref = attn.attention_reference(q, k, v, lengths)
    for b, n in enumerate(lengths.tolist()):
        alone = torch.nn.functional.scaled_dot_product_attention(q[b:b + 1, :, :n], k[b:b + 1, :, :n],
                                                                 v[b:b + 1, :, :n])
        torch.testing.assert_close(ref[b:b + 1, :, :n], alone, atol=1e-6, rtol=0)
        if n < 21:
            assert ref[b, :, n:].abs().max().item() == 0.0


def test_attention_non_contiguous_inputs_as_model_makes_them():
    q, k, v = qkv(2, 2, 29, 32, torch.float32, seed=5, transposed=True)
    assert not q.is_contiguous()
    out, grads, ref, ref_grads = run_both(q, k, v, [29, 11])
    assert_close(out, grads, ref, ref_grads, ATOL[torch.float32])


@pytest.mark.parametrize("dtype", [torch.float32, BF16], ids=str)
def test_attention_dropout_matches_reference_with_the_kernels_mask(dtype):
    q, k, v = qkv(2, 2, 40, 32, dtype, seed=6)
    out, grads, ref, ref_grads = run_both(q, k, v, [40, 17], dropout_p=0.3, seed=1234)
    assert_close(out, grads, ref, ref_grads, ATOL[dtype])
    # and the dropout is really on: it differs from the undropped attention
    plain = attn.attention_triton(q.detach(), k.detach(), v.detach(), torch.tensor([40, 17], device=DEVICE))
    assert (out.detach().float() - plain.float()).abs().max().item() > 0.1


def test_dropout_mask_is_seeded_and_has_the_right_rate():
    m1 = attn.dropout_keep_mask(7, 2, 3, 48, 0.1, device=DEVICE)
    m2 = attn.dropout_keep_mask(7, 2, 3, 48, 0.1, device=DEVICE)
    m3 = attn.dropout_keep_mask(8, 2, 3, 48, 0.1, device=DEVICE)
    assert torch.equal(m1, m2) and not torch.equal(m1, m3)
    # 13,824 Bernoulli(0.9) draws: std of the mean is 0.0026
    assert abs(m1.float().mean().item() - 0.9) < 0.012
    # heads and clips get different bits, not one pattern repeated
    assert not torch.equal(m1[0, 0], m1[0, 1]) and not torch.equal(m1[0, 0], m1[1, 0])
    # same seed, same output; torch's generator draws the seed when none is given
    q, k, v = (t.detach() for t in qkv(1, 1, 20, 16, torch.float32, seed=7))
    a = attn.attention_triton(q, k, v, dropout_p=0.5, seed=3)
    assert torch.equal(a, attn.attention_triton(q, k, v, dropout_p=0.5, seed=3))
    torch.manual_seed(0)
    b = attn.attention_triton(q, k, v, dropout_p=0.5)
    torch.manual_seed(0)
    assert torch.equal(b, attn.attention_triton(q, k, v, dropout_p=0.5))


def test_dropout_bits_do_not_depend_on_the_tile_and_every_slice_is_uniform():
    # One Philox call covers 8 keys with 16-bit slices; the counter is (query, key // 8, batch*head), so any tile
    # shape (the autotuner's, dropout_keep_mask's) sees the same bits.
    m16 = attn.dropout_keep_mask(11, 2, 2, 64, 0.25, device=DEVICE, block=16)
    assert torch.equal(m16, attn.dropout_keep_mask(11, 2, 2, 64, 0.25, device=DEVICE, block=32))
    assert torch.equal(m16, attn.dropout_keep_mask(11, 2, 2, 64, 0.25, device=DEVICE, block=64))
    # each of the 8 slice positions keeps at rate 1 - p (2048 draws each: 4 standard errors = 0.038)
    for j in range(8):
        assert abs(m16[..., j::8].float().mean().item() - 0.75) < 0.038, j
    # neighbouring keys (slices of one call) are uncorrelated: P(both kept) = 0.75^2
    both = (m16[..., 0::2] & m16[..., 1::2]).float().mean().item()
    assert abs(both - 0.5625) < 0.04
    assert attn._dropout_threshold(0.1) == 6554 and attn._dropout_threshold(1e-9) == 1
    assert attn._dropout_threshold(0.0) == 0 and attn._dropout_threshold(0.99999999) == 65535


def test_kernels_fall_back_to_torch_when_no_config_fits(capsys, monkeypatch):
    from types import SimpleNamespace
    cuda_q = SimpleNamespace(is_cuda=True, shape=(2, 2, 100, 128), dtype=torch.float32, device=torch.device("cuda"))
    monkeypatch.setattr(attn, "HAS_TRITON", True)
    monkeypatch.setattr(triton_ops, "GPU_TARGET", (75, 1024))  # a GPU with 1 KB of shared memory: nothing fits
    assert not attn._kernel_applies(cuda_q, 0.1)
    assert not attn._kernel_applies(cuda_q, 0.1)
    said = capsys.readouterr().err
    assert said.count("no kernel config fits sm_75") == 1 and "using torch" in said  # said once
    assert not km.kernel_fits(torch.device("cuda"), "fp32", 39)
    assert "k-means: no kernel config fits sm_75" in capsys.readouterr().err
    # on the named targets every input the kernels accept keeps a config (tests/test_kernels_compile.py compiles them)
    for target in [(80, 166_912), (90, 232_448)]:
        monkeypatch.setattr(triton_ops, "GPU_TARGET", target)
        for dtype in attn.SUPPORTED_DTYPES:
            for D in attn.SUPPORTED_HEAD_DIMS:
                assert attn._kernel_applies(SimpleNamespace(**dict(vars(cuda_q), shape=(2, 2, 100, D), dtype=dtype)),
                                            0.1)
        for variant in ("fp32", "tf32", "bf16", "fp16"):
            for D in (39, 768):
                assert km.kernel_fits(torch.device("cuda"), variant, D)


def test_attention_backend_switch():
    q, k, v = (t.detach() for t in qkv(2, 1, 18, 16, torch.float32, seed=8))
    lengths = torch.tensor([18, 4], device=DEVICE)
    calls = []
    original = attn.attention_triton
    attn.attention_triton = lambda *a, **kw: calls.append(1) or original(*a, **kw)
    try:
        with attn.use_backend("torch"):
            ref = attn.attention(q, k, v, lengths)
        assert calls == []
        with attn.use_backend("triton"):
            out = attn.attention(q, k, v, lengths)
        assert calls == [1]
        with attn.use_backend("auto"):
            attn.attention(q, k, v, lengths)
        assert len(calls) == (2 if DEVICE == "cuda" else 1)  # auto: kernel on CUDA only
    finally:
        attn.attention_triton = original
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="backend"):
        with attn.use_backend("cuda"):
            pass
    with pytest.raises(ValueError, match="head dim 24"):
        attn.attention_triton(*(torch.zeros(1, 1, 4, 24, device=DEVICE) for _ in range(3)))


def test_torch_paths_work_without_triton_and_env_var_sets_backend():
    # Triton is optional (macOS, CPU-only installs): with `import triton` failing, both modules still import and
    # their torch paths run; MUSICSSL_ATTENTION / MUSICSSL_KMEANS set the initial backend.
    code = """
import sys; sys.modules["triton"] = None
import torch
import triton_ops.attention as attn, triton_ops.kmeans as km
assert not attn.HAS_TRITON and not km.HAS_TRITON
assert attn.BACKEND == "torch" and km.BACKEND == "auto"
q = torch.randn(2, 1, 5, 8)
out = attn.attention(q, q, q, torch.tensor([5, 2]))
assert out.shape == q.shape and out[1, :, 2:].abs().max() == 0
labels, dists = km.assign_nearest(torch.eye(3), torch.eye(3) * 2)
assert labels.tolist() == [0, 1, 2] and torch.allclose(dists, torch.ones(3))
try:
    with attn.use_backend("triton"):
        attn.attention(q, q, q)
    raise SystemExit("no error")
except RuntimeError as e:
    assert "import triton" in str(e), e
print("ok")
"""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, MUSICSSL_ATTENTION="torch", MUSICSSL_KMEANS="auto", PYTHONPATH=root)
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr


@pytest.mark.slow
def test_devcheck_small_runs_on_cpu(tmp_path):
    """bench/devcheck.py --small: every section of the first-GPU check on tiny shapes under the interpreter."""
    import json
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = tmp_path / "dc.jsonl"
    env = dict(os.environ, PYTHONPATH=root, OMP_NUM_THREADS="1")
    result = subprocess.run([sys.executable, os.path.join(root, "bench", "devcheck.py"), "--small", "--out", str(out)],
                            env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [json.loads(line) for line in open(out)]
    assert {r["section"] for r in rows} >= {"configs", "fp32", "speed", "kmeans", "end"}
    assert not [r for r in rows if r["name"] in ("failed", "skipped") or "error" in r]
    checked = [r for r in rows if "ok" in r]
    assert len(checked) >= 5 and all(r["ok"] for r in checked), [r for r in checked if not r["ok"]]
    assert all(r["label_agreement_float64"] == 1.0 for r in rows if "label_agreement_float64" in r)
    assert all(r["counts_equal"] for r in rows if "counts_equal" in r)


@pytest.mark.slow
def test_encoder_same_hidden_states_and_grads_with_kernel_forced_on():
    model = pytest.importorskip("model")
    torch.manual_seed(0)
    cfg = model.EncoderConfig.hubert_base(layers=2, dim=64, heads=2, ffn=128)
    enc = model.Encoder(cfg).to(DEVICE).eval()  # eval: no dropout, so both paths compute the same function
    wav = torch.randn(2, 8000, device=DEVICE)
    lengths = torch.tensor([8000, 5000], device=DEVICE)

    def run(backend):
        enc.zero_grad()
        with attn.use_backend(backend):
            out = enc(wav, lengths)
        valid = ~out.padding_mask
        loss = sum((h[valid] ** 2).mean() for h in out.hidden_states[1:])
        loss.backward()
        return out, {n: p.grad.clone() for n, p in enc.named_parameters() if p.grad is not None}

    ref, ref_grads = run("torch")
    out, grads = run("triton")
    assert out.hidden_states[-1].shape[1] == enc.num_frames(8000)
    valid = ~ref.padding_mask
    assert valid[1].sum() < valid[0].sum()  # the second clip is padded
    for h, r in zip(out.hidden_states, ref.hidden_states):
        torch.testing.assert_close(h[valid], r[valid], atol=1e-4, rtol=1e-4)
    assert grads.keys() == ref_grads.keys() and len(grads) > 10
    for name in ref_grads:
        torch.testing.assert_close(grads[name], ref_grads[name], atol=1e-4, rtol=1e-3, msg=lambda m: f"{name}: {m}")


# ------------------------------------------------------------------------------------------------ k-means

def points(N, K, D, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, D, generator=g)
    c = torch.randn(K, D, generator=g)
    return x.to(DEVICE, dtype), c.to(DEVICE)


def check_assignment(x, c, labels, dists, atol):
    """Labels may differ from the reference only on near-ties: the chosen centroid's distance must equal the minimum."""
    ref_labels, ref_dists = km.assign_nearest_reference(x.float(), c.to(x.dtype).float())
    assert labels.dtype == torch.long and dists.dtype == torch.float32
    torch.testing.assert_close(dists, ref_dists, atol=atol, rtol=1e-5)
    cq = c.to(x.dtype).float()
    chosen = ((x.float() - cq[labels]) ** 2).sum(1)
    torch.testing.assert_close(chosen, ref_dists, atol=atol, rtol=1e-5)
    assert (labels == ref_labels).float().mean().item() > 0.97


# (N, K, D): D from 13 (MFCC-like, not a block multiple) to 1024, both in one tile (D <= 128) and walked in chunks
# (200: last chunk partial); K not multiples of the tile, K = 1
KMEANS_CASES = [(101, 37, 13), (50, 5, 39), (70, 20, 100), (33, 1, 16), (25, 9, 200), (20, 17, 1024)]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("N,K,D", KMEANS_CASES)
def test_assign_nearest_matches_reference(N, K, D, dtype):
    x, c = points(N, K, D, dtype)
    with km.use_backend("triton"):
        labels, dists = km.assign_nearest(x, c)
    check_assignment(x, c, labels, dists, atol=1e-4 * D)


def test_assign_nearest_finds_planted_centroids_and_breaks_ties_low():
    g = torch.Generator().manual_seed(1)
    c = torch.randn(40, 24, generator=g) * 10
    truth = torch.randint(0, 40, (90,), generator=g)
    x = c[truth] + 0.01 * torch.randn(90, 24, generator=g)
    c_dup = torch.cat([c, c])  # every centroid twice: the lower index must win (as torch's argmin)
    with km.use_backend("triton"):
        labels, dists = km.assign_nearest(x.to(DEVICE), c_dup.to(DEVICE))
    assert torch.equal(labels.cpu(), truth)
    assert dists.max().item() < 24 * 0.01 ** 2 * 4


@pytest.mark.parametrize("dtype", [torch.float32, BF16], ids=str)
def test_cluster_sums_and_fused_assign_and_sum(dtype):
    N, K, D = 150, 7, 39  # few clusters: many points of one tile add into the same cluster (atomic collisions)
    x, c = points(N, K, D, dtype, seed=2)
    with km.use_backend("triton"):
        labels, dists = km.assign_nearest(x, c)
        sums, counts = km.cluster_sums(x, labels, K)
        f_labels, f_dists, f_sums, f_counts = km.assign_and_sum(x, c)
    ref_sums, ref_counts = km.cluster_sums_reference(x, labels, K)
    assert counts.dtype == torch.long and counts.sum().item() == N
    assert torch.equal(counts, ref_counts)
    torch.testing.assert_close(sums, ref_sums, atol=1e-4, rtol=1e-5)
    assert torch.equal(f_labels, labels) and torch.equal(f_counts, counts)
    torch.testing.assert_close(f_dists, dists, atol=0, rtol=0)
    torch.testing.assert_close(f_sums, ref_sums, atol=1e-4, rtol=1e-5)
    # a Lloyd step with these sums lowers the inertia
    new_c = f_sums / f_counts.clamp_min(1)[:, None]
    new_c = torch.where(f_counts[:, None] > 0, new_c, c)
    with km.use_backend("triton"):
        assert km.assign_nearest(x, new_c)[1].sum() < dists.sum()


def test_kmeans_backend_switch_and_errors():
    x, c = points(30, 4, 13, torch.float32)
    with km.use_backend("torch"):
        ref = km.assign_nearest(x, c)
    with km.use_backend("triton"):
        out = km.assign_nearest(x, c)
        with pytest.raises(ValueError, match=r"\(30, 13\) and \(4, 12\)"):
            km.assign_nearest(x, c[:, :12])
    assert torch.equal(out[0], ref[0])
    with pytest.raises(ValueError, match="backend"):
        with km.use_backend("gpu"):
            pass
