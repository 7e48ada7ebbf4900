"""The probe heads of probe.py and probing/frames.py: a grid of C layer choices x K learning rates, every head
(softmax-weighted sum over the hidden states -> Linear -> ReLU -> Dropout -> Linear, MARBLE v1's probe) trained
together on the same batches, with its own Adam learning rate and its own plateau / early-stopping schedule.

Heads are grouped by layer choice so that each group is one batched matmul: the K heads of a single state share
their input, one GEMM over [D, K * 512] for all. Every head starts from the same draw and sees the same dropout mask,
as every cell of MARBLE's sweep is a run seeded alike, so a cell of the grid is the head trained alone (to 1e-5,
tests/test_probe.py).
"""
import math

import torch
import torch.nn.functional as F

# MARBLE v1 (benchmark/tasks/*/*_base_config.yaml; MARBLE paper, Appendix A)
HIDDEN = 512  # the MLP's hidden units
DROPOUT = 0.2
LR_FACTOR = 0.5  # ReduceLROnPlateau factor


def layer_choice_mask(choice, num_states):
    """Which hidden states a head mixes. "all": all layers+1 (the Music2Vec/MusicHuBERT paper); "transformer":
    1..layers (MARBLE's code drops the transformer input, state 0); an int: that state alone."""
    mask = torch.zeros(num_states, dtype=torch.bool)
    if choice == "all":
        mask[:] = True
    elif choice == "transformer":
        mask[1:] = True
    else:
        mask[int(choice)] = True
    return mask


