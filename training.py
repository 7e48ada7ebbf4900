"""Training machinery shared by the pre-training scripts (pretrain_musichubert.py, pretrain_music2vec.py,
pretrain_wav2vec2.py).

Each function here is one thing a nanoGPT-style train script needs and would otherwise copy:
  configure(globals(), argv)        config/*.py files and --key=value overrides, validated (one-line errors)
  setup_distributed() / DistInfo    DDP from torchrun's RANK / LOCAL_RANK / WORLD_SIZE (NCCL on CUDA, gloo on CPU)
  all_reduce_sum(t)                 sum over ranks (no-op in a single process)
  autocast_context(device, dtype)   bf16 autocast on CUDA (and TF32 matmuls), nothing on CPU
  step_generator(seed, step, micro) a torch.Generator for one micro-batch's masks/noise: same on any world size
  polynomial_decay_lr, tri_stage_lr learning rate as an explicit function of the step (fairseq's two schedules)
  save_checkpoint / latest_checkpoint / load_checkpoint   atomic write, keep-last-N, resume
  rng_state / set_rng_state         python, numpy, torch, cuda RNG capture for exact resume
  audio_error_exit(e, out_dir)      an unreadable clip raised in a loader worker -> a one-line SystemExit
  StopSignal                        SIGTERM (cluster preemption) -> a flag the loop checks, agreed across ranks
  NonFiniteGuard                    skip updates with a non-finite loss/grad, stop after N in a row
  TrainLogger                       the log line (+ optional TensorBoard)
  encoder_flops, peak_flops_per_s   MFU: forward FLOPs of the encoder for one clip, conv front end included

Nothing here knows about a particular objective; heads and losses live in the pretrain scripts.
"""
import ast
import contextlib
import dataclasses
import difflib
import glob
import io
import json
import math
import os
import random
import re
import signal
import sys
import textwrap
import time
import tokenize

import numpy as np
import torch
import torch.distributed as dist


# ----------------------------------------------------------------------------------------------------------------
# configuration: plain globals in the train script, overridden by config files and --key=value

class ConfigError(SystemExit):
    """A bad override. Subclasses SystemExit so the script stops with one line on stderr, no traceback."""

    def __init__(self, message):
        super().__init__(f"config error: {message}")


def _coerce(key, value, default, source):
    """Return `value` converted to the type of `default`, or raise ConfigError naming key, source and types."""
    if default is None:
        return value  # no type to check against (an optional path, an optional int, ...)
    if isinstance(default, bool):  # bool before int: bool is a subclass of int
        if isinstance(value, bool):
            return value
    elif isinstance(default, int):
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif isinstance(default, float):
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif isinstance(default, (tuple, list)):
        if isinstance(value, (tuple, list)):
            return type(default)(value)
    elif isinstance(value, type(default)):
        return value
    raise ConfigError(f"{source}: {key} must be {type(default).__name__} (default {default!r}), "
                      f"got {type(value).__name__} {value!r}")


def _parse_cli_value(raw, default):
    """--key=value text -> Python value. Literals go through ast.literal_eval; a str (or None) default also takes
    bare text, so `--out_dir=runs/x` needs no quotes. true/false are accepted for bools."""
    if isinstance(default, bool) and raw.lower() in ("true", "false"):
        return raw.lower() == "true"
    try:
        return ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        if default is None or isinstance(default, str):
            return raw
        raise ConfigError(f"--{raw!r}: cannot parse {raw!r} as a Python literal") from None


