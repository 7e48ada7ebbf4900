"""The house: no top-level name of the repository shadows a package our dependencies install, transformers and our
encoder live in one process, and imports run downhill (no cycle).

Why: the repository root is on sys.path of every script run from it, so a top-level `kernels/` (our Triton kernels'
old folder) was found before Hugging Face's `kernels` distribution, which transformers >= 5 imports when it builds a
model (`ImportError: cannot import name 'CUDAProperties' from 'kernels'`). These tests run in the venv CI builds
fresh from the README's lines with the newest releases they admit, so a dependency that starts using one of our
names fails here, not on a user's machine."""
import ast
import importlib.metadata as md
import importlib.util
import os
import subprocess
import sys
import textwrap

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SKIP_DIRS = {"tests", "out", "runs", "synth", "venv", "__pycache__"}


def top_level_names(root):
    """The import names the repository root provides: its .py files and its folders that are packages (an
    __init__.py) or could be imported as namespace packages (any .py inside)."""
    names = set()
    for entry in os.listdir(root):
        path = os.path.join(root, entry)
        if entry.endswith(".py"):
            names.add(entry[:-3])
        elif os.path.isdir(path) and not entry.startswith(".") and entry not in SKIP_DIRS and entry.isidentifier():
            if any(f.endswith(".py") for f in os.listdir(path)):
                names.add(entry)
    return names


def shadowed(root, installed=None):
    """[(our name, [distributions that install a module of that name])]: each is hidden by our copy whenever code runs
    from the repository root."""
    installed = md.packages_distributions() if installed is None else installed
    return sorted((n, sorted(set(installed[n]))) for n in top_level_names(root) if n in installed)


def test_no_top_level_name_shadows_an_installed_distribution():
    clash = shadowed(ROOT)
    assert not clash, "; ".join(f"top-level '{n}' shadows the installed distribution(s) {', '.join(d)}: rename ours"
                                for n, d in clash)
    assert {"model", "probe", "probing", "triton_ops", "data"} <= top_level_names(ROOT)  # the check sees our names


def test_a_planted_shadowing_module_is_caught(tmp_path):
    """The guard itself: a repository with a top-level `kernels/` (the old layout) and `transformers.py` fails it,
    against the venv's real installed set."""
    (tmp_path / "kernels").mkdir()
    (tmp_path / "kernels" / "__init__.py").write_text("")
    (tmp_path / "transformers.py").write_text("")
    (tmp_path / "model.py").write_text("")
    names = dict(shadowed(str(tmp_path)))
    assert "transformers" in names["transformers"]
    assert "kernels" in names, "Hugging Face's kernels distribution is not installed: requirements-dev.txt names it"
    assert "model" not in names


def test_transformers_and_our_encoder_in_one_process():
    """With Hugging Face's `kernels` installed, a script run from the repository root builds a transformers model
    (which imports `kernels`' hub integration) next to ours, and both run."""
    spec = importlib.util.find_spec("kernels")
    assert spec is not None and spec.origin and os.path.dirname(os.path.dirname(spec.origin)) != ROOT, \
        f"`import kernels` finds {spec and spec.origin}: Hugging Face's kernels must be installed " \
        "(requirements-dev.txt) and no file of ours may shadow it"
    script = textwrap.dedent("""
        import os, sys, torch
        sys.path.insert(0, os.getcwd())  # as `python script.py` from the root, and pytest's rootdir insertion
        import model, triton_ops                      # ours first, the order that broke
        import kernels                                # Hugging Face's
        from transformers import HubertConfig, HubertModel
        import transformers.integrations.hub_kernels  # what `from kernels import CUDAProperties` runs in
        assert os.path.dirname(os.path.dirname(os.path.abspath(kernels.__file__))) != os.getcwd(), kernels.__file__
        cfg = HubertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                           conv_dim=(16, 16), conv_stride=(5, 2), conv_kernel=(10, 3), num_conv_pos_embeddings=16,
                           num_conv_pos_embedding_groups=2)
        theirs = HubertModel(cfg).eval()
        enc = model.Encoder(model.EncoderConfig.hubert_base(conv_layers=((16, 10, 5), (16, 3, 2)), dim=32, layers=1,
                                                             heads=2, ffn=64, pos_conv_kernel=16,
                                                             pos_conv_groups=2)).eval()
        x = torch.randn(1, 1600)
        with torch.no_grad():
            a = theirs(x).last_hidden_state
            b = enc(x)
        b = b[0] if isinstance(b, (tuple, list)) else b
        print("ok", tuple(a.shape), kernels.__file__)
    """)
    r = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=300,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.startswith("ok (1, "), r.stdout


def import_graph(root):
    """{module: modules of the repository it imports}, over the .py files outside tests/ (absolute imports)."""
    mods = {}
    for dirpath, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if not d.startswith(".") and d not in SKIP_DIRS]
        for f in files:
            if f.endswith(".py"):
                rel = os.path.relpath(os.path.join(dirpath, f), root)[:-3].replace(os.sep, ".")
                mods[rel.removesuffix(".__init__")] = os.path.join(dirpath, f)
    edges = {m: set() for m in mods}
    for m, path in mods.items():
        with open(path) as fh:
            tree = ast.parse(fh.read(), path)
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            else:
                continue
            for n in names:
                while n and n not in mods:
                    n = n.rpartition(".")[0]
                if n and n != m and not m.startswith(n + "."):
                    edges[m].add(n)
    return edges


def cycles(edges):
    """Every import cycle found by a depth-first walk, each as [a, b, ..., a]."""
    found, state = [], {}

    def walk(u, stack):
        state[u] = 1
        stack.append(u)
        for v in sorted(edges[u]):
            if state.get(v) == 1:
                found.append(stack[stack.index(v):] + [v])
            elif v not in state:
                walk(v, stack)
        stack.pop()
        state[u] = 2

    for m in sorted(edges):
        if m not in state:
            walk(m, [])
    return found


def test_imports_run_downhill():
    edges = import_graph(ROOT)
    assert not cycles(edges), "import cycles: " + "; ".join(" -> ".join(c) for c in cycles(edges))
    probing = [m for m in edges if m == "probing" or m.startswith("probing.")]
    assert len(probing) >= 8 and not [m for m in probing if "probe" in edges[m]], "probing/ must not import probe.py"
    assert not [f for f in os.listdir(ROOT) if f.startswith("probe_") and f.endswith(".py")], \
        "the probe's modules live in probing/"


def test_a_planted_cycle_is_caught(tmp_path):
    """The guard itself: the circle the probe had (probe -> probe_frames -> probe, imported inside a function)."""
    (tmp_path / "probe.py").write_text("import probe_frames\n")
    (tmp_path / "probe_frames.py").write_text("def run():\n    import probe\n")
    (tmp_path / "model.py").write_text("")
    assert cycles(import_graph(str(tmp_path))) == [["probe", "probe_frames", "probe"]]