class ProbeHeads(torch.nn.Module):
    """Parameters, with C split into Cw weighted choices and Cs single states, K learning rates each:
        mix_logits [Cw, K, S], mix_w1 [Cw, K, D, 512], mix_b1 [Cw, K, 1, 512], mix_w2 [Cw, K, 512, N],
        mix_b2 [Cw, K, 1, N]; one_w1 [Cs, D, K, 512], one_b1 [Cs, 1, K, 512], one_w2 [Cs, K, 512, N],
        one_b2 [Cs, K, 1, N].
    one_w1 keeps K next to the hidden units, so [D, K * 512] is a plain matrix. Every head starts from the same draw
    (the one a single head gets from the same generator), as every cell of MARBLE's sweep is a run seeded alike."""
    K_AXIS = dict(mix_logits=1, mix_w1=1, mix_b1=1, mix_w2=1, mix_b2=1, one_w1=2, one_b1=2, one_w2=1, one_b2=1)

    def __init__(self, layer_choices, num_lrs, num_states, dim, num_classes, generator):
        super().__init__()
        self.choices, K = list(layer_choices), num_lrs
        mix = [i for i, c in enumerate(self.choices) if c in ("all", "transformer")]
        one = [i for i, c in enumerate(self.choices) if c not in ("all", "transformer")]
        self.mix_idx, self.one_idx = torch.tensor(mix, dtype=torch.long), torch.tensor(one, dtype=torch.long)
        self.register_buffer("allowed", torch.stack([layer_choice_mask(self.choices[i], num_states) for i in mix])
                             if mix else torch.zeros(0, num_states, dtype=torch.bool))
        self.register_buffer("states", torch.tensor([int(self.choices[i]) for i in one], dtype=torch.long))
        self.register_buffer("order", torch.argsort(torch.tensor(mix + one, dtype=torch.long)))  # -> user order

        def uniform(*shape, fan_in):  # nn.Linear's default init: U(-1/sqrt(fan_in), 1/sqrt(fan_in))
            bound = 1 / math.sqrt(fan_in)
            return torch.empty(*shape).uniform_(-bound, bound, generator=generator)

        # MARBLE initialises the layer weights with randn (softmax over them); single-state heads have none
        logits = torch.randn(num_states, generator=generator)
        w1, b1 = uniform(dim, HIDDEN, fan_in=dim), uniform(HIDDEN, fan_in=dim)
        w2, b2 = uniform(HIDDEN, num_classes, fan_in=HIDDEN), uniform(num_classes, fan_in=HIDDEN)
        P = lambda t: torch.nn.Parameter(t.contiguous())
        Cw, Cs = len(mix), len(one)
        self.mix_logits = P(logits.expand(Cw, K, -1))
        self.mix_w1, self.mix_b1 = P(w1.expand(Cw, K, -1, -1)), P(b1.expand(Cw, K, 1, -1))
        self.mix_w2, self.mix_b2 = P(w2.expand(Cw, K, -1, -1)), P(b2.expand(Cw, K, 1, -1))
        self.one_w1, self.one_b1 = P(w1[None, :, None].expand(Cs, -1, K, -1)), P(b1.expand(Cs, 1, K, -1))
        self.one_w2, self.one_b2 = P(w2.expand(Cs, K, -1, -1)), P(b2.expand(Cs, K, 1, -1))

    @property
    def num_heads(self):
        return len(self.choices) * self.mix_w2.shape[1]

    def per_param(self, t):
        """t: one value per head, C x K in user order -> {parameter name: t broadcastable against it}."""
        out = {}
        for name, p in self.named_parameters():
            g = t[self.mix_idx.to(t.device)] if name.startswith("mix_") else t[self.one_idx.to(t.device)]
            shape = [1] * p.dim()
            shape[0], shape[self.K_AXIS[name]] = g.shape[0], g.shape[1]
            out[name] = g.reshape(shape)
        return out

    def mix_weights(self):
        """Cw x K x S: the softmax weights of the weighted heads over their allowed states."""
        return self.mix_logits.masked_fill(~self.allowed[:, None], float("-inf")).softmax(-1)

    def layer_weights(self):
        """C x K x S: the softmax weights of weighted heads, one-hot for single-state heads."""
        mixed = self.mix_weights()
        K, S = self.mix_logits.shape[1:]
        one = F.one_hot(self.states, S).to(mixed.dtype)[:, None].expand(-1, K, -1)
        return torch.cat([mixed, one])[self.order]

    def forward(self, x):  # x: B x S x D -> C x K x B x N (user order)
        B = x.shape[0]
        noise = None
        if self.training:  # one dropout mask per step, shared by all heads (as cells seeded alike would draw)
            noise = torch.empty(B, HIDDEN, device=x.device).bernoulli_(1 - DROPOUT).div_(1 - DROPOUT)
        outs = []
        if len(self.mix_idx):  # each weighted head mixes the states its own way, then its own MLP
            Cw, K = self.mix_logits.shape[:2]
            mixed = torch.einsum("hs,bsd->hbd", self.mix_weights().flatten(0, 1), x)
            h = torch.relu(torch.baddbmm(self.mix_b1.flatten(0, 1), mixed, self.mix_w1.flatten(0, 1)))
            if noise is not None:
                h = h * noise
            outs.append(torch.baddbmm(self.mix_b2.flatten(0, 1), h, self.mix_w2.flatten(0, 1)).view(Cw, K, B, -1))
        if len(self.one_idx):  # the K heads of a state share its input: one GEMM per state, batched over states
            Cs, D, K, Hd = self.one_w1.shape
            xs = x.transpose(0, 1)[self.states]  # Cs x B x D; no gradient flows into the data
            h = torch.relu(torch.baddbmm(self.one_b1.view(Cs, 1, K * Hd), xs, self.one_w1.view(Cs, D, K * Hd)))
            h = h.view(Cs, B, K, Hd)
            if noise is not None:
                h = h * noise[:, None]
            outs.append(torch.einsum("cbkh,ckhn->ckbn", h, self.one_w2) + self.one_b2)
        return torch.cat(outs)[self.order] if len(outs) > 1 else outs[0]

    def _where(self, c):
        c = int(c)
        if c in self.mix_idx.tolist():
            return "mix", self.mix_idx.tolist().index(c)
        return "one", self.one_idx.tolist().index(c)

    def head_state(self, c, k):
        """Head (choice c, lr k) as plain tensors: layer_weights [S], w1 [D, 512], b1, w2 [512, N], b2."""
        group, i = self._where(c)
        lw = self.layer_weights()[c, k]
        if group == "mix":
            t = dict(layer_logits=self.mix_logits[i, k], w1=self.mix_w1[i, k], b1=self.mix_b1[i, k, 0],
                     w2=self.mix_w2[i, k], b2=self.mix_b2[i, k, 0])
        else:
            t = dict(w1=self.one_w1[i, :, k], b1=self.one_b1[i, 0, k], w2=self.one_w2[i, k], b2=self.one_b2[i, k, 0])
        return {"layer_weights": lw.detach().cpu().clone(), **{n: v.detach().cpu().clone() for n, v in t.items()}}

    @torch.no_grad()
    def load_head_state(self, c, k, state):
        group, i = self._where(c)
        if group == "mix":
            self.mix_logits[i, k] = state["layer_logits"]
            self.mix_w1[i, k], self.mix_b1[i, k, 0] = state["w1"], state["b1"]
            self.mix_w2[i, k], self.mix_b2[i, k, 0] = state["w2"], state["b2"]
        else:
            self.one_w1[i, :, k], self.one_b1[i, 0, k] = state["w1"], state["b1"]
            self.one_w2[i, k], self.one_b2[i, k, 0] = state["w2"], state["b2"]