def configure(globals_dict, argv=None, verbose=True):
    """Apply overrides to a train script's hyperparameter globals, in order, and return {key: new value}.

    argv (default sys.argv[1:]) holds config files (`config/quickstart.py`: plain Python assignments) and
    `--key=value` items. Only keys that already exist in `globals_dict` with a plain-data default
    (bool/int/float/str/tuple/list/None) can be set. An unknown key, a wrong type or an unparsable value raises
    ConfigError, which exits with one line naming the key and where it came from. `_private` and `ALL_CAPS` globals
    are not settable. Names starting with `_` and modules/functions/classes in a config file are ignored (a config
    may `import math` or define helpers).
    """
    argv = sys.argv[1:] if argv is None else argv
    settable = set(config_snapshot(globals_dict))
    if "--help" in argv or "-h" in argv:  # before anything is read, created or initialised
        print(help_text(globals_dict, settable))
        raise SystemExit(0)
    overrides = {}
    for arg in argv:
        if arg.startswith("--"):
            if "=" not in arg:
                raise ConfigError(f"{arg}: expected --key=value ({_help_hint(globals_dict)})")
            key, raw = arg[2:].split("=", 1)
            if key not in settable:
                raise ConfigError(f"{arg}: unknown key {key!r}{_nearest(key, settable)}; {_help_hint(globals_dict)}")
            value = _coerce(key, _parse_cli_value(raw, globals_dict[key]), globals_dict[key], arg)
            globals_dict[key] = overrides[key] = value
        else:
            if not os.path.isfile(arg):
                raise ConfigError(f"{arg}: not a file (expected a config file or --key=value)")
            scope = {}
            with open(arg) as f:
                code = f.read()
            try:
                exec(compile(code, arg, "exec"), scope)
            except Exception as e:  # a config file with a typo should still be a one-line error
                raise ConfigError(f"{arg}: {type(e).__name__}: {e}") from None
            for key, value in scope.items():
                if key.startswith("_") or callable(value) or type(value).__name__ == "module":
                    continue
                if key not in settable:
                    raise ConfigError(f"{arg}: unknown key {key!r}{_nearest(key, settable)}; "
                                      f"{_help_hint(globals_dict)}")
                value = _coerce(key, value, globals_dict[key], arg)
                globals_dict[key] = overrides[key] = value
    if verbose and overrides and int(os.environ.get("RANK", "0")) == 0:
        for key, value in overrides.items():
            print(f"config: {key} = {value!r}")
    return overrides


