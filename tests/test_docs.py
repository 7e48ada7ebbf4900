"""Every command the README and docs/ show still works as written: each `python SCRIPT ...` / `torchrun ... SCRIPT`
line (in a fenced block, or inline in backticks) names a script that exists, a sub-command it has, config files that
exist, and only flags its --help lists. A renamed flag breaks CI instead of a reader; the README's quick-start lines
themselves run in CI (.ci/run)."""
import functools
import glob
import os
import re
import shlex
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAGES = ["README.md"] + sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "docs", "*.md")))
NOT_OURS = {"venv", "pytest", "pip", "torch.distributed.run"}  # python -m of other people's tools


def documented_commands(text):
    """The shell commands of a Markdown page: fenced blocks' lines and indented blocks' command lines (backslash
    continuations joined, comments and prompts dropped) and inline `python ...` / `torchrun ...` spans of its prose."""
    out, fenced, block, continuing = [], False, [], False
    for line in text.splitlines():
        if line.lstrip().startswith("```"):
            if fenced:
                joined = "\n".join(block).replace("\\\n", " ")
                out += [c for c in joined.splitlines() if c.strip()]
                block = []
            fenced = not fenced
            continue
        if fenced:
            block.append(line.strip().removeprefix("$ "))
        elif line.startswith("    ") and (continuing or re.match(r"\s+(python3? |torchrun |OMP_NUM_THREADS=)", line)):
            text = line.strip()  # an indented code block's command line, or the continuation of one
            if continuing:
                out[-1] = out[-1][:-1] + " " + text
            else:
                out.append(text)
            continuing = text.endswith("\\")
        else:
            continuing = False
            out += re.findall(r"`((?:python3?|torchrun|OMP_NUM_THREADS=\S+ python3?) [^`]+)`", line)
    return [re.sub(r"\s+#\s.*$", "", c).strip() for c in out if not c.lstrip().startswith("#")]


def invocations(command):
    """(script argv: [python, -m, mod] or [python, path], the arguments after it) for each python / torchrun step of
    a shell line; other steps (pip, bash, cd ...) are not ours to check here."""
    steps = re.split(r"\s*(?:&&|\|\||;|\|)\s*", command)
    for step in steps:
        try:
            words = shlex.split(step)
        except ValueError:
            words = step.split()
        while words and re.match(r"^[A-Z_][A-Z0-9_]*=", words[0]):  # VAR=value prefixes
            words = words[1:]
        if not words:
            continue
        if words[0] == "torchrun":
            i = next((i for i, w in enumerate(words) if w.endswith(".py")), None)
            if i is not None:
                yield [sys.executable, words[i]], words[i + 1:]
        elif re.fullmatch(r"python3?", words[0]) and len(words) > 1:
            if words[1] == "-m" and len(words) > 2:
                if words[2] not in NOT_OURS:
                    yield [sys.executable, "-m", words[2]], words[3:]
            elif words[1].endswith(".py"):
                yield [sys.executable, words[1]], words[2:]


@functools.lru_cache(maxsize=None)
def help_text(argv):
    r = subprocess.run(list(argv) + ["--help"], cwd=ROOT, capture_output=True, text=True, timeout=300,
                       env={**{k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"},  # as a user runs it
                            "OMP_NUM_THREADS": "1"})
    return r.returncode, r.stdout + r.stderr


def check(command):
    """[problem] of one documented command (empty when it holds)."""
    problems = []
    for script, args in invocations(command):
        path = script[-1] if script[1] != "-m" else script[-1].replace(".", "/") + ".py"
        if re.fullmatch(r"[A-Z_]+\.py", os.path.basename(path)):  # a placeholder: `python SCRIPT.py config/FILE.py`
            continue
        if not os.path.isfile(os.path.join(ROOT, path)):
            problems.append(f"{path}: no such script")
            continue
        rc, text = help_text(tuple(script))
        if rc != 0:
            problems.append(f"{' '.join(script[1:])} --help exits {rc}: {text[-500:]}")
            continue
        if args and re.fullmatch(r"[a-z][a-z0-9_]*", args[0]) and re.search(rf"\b{args[0]}\b", text) and \
                not os.path.exists(os.path.join(ROOT, args[0])):  # a sub-command: its own --help has its flags
            rc, text = help_text(tuple(script) + (args[0],))
            if rc != 0:
                problems.append(f"{' '.join(script[1:])} {args[0]} --help exits {rc}: {text[-500:]}")
                continue
        for a in args:
            if a.startswith("config/") and a.endswith(".py") and not os.path.isfile(os.path.join(ROOT, a)):
                problems.append(f"{a}: no such config file")
            flag = re.match(r"^(--[A-Za-z][\w-]*)", a)
            if flag and not re.search(rf"{re.escape(flag.group(1))}(?![\w-])", text):
                problems.append(f"{' '.join(script[1:])}: {flag.group(1)} is not in its --help")
    return problems


def test_every_documented_command_matches_its_script():
    seen, problems = set(), []
    for page in PAGES:
        with open(os.path.join(ROOT, page)) as f:
            for command in documented_commands(f.read()):
                if command not in seen:
                    seen.add(command)
                    problems += [f"{page}: `{command}`: {p}" for p in check(command)]
    checked = [c for c in seen if any(True for _ in invocations(c))]
    assert len(checked) >= 20, f"only {len(checked)} commands found in {PAGES}"
    assert not problems, "\n".join(problems)


def test_a_renamed_flag_or_script_is_caught():
    """The check itself: a flag no script has, a sub-command's flag given to another, a missing config and script."""
    assert check("python probe.py --task nsynth_pitch --model random --data-root x") == []
    assert check("python probe.py --task nsynth_pitch --data-rot x") == ["probe.py: --data-rot is not in its --help"]
    assert check("python pretrain_musichubert.py config/quickstart.py --max_steps=3") == []
    assert check("OMP_NUM_THREADS=1 python pretrain_musichubert.py --max_step=3") == \
        ["pretrain_musichubert.py: --max_step is not in its --help"]
    assert check("python probe.py report runs/a.jsonl --out x") == []
    assert check("python probe.py predict --heads h --model m a.wav --sweep") == \
        ["probe.py: --sweep is not in its --help"]
    assert check("torchrun --nproc_per_node=8 pretrain_music2vec.py config/nope.py") == \
        ["config/nope.py: no such config file"]
    assert check("python probe_frames.py --help") == ["probe_frames.py: no such script"]
    assert documented_commands("text `python probe.py --task x` more\n```\n# a comment\npython a.py \\\n  --b 1\n```\n"
                               "\n    python c.py --d \\\n        --e 2\n    not a command\n") == \
        ["python probe.py --task x", "python a.py  --b 1", "python c.py --d  --e 2"]