class HeadAdam:
    """torch.optim.Adam (weight decay 0) on the stacked heads, with one learning rate per head (lr: C x K), so that
    every head of the grid keeps its own lr and its own ReduceLROnPlateau schedule. Same arithmetic as torch's
    single-tensor Adam."""

    def __init__(self, heads, lrs, betas=(0.9, 0.999), eps=1e-8):
        self.heads, self.lr, self.betas, self.eps, self.t = heads, lrs.clone(), betas, eps, 0
        self.params = dict(heads.named_parameters())
        self.m = {n: torch.zeros_like(p) for n, p in self.params.items()}
        self.v = {n: torch.zeros_like(p) for n, p in self.params.items()}
        # one scratch buffer for the update, reused by every parameter: the sweep's weights are 84 x 768 x 512, and
        # a fresh temporary of that size costs more (new pages) than the arithmetic on it
        scratch = torch.empty(max(p.numel() for p in self.params.values()), device=lrs.device)
        self.scratch = {n: scratch[:p.numel()].view(p.shape) for n, p in self.params.items()}

    @torch.no_grad()
    def step(self):
        self.t += 1
        b1, b2 = self.betas
        bc1, bc2 = 1 - b1 ** self.t, 1 - b2 ** self.t
        # lr/bc1 * m / (sqrt(v)/sqrt(bc2) + eps) computed as (m / (sqrt(v) + eps * sqrt(bc2))) * lr * sqrt(bc2)/bc1
        steps = self.heads.per_param(self.lr * (math.sqrt(bc2) / bc1))
        for n, p in self.params.items():
            if p.grad is None or p.numel() == 0:
                continue
            m, v, u = self.m[n], self.v[n], self.scratch[n]
            m.lerp_(p.grad, 1 - b1)
            v.mul_(b2).addcmul_(p.grad, p.grad, value=1 - b2)
            torch.sqrt(v, out=u).add_(self.eps * math.sqrt(bc2))
            torch.div(m, u, out=u).mul_(steps[n])
            p.sub_(u)