def _nearest(key, settable):
    close = difflib.get_close_matches(key, sorted(settable), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _help_hint(globals_dict):
    script = os.path.basename(globals_dict.get("__file__") or "SCRIPT.py")
    return f"python {script} --help lists them"


def help_text(globals_dict, settable, width=118, column=40):
    """`SCRIPT.py --help`: the script's globals block as a reference, in the file's order: its full-line comments
    as headings, each settable global as --key=default with the comment beside it. Read from the source (ast for
    the assignments, tokenize for the comments, so a '#' inside a string is not one): the help is the file and
    cannot drift from it."""
    path = globals_dict.get("__file__") or ""
    script = os.path.basename(path) or "SCRIPT.py"
    doc = (globals_dict.get("__doc__") or "").strip().split("\n\n")[0]
    out = [f"usage: python {script} [config/FILE.py ...] [--key=value ...]", "", *([doc, ""] if doc else []),
           "Config files (plain Python assignments) and --key=value items apply in order. "
           "Hyperparameters (default):", ""]
    with open(path) as f:
        source = f.read()
    lines = source.splitlines()
    beside, alone = {}, {}  # line number -> (column of the comment's text, text): after code / on a line of its own
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            row, col = tok.start
            text = tok.string[1:]
            where = alone if not lines[row - 1][:col].strip() else beside
            where[row] = (col + 1 + len(text) - len(text.lstrip()), text.strip())
    assigns = {node.lineno: node for node in ast.parse(source).body  # the top-level `NAME = value` of settable names
               if isinstance(node, ast.Assign) and len(node.targets) == 1
               and isinstance(node.targets[0], ast.Name) and node.targets[0].id in settable}
    # the globals block: between the `# ----` rules around the first assignment (the scripts' layout), else all of it
    rules = [i + 1 for i, line in enumerate(lines) if line.startswith("# ---")]
    first = min(assigns, default=1)
    start = max([r for r in rules if r < first], default=0)
    end = min([r for r in rules if r > first], default=len(lines) + 1)
    shown, row = set(), start + 1
    while row < end:
        if row in assigns:
            node = assigns[row]
            key, last = node.targets[0].id, node.end_lineno
            col, comment = next((beside[r] for r in range(row, last + 1) if r in beside), (None, ""))
            while last + 1 in alone and alone[last + 1][0] == col:  # the comment goes on below, aligned with it
                last += 1
                comment += " " + alone[last][1]
            item = f"  --{key}={globals_dict[key]!r}"
            pad = max(column, len(item) + 1)
            out += textwrap.wrap(comment, width, initial_indent=item.ljust(pad) + " ",
                                 subsequent_indent=" " * (pad + 1), break_on_hyphens=False) if comment else [item]
            shown.add(key)
            row = last
        elif row in alone and not lines[row - 1].startswith("# ---"):
            if out[-1].startswith(" ") or (row + 1 in assigns and out[-1]):
                out.append("")  # a heading after a group of items, or after a note above it
            out.append(alone[row][1])
        row += 1
    out += [f"  --{key}={globals_dict[key]!r}" for key in sorted(settable - shown)]  # set outside the block
    return "\n".join(out)


def config_snapshot(globals_dict):
    """The settable hyperparameters of a script as a plain dict (stored in checkpoints): globals holding plain data,
    except private (`_x`) and constant (`ALL_CAPS`) names."""
    return {k: v for k, v in globals_dict.items()
            if not k.startswith("_") and not k.isupper()
            and (v is None or isinstance(v, (bool, int, float, str, tuple, list)))}


# ----------------------------------------------------------------------------------------------------------------
# distributed

@dataclasses.dataclass
class DistInfo:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    device: str = "cpu"
    ddp: bool = False

    @property
    def is_master(self):
        return self.rank == 0


def setup_distributed(device="auto"):
    """Initialise torch.distributed when launched by torchrun (RANK/LOCAL_RANK/WORLD_SIZE in the environment).

    device: "auto" (cuda:LOCAL_RANK when CUDA is available, else cpu), "cpu" or "cuda". The backend is NCCL on CUDA
    and gloo on CPU. Multi-node runs need nothing extra: torchrun's rendezvous sets MASTER_ADDR/PORT and the ranks.
    """
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    ddp = int(os.environ.get("RANK", "-1")) != -1 and int(os.environ.get("WORLD_SIZE", "1")) > 1
    if not ddp:
        dev = "cuda:0" if device == "cuda" else device
        if device == "cuda":
            torch.cuda.set_device(0)
        return DistInfo(device=dev)
    rank, local_rank, world = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"]), int(os.environ["WORLD_SIZE"])
    if device == "cuda":
        dev = f"cuda:{local_rank}"
        torch.cuda.set_device(dev)
        dist.init_process_group(backend="nccl", device_id=torch.device(dev))
    else:
        dev = "cpu"
        dist.init_process_group(backend="gloo")
    return DistInfo(rank=rank, local_rank=local_rank, world_size=world, device=dev, ddp=True)


def cleanup_distributed(info):
    if info.ddp and dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_sum(tensor):
    """In-place sum over ranks (returns the tensor); a no-op without torch.distributed."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def autocast_context(device, dtype):
    """The forward's autocast: `dtype` (bfloat16 | float32) on CUDA, with TF32 matmuls; CPU runs in float32.
    float16 is refused: it would need loss scaling."""
    if dtype not in ("bfloat16", "float32"):
        raise SystemExit(f"error: dtype={dtype!r}: use bfloat16 or float32 (float16 would need loss scaling)")
    if not str(device).startswith("cuda"):
        return contextlib.nullcontext()
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    return torch.autocast("cuda", dtype=torch.bfloat16) if dtype == "bfloat16" else contextlib.nullcontext()


def step_generator(seed, step, global_micro, *stream, device="cpu"):
    """A torch.Generator for the random draws of one micro-batch (span masks, wav2vec 2.0's negatives and Gumbel
    noise), seeded from (seed, update, global micro-batch index, *stream): the same draws on any number of ranks
    and after a resume. Rank r's m-th micro-batch of an update has global index m * world_size + r, which is the
    batch ClipBatchSampler gives it (batches[rank::world]). `stream` separates independent draws of one
    micro-batch; `device` puts the generator where the draws are made."""
    key = np.random.SeedSequence([seed, step, global_micro, *stream]).generate_state(2)
    return torch.Generator(device).manual_seed(int(key[0]) << 32 | int(key[1]))


# ----------------------------------------------------------------------------------------------------------------
# learning-rate schedules: the lr for update `step` (0-based), as plain functions a test can tabulate

def polynomial_decay_lr(step, peak_lr, warmup_steps, total_steps, end_lr=0.0, power=1.0):
    """fairseq `polynomial_decay` (HuBERT, wav2vec 2.0): linear warm-up from 0 to peak over `warmup_steps`, then
    (peak - end) * (1 - progress)^power + end down to `end_lr` at `total_steps`, constant after.
    Warm-up uses (step + 1) / warmup so the first update already moves (fairseq: num_updates / warmup)."""
    if warmup_steps > 0 and step < warmup_steps:
        return peak_lr * (step + 1) / warmup_steps
    if step >= total_steps:
        return end_lr
    remaining = 1.0 - (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return (peak_lr - end_lr) * remaining ** power + end_lr


def tri_stage_lr(step, peak_lr, total_steps, warmup_frac=0.03, hold_frac=0.90, decay_frac=0.07,
                 init_scale=0.01, final_scale=0.01):
    """fairseq `tri_stage` (data2vec audio base: phase ratios 0.03/0.90/0.07): linear warm-up from init_scale*peak
    to peak, hold at peak, exponential decay to final_scale*peak, then constant. Stage lengths are
    int(frac * total_steps) as in fairseq's phase_ratio handling."""
    warmup, hold, decay = (int(f * total_steps) for f in (warmup_frac, hold_frac, decay_frac))
    init_lr, final_lr = init_scale * peak_lr, final_scale * peak_lr
    if step < warmup:
        return init_lr + (peak_lr - init_lr) * step / warmup
    step -= warmup
    if step < hold:
        return peak_lr
    step -= hold
    if step < decay:
        return peak_lr * math.exp(math.log(final_scale) * step / decay)
    return final_lr


# ----------------------------------------------------------------------------------------------------------------
# checkpoints

_CKPT_RE = re.compile(r"ckpt_(\d+)\.pt$")


def save_checkpoint(state, out_dir, step, keep_last=3):
    """torch.save `state` to out_dir/ckpt_{step:08d}.pt atomically and delete all but the newest `keep_last`.

    Atomic: written to a temporary file in the same folder, fsync'ed, then os.replace'd, so a kill (or a full disk)
    mid-write leaves the previous checkpoints intact and never a truncated ckpt_*.pt. keep_last <= 0 keeps all.
    Returns the path written."""
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, f"ckpt_{step:08d}.pt")
    tmp = path + f".tmp{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    try:  # make the rename itself durable
        dir_fd = os.open(out_dir, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError:
        pass
    if keep_last > 0:
        for old in list_checkpoints(out_dir)[:-keep_last]:
            os.remove(old)
    return path


def list_checkpoints(out_dir):
    """ckpt_*.pt paths in out_dir, oldest step first (temporary files are ignored)."""
    found = [(int(m.group(1)), p) for p in glob.glob(os.path.join(out_dir, "ckpt_*.pt"))
             if (m := _CKPT_RE.search(os.path.basename(p)))]
    return [p for _, p in sorted(found)]


def latest_checkpoint(out_dir):
    """Path of the highest-step checkpoint in out_dir, or None."""
    found = list_checkpoints(out_dir) if os.path.isdir(out_dir) else []
    return found[-1] if found else None


def load_checkpoint(path, map_location="cpu"):
    """Load a checkpoint written by save_checkpoint. It holds numpy RNG state and the config, so it is unpickled
    with weights_only=False: only load checkpoints you trust (your own runs)."""
    return torch.load(path, map_location=map_location, weights_only=False)


def checkpoint_sample_rate(encoder_config):
    """The sample rate an encoder_config dict of one of our checkpoints was trained at (checkpoints from before
    EncoderConfig.sample_rate have none: they are 16 kHz)."""
    return int(encoder_config.get("sample_rate", 16000))


def check_sample_rate(source, rate, sample_rate):
    """Stop in one line when a checkpoint (init_from or the one a run resumes from) was trained at another rate than
    the script's sample_rate: its frames would sit at another frame rate than its weights learnt."""
    if int(rate) != int(sample_rate):
        raise SystemExit(f"error: {source} was trained at {rate} Hz but this run has sample_rate={sample_rate}; "
                         f"pass --sample_rate={rate} (and a manifest counted at {rate} Hz) or use another checkpoint")


def init_from_checkpoint(path, sample_rate=None, **training_fields):
    """Continued pre-training (`init_from=PATH`): (EncoderConfig, encoder state_dict, heads) of one of our
    checkpoints, a Hugging Face folder or a fairseq checkpoint (model.load_pretrained). The architecture is the
    checkpoint's; `training_fields` (the script's dropout, layerdrop, feature_grad_mult, ...) replace its training
    settings. `heads`: the objective's pre-training heads the source carries, by our scripts' names (HuBERT
    final_proj / label_embs; wav2vec 2.0 quantizer / project_q / final_proj), for the script to take where the
    shapes match. Optimiser and schedule always start fresh. sample_rate: the script's; a checkpoint trained at
    another rate stops the run (check_sample_rate)."""
    import dataclasses
    from model import load_fairseq_heads, load_pretrained
    import fairseq_format
    try:
        encoder = load_pretrained(path)
        cfg = dataclasses.replace(encoder.cfg, **training_fields)
        heads = {}
        if not os.path.isdir(path):
            ckpt = fairseq_format.load_file(path)
            if fairseq_format.is_fairseq(ckpt):
                heads = load_fairseq_heads(path)
                if "project_hid" in heads:
                    heads["final_proj"] = heads.pop("project_hid")
                heads = {k: (v.state_dict() if isinstance(v, torch.nn.Module) else v) for k, v in heads.items()}
            else:
                heads = {k: ckpt[k] for k in ("final_proj", "label_embs", "quantizer", "project_q") if k in ckpt}
    except (OSError, ValueError) as e:
        raise SystemExit(f"error: init_from={path}: {e}") from None
    if sample_rate is not None:
        check_sample_rate(f"init_from={path}", cfg.sample_rate, sample_rate)
    return cfg, encoder.state_dict(), heads


def load_matching(module, state, name, source, say=print):
    """Load `state` into `module` when every shape matches; otherwise say so and keep the fresh init."""
    want = module.state_dict()
    if set(state) == set(want) and all(tuple(state[k].shape) == tuple(want[k].shape) for k in want):
        module.load_state_dict(state)
        say(f"init_from: {name} from {source}")
        return True
    shapes = {k: tuple(v.shape) for k, v in state.items()}
    say(f"init_from: {name} starts fresh ({source} has {shapes}, this run's is "
        f"{ {k: tuple(v.shape) for k, v in want.items()} })")
    return False


# ----------------------------------------------------------------------------------------------------------------
# RNG state for exact resume

class BatchStream:
    """Batches from `loader` across epochs, counting (epoch, batch in epoch): a checkpoint records that position
    and a resumed run skips exactly the batches it already consumed (ClipBatchSampler's start_batch)."""

    def __init__(self, loader, sampler, dataset, epoch=0, batch_in_epoch=0):
        self.loader, self.sampler, self.dataset = loader, sampler, dataset
        self.epoch, self.batch_in_epoch = epoch, batch_in_epoch
        self._batches = self._start_epoch()

    def _start_epoch(self):
        self.sampler.set_epoch(self.epoch, start_batch=self.batch_in_epoch)
        self.dataset.set_epoch(self.epoch)  # before iter(): the loader's workers copy the dataset then
        return iter(self.loader)

    def next(self):
        while True:
            try:
                batch = next(self._batches)
                self.batch_in_epoch += 1
                return batch
            except StopIteration:
                self.epoch, self.batch_in_epoch = self.epoch + 1, 0
                self._batches = self._start_epoch()

    def position(self, world_size):
        """The checkpoint's "data" entry; batches are counted over all ranks."""
        return {"epoch": self.epoch, "global_batches_in_epoch": self.batch_in_epoch * world_size}


def set_rank_rng_state(states, info):
    """Restore this rank's states from gather_rng_states' list (rank 0's when the world size has changed)."""
    set_rng_state(states[info.rank] if len(states) == info.world_size else states[0])


def gather_rng_states(info):
    """Every rank's RNG states in rank order (on every rank), for the checkpoint."""
    if not info.ddp:
        return [rng_state()]
    states = [None] * info.world_size
    dist.all_gather_object(states, rng_state())
    return states


def rng_state():
    """Every RNG the training loop draws from: python `random`, numpy's global RNG, torch CPU and all CUDA devices."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state):
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"].cpu())
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])


# ----------------------------------------------------------------------------------------------------------------
# stopping: preemption and non-finite losses

def audio_error_exit(error, out_dir):
    """The SystemExit for an AudioError raised while training. In a loader worker, DataLoader re-raises it with the
    worker's traceback in the message; keep the line that names the file."""
    line = str(error).strip().splitlines()[-1].split("AudioError: ", 1)[-1]
    return SystemExit(f"error: {line}\nset skip_bad_audio=True to log and skip unreadable clips, or fix the "
                      f"manifest; the run resumes from the last checkpoint in {out_dir}")


class StopSignal:
    """Sets `.requested` on SIGTERM (what Slurm & co send before preemption) so the loop can save and exit cleanly
    at the next step boundary instead of dying mid-write. `should_stop(info)` agrees across ranks: a signal on any
    rank stops all of them at the same step (otherwise the others would hang in the next all-reduce).

    `restore()` (called in the scripts' `finally`) puts the previous handlers back. A process forked while the
    handler is installed (a DataLoader or multiprocessing.Pool worker) inherits it; there it acts as the default
    action, so `Pool.terminate()` and the launcher can still stop workers (catching it there hung a Pool forever)."""

    def __init__(self, signals=(signal.SIGTERM,)):
        self.requested = False
        self._pid = os.getpid()
        self._previous = {s: signal.signal(s, self._handler) for s in signals}

    def _handler(self, signum, frame):
        if os.getpid() != self._pid:  # a forked worker: behave as if no handler were installed
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        self.requested = True

    def restore(self):
        for s, handler in self._previous.items():
            signal.signal(s, handler if handler is not None else signal.SIG_DFL)
        self._previous = {}

    def should_stop(self, info=None):
        if info is None or not info.ddp:
            return self.requested
        flag = torch.tensor([1.0 if self.requested else 0.0], device=info.device)
        return bool(all_reduce_sum(flag).item() > 0)


class NonFiniteLossError(RuntimeError):
    pass


class NonFiniteGuard:
    """Counts updates skipped because the loss or gradient norm was not finite (fp16/bf16 overflow, a bad clip).

    `ok(finite)` returns whether to apply the update; after `max_in_row` consecutive bad steps it raises
    NonFiniteLossError with a message, since the run is then diverging rather than hitting a one-off. Pass a
    value that is identical on every rank (e.g. the all-reduced loss or the clipped global grad norm) so that
    all ranks skip together."""

    def __init__(self, max_in_row=10):
        self.max_in_row = max_in_row
        self.in_row = 0
        self.total = 0

    def ok(self, finite, step=None):
        if finite:
            self.in_row = 0
            return True
        self.in_row += 1
        self.total += 1
        where = f" at step {step}" if step is not None else ""
        print(f"warning: non-finite loss or gradient{where}; update skipped "
              f"({self.in_row} in a row, {self.total} in total)", file=sys.stderr)
        if self.in_row >= self.max_in_row:
            raise NonFiniteLossError(
                f"{self.in_row} non-finite losses in a row{where}: the run is diverging "
                f"(lower the learning rate, check the data, or raise max_nonfinite_in_row)")
        return False

    def state_dict(self):
        return {"in_row": self.in_row, "total": self.total}

    def load_state_dict(self, state):
        self.in_row, self.total = state["in_row"], state["total"]


# ----------------------------------------------------------------------------------------------------------------
# logging

class TrainLogger:
    """Prints `step N | key value | ...` lines (master rank only), appends them at full precision to a JSON-lines
    file if `jsonl_path` is given (for plots and tests), and optionally writes TensorBoard scalars.

    Use `log(step, metrics)` with a dict of floats; formatting: lr in scientific notation, `mfu` as a percentage
    (None -> n/a), others with 4 significant digits. tensorboard_dir needs the `tensorboard` package."""

    def __init__(self, enabled=True, tensorboard_dir=None, print_fn=print, jsonl_path=None):
        self.enabled = enabled
        self.print_fn = print_fn
        self.jsonl_path = jsonl_path
        self.writer = None
        if enabled and tensorboard_dir:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise ConfigError("tensorboard=True needs the tensorboard package (pip install tensorboard)") from None
            self.writer = SummaryWriter(tensorboard_dir)

    @staticmethod
    def format(step, metrics):
        parts = [f"step {step}"]
        for k, v in metrics.items():
            if k == "mfu":
                parts.append("mfu n/a" if v is None else f"mfu {100 * v:.2f}%")
            elif k == "lr":
                parts.append(f"lr {v:.3e}")
            elif isinstance(v, int):
                parts.append(f"{k} {v}")
            else:
                parts.append(f"{k} {v:.4g}")
        return " | ".join(parts)

    def log(self, step, metrics):
        if not self.enabled:
            return
        self.print_fn(self.format(step, metrics))
        if self.jsonl_path:
            with open(self.jsonl_path, "a") as f:
                f.write(json.dumps({"step": step, **metrics}) + "\n")
        if self.writer is not None:
            for k, v in metrics.items():
                if v is not None:
                    self.writer.add_scalar(f"train/{k}", v, step)

    def close(self):
        if self.writer is not None:
            self.writer.close()


# ----------------------------------------------------------------------------------------------------------------
# MFU

# (channels, kernel, stride) of the wav2vec 2.0 / HuBERT / data2vec conv front end
BASE_CONV_LAYERS = ((512, 10, 5),) + ((512, 3, 2),) * 4 + ((512, 2, 2),) * 2


def encoder_flops(cfg, num_samples):
    """Forward FLOPs (multiply-add = 2) of the encoder for ONE clip of `num_samples` samples, counting the conv front
    end, feature projection, positional conv(s), attention projections, QK^T and AV, and FFNs. Norms, activations
    and softmax are ignored (a few %). Training costs about 3x this (forward + backward).

    The conv front end matters: at base size it is ~1/3 of the forward (4.9 of 15.3 GFLOP per second of audio for
    15 s clips).
    Reads cfg.dim, cfg.layers, cfg.ffn and, if present, cfg.conv_layers, cfg.pos_conv_kernel, cfg.pos_conv_groups,
    cfg.pos_conv_depth (defaults: the base conv stack, one k=128 g=16 pos conv)."""
    conv_layers = getattr(cfg, "conv_layers", None) or BASE_CONV_LAYERS
    flops, length, c_in = 0, num_samples, 1
    for c_out, k, s in conv_layers:
        length = (length - k) // s + 1
        if length <= 0:
            return 0
        flops += 2 * c_in * k * c_out * length
        c_in = c_out
    T, d, f = length, cfg.dim, cfg.ffn
    flops += 2 * c_in * d * T  # post_extract_proj
    depth = getattr(cfg, "pos_conv_depth", 1) or 1
    kernel = getattr(cfg, "pos_conv_kernel", 128)
    groups = getattr(cfg, "pos_conv_groups", 16)
    flops += depth * 2 * d * (d // groups) * kernel * T
    per_layer = 2 * 4 * d * d * T + 2 * 2 * T * T * d + 2 * 2 * d * f * T
    return int(flops + cfg.layers * per_layer)


# dense bf16 tensor-core peak per GPU (vendor data sheets, no sparsity); matched against the device name
PEAK_BF16_FLOPS = (
    ("H200", 989e12), ("H100", 989e12), ("H800", 989e12), ("GH200", 989e12), ("B200", 2250e12),
    ("A100", 312e12), ("A800", 312e12), ("L40S", 362e12), ("L40", 181e12), ("L4", 121e12),
    ("A10G", 70e12), ("A10", 125e12), ("A6000", 155e12), ("4090", 165e12), ("3090", 71e12), ("V100", 125e12),
)


def peak_flops_per_s(device, override=None):
    """Peak FLOP/s of one device for MFU, or None when unknown (CPU: MFU is printed as n/a).
    `override` (a number) wins, for GPUs missing from the table."""
    if override:
        return float(override)
    if not str(device).startswith("cuda") or not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name(torch.device(device))
    for key, peak in PEAK_BF16_FLOPS:
        if key in name:
            return peak
    return None


class Throughput:
    """Clips/s, audio-hours/s and MFU over the steps since the last `read()` (global figures: pass global counts)."""

    def __init__(self):
        self.reset()

    def reset(self):
        self.t0 = time.time()
        self.clips = 0
        self.samples = 0
        self.flops = 0.0

    def add(self, clips, samples, flops):
        self.clips += clips
        self.samples += samples
        self.flops += flops

    def read(self, peak_total=None, sample_rate=16000):
        dt = max(time.time() - self.t0, 1e-9)
        out = {"clips/s": self.clips / dt, "audio_h/s": self.samples / sample_rate / 3600 / dt,
               "mfu": (self.flops / dt / peak_total) if peak_total else None}
        self.reset()
        return out