class HeadSchedule:
    """Per head of a C x K grid, MARBLE's Lightning callbacks: ReduceLROnPlateau (mode max, factor 0.5, threshold 1e-4
    relative) on the head's lr in `opt`, EarlyStopping (stops after `patience` epochs without a strictly better
    score), ModelCheckpoint (keeps the weights of the first best). A stopped head keeps its best weights and gets lr 0.
    Both trainers (train_heads; probing.frames.train_beat_heads) call step() once an epoch, restore() at the end."""

    def __init__(self, heads, opt, patience, plateau_patience, monitor, log=print):
        H = heads.num_heads
        self.heads, self.opt, self.monitor, self.log = heads, opt, monitor, log
        self.patience, self.plateau_patience = patience, plateau_patience
        self.params = dict(heads.named_parameters())
        self.best_state = {k: v.detach().clone() for k, v in self.params.items()}
        self.best = torch.full((H,), float("-inf"))
        self.best_epoch = torch.zeros(H, dtype=torch.long)  # 0-based
        self.plateau_best = torch.full((H,), float("-inf"))
        self.plateau_bad = torch.zeros(H, dtype=torch.long)
        self.since_best = torch.zeros(H, dtype=torch.long)
        self.active = torch.ones(H, dtype=torch.bool)

    @torch.no_grad()
    def step(self, epoch, scores):
        """scores: the epoch's validation score of every head, C x K flattened choice-major (NaN: no score). Keeps
        the improved heads' weights, sets the lrs; returns whether any head trains on."""
        scores = torch.nan_to_num(torch.as_tensor(scores, dtype=torch.float32).reshape(-1), nan=float("-inf"))
        lrs = self.opt.lr
        per_cell = lambda t: t.view(lrs.shape).to(lrs.device)
        improved = self.active & (scores > self.best)
        for name, m in self.heads.per_param(per_cell(improved)).items():
            torch.where(m, self.params[name], self.best_state[name], out=self.best_state[name])
        self.best = torch.where(improved, scores, self.best)
        self.best_epoch[improved] = epoch
        self.since_best = torch.where(improved, 0, self.since_best + 1)
        # ReduceLROnPlateau(mode="max", threshold_mode="rel"): better means above best * (1 + 1e-4)
        plateau_improved = scores > self.plateau_best * (1 + 1e-4)
        self.plateau_best = torch.where(plateau_improved, scores, self.plateau_best)
        self.plateau_bad = torch.where(plateau_improved, 0, self.plateau_bad + 1)
        cut = self.plateau_bad > self.plateau_patience
        self.plateau_bad[cut] = 0
        self.active &= self.since_best < self.patience
        lrs = torch.where(per_cell(cut), lrs * LR_FACTOR, lrs)
        self.opt.lr = torch.where(per_cell(self.active), lrs, torch.zeros_like(lrs))
        if len(scores) == 1:
            self.log(f"epoch {epoch + 1:3d}  valid {self.monitor} {scores[0]:.4f}  best {self.best[0]:.4f}  lr "
                     f"{self.opt.lr.flatten()[0]:.2e}")
        elif epoch % 10 == 0 or not self.active.any():
            self.log(f"epoch {epoch + 1:3d}  {int(self.active.sum())}/{len(scores)} heads training  best valid "
                     f"{self.monitor} {self.best.max():.4f}")
        return bool(self.active.any())

    @torch.no_grad()
    def restore(self):
        """Every head back to its best-validation weights."""
        for name, p in self.params.items():
            p.copy_(self.best_state[name])


def grid_results(choices, lrs, heads, sched, metrics_of):
    """One entry per head in MARBLE's sweep order (lr-major): its cell (c, k), best validation score and epoch, layer
    weights, and metrics_of(h) = (valid, test) metrics of head h = c * K + k at its best weights."""
    weights = heads.layer_weights().detach().cpu()
    results = []
    for k in range(len(lrs)):
        for c in range(len(choices)):
            h = c * len(lrs) + k
            valid, test = metrics_of(h)
            results.append(dict(layers=choices[c], lr=lrs[k], best_epoch=int(sched.best_epoch[h]) + 1,
                                best_valid=float(sched.best[h]), valid=valid, test=test,
                                layer_weights=[round(float(w), 4) for w in weights[c, k]], cell=(c, k)))
    return results


def validation_best(results):
    """The reported cell: the best validation score (the first in grid order on ties), with the test score of its
    best-validation weights (MARBLE paper, Appendix A)."""
    return max(results, key=lambda r: r["best_valid"])  # max keeps the first of equal keys
