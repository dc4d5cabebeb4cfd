"""One fused forward over inference rows and fine-tuning rows; backward a few layers at a time.

Inference rows run exactly as in CausalLM.forward (paged KV cache, per-request adapters). Training
rows (chunks of training sequences, absolute positions kept like chunked prefill) share every
projection's matmul with them: `coserved_linear` runs the base projection (and the inference
adapters) once over [inference rows | training rows] without autograd, then hands the training
rows' part to `FrozenBaseGrad`, whose backward is dx = dy W0 (QLoRA-style: gradients flow through
the frozen, possibly quantized base; nothing of the inference rows is saved). The job's adapter
update is added to the training rows with ordinary autograd. Norms, rope, attention and the
activation run per stream, so autograd keeps activations of training rows only.

Each layer's training input is a fresh leaf, so the graph is cut at layer boundaries: backward
walks them top layer first, a few per engine step (`backward_layers`), like FlexLLM.
Training sequences keep their own K/V per layer (with their graph), not in the paged pool.

A pass forwarded in several chunks (co-served under a latency bound: ~40 tokens a step) can instead
recompute (`PassState.recompute`, activation checkpointing per layer): chunks run without autograd and
keep only each layer's input; a backward stage re-runs its layer over the whole pass with autograd and
back-propagates one graph. A layer's graph built chunk by chunk holds one sub-graph per chunk, each with
its own small matmuls, and cost twice a whole-pass backward; the extra forward costs less than that.
"""

from __future__ import annotations

import threading
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from coserve.adapters.layers import PACKED_PARTS, base_weight
from coserve.engine.model import CausalLM
from coserve.engine.training.params import TrainableAdapter
from coserve.kernels.attention import AttentionMetadata

IGNORE = -100  # label of rows that carry no loss (prompt / non-assistant tokens)
# Labelled rows per piece of the loss head: a piece's float32 logits ([64, 49,152]: 12.6 MB) stay in the CPU's
# cache and below glibc's mmap threshold; [256, 49,152] at once took 57 ms forward and backward against 20
HEAD_ROWS = 64


class FrozenBaseGrad(torch.autograd.Function):
    """Semantics: forward returns y (= x W0^T + b, computed outside autograd in the fused matmul);
    backward returns dx = dy W0 with W0 [out, in] the served base weight (dequantized), no dW0.
    x [T, in], y [T, out] -> [T, out]."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, y: torch.Tensor, linear: nn.Module) -> torch.Tensor:
        ctx.linear = linear
        return y.view_as(y)

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        return dy @ compute_weight(ctx.linear, dy.dtype), None, None  # [T, out] @ [out, in]


_backward = threading.local()  # per engine thread: the weights one backward call has made plain ({} inside it)


@contextmanager
def _frozen_weights_made_once():
    """Inside: each frozen linear is unpacked / dequantized once, however many training chunks went through
    it (a layer's backward runs FrozenBaseGrad once per chunk; co-served in 16-token chunks, unpacking per
    call was ~1 ms each and 40% of the step). Holds one layer's weights at a time."""
    _backward.weights = {}
    try:
        yield
    finally:
        _backward.weights = None


def compute_weight(linear: nn.Module, dtype: torch.dtype) -> torch.Tensor:
    """_plain_weight, made once per backward call (see _frozen_weights_made_once)."""
    made = getattr(_backward, "weights", None)
    if made is None:
        return _plain_weight(linear, dtype)
    key = (id(linear), dtype)
    if key not in made:
        made[key] = _plain_weight(linear, dtype)
    return made[key]


def _plain_weight(linear: nn.Module, dtype: torch.dtype) -> torch.Tensor:
    """The base weight [out, in] in the compute dtype: the parameter itself when the base is not quantized
    (no copy), unpacked from a pre-packed linear, else dequantized (bf16 matmuls are several times faster
    than float32 ones on CPUs with AVX512-BF16/AMX)."""
    if hasattr(linear, "plain_weight"):  # a pre-packed linear (PackedLinear)
        return linear.plain_weight(dtype)
    weight = getattr(linear, "weight", None)
    if isinstance(weight, torch.Tensor) and weight.dtype == dtype:
        return weight.detach()
    return base_weight(linear).to(dtype)


@dataclass
class TrainRows:
    """One training sequence's chunk in this step."""

    key: int  # the sequence within the pass
    token_ids: list[int]  # this chunk's tokens
    start: int  # absolute position of token_ids[0]; earlier positions were run in previous chunks
    labels: list[int]  # per token: the next token to predict, or IGNORE


@dataclass
class PassState:
    """A micro-batch's forward (over several steps) and its pending backward."""

    num_layers: int
    loss_scale: float  # 1 / label tokens in the optimizer batch: gradients average over the batch
    grad: bool = True  # False: evaluation (validation loss), nothing kept for backward
    kv: dict[int, list[list[torch.Tensor]]] = field(default_factory=dict)  # seq -> [layer] -> [k, v]
    layer_io: list[list[tuple[torch.Tensor, torch.Tensor]]] = field(default_factory=list)  # [layer] -> (in, out)
    head: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)  # (final input leaf, loss)
    next_backward: int | None = None  # None: head not done yet; else the next layer to run backward on
    loss_sum: float = 0.0  # sum of token losses so far (unscaled)
    num_label_tokens: int = 0
    recompute: bool = False  # chunks forwarded without autograd; each layer re-run over the pass at backward
    spans: list[tuple[int, int, int]] = field(default_factory=list)  # recompute: (seq, start, n) per forwarded row
    layer_inputs: list[list[torch.Tensor]] = field(default_factory=list)  # recompute: [layer] -> chunk inputs
    pass_grad: torch.Tensor | None = None  # recompute: d loss / d (next layer's input), pass order [T, hidden]

    def __post_init__(self):
        self.layer_io = [[] for _ in range(self.num_layers)]
        self.layer_inputs = [[] for _ in range(self.num_layers)]

    @property
    def tracks_graph(self) -> bool:
        """Whether the forward keeps autograd graphs of the layers (else they are recomputed, or not needed)."""
        return self.grad and not self.recompute

    @property
    def backward_done(self) -> bool:
        return self.next_backward is not None and self.next_backward < 0


def coserved_linear(linear: nn.Module, packed: str, layer: int, x_inf: torch.Tensor, x_tr: torch.Tensor,
                    adapter: TrainableAdapter) -> tuple[torch.Tensor, torch.Tensor]:
    """x_inf [Ti, in], x_tr [Tt, in] -> (y_inf [Ti, out], y_tr [Tt, out]); one base matmul for both."""
    n_inf = x_inf.shape[0]
    base = getattr(linear, "base", linear)  # under the serving adapters' wrapper, if any
    with torch.no_grad():  # without inference rows, the wrapper (which may hold another step's rows) has no work
        y_all = linear(torch.cat([x_inf, x_tr.detach()])) if n_inf else base(x_tr.detach())  # [Ti + Tt, out]
    y_inf, y_tr = y_all[:n_inf], y_all[n_inf:]
    if torch.is_grad_enabled():
        y_tr = FrozenBaseGrad.apply(x_tr, y_tr, base)
    parts = PACKED_PARTS[packed]
    modules = [adapter.module(layer, part) for part in parts]
    if any(m is not None for m in modules) and all(m is None or m.plain_lora for m in modules):
        return y_inf, _packed_lora(x_tr, y_tr, [adapter.shape.module_shapes[p][0] for p in parts], modules)
    lo, pieces, changed = 0, [], False
    bias = getattr(base, "bias", None)
    for part, module in zip(parts, modules):
        size = adapter.shape.module_shapes[part][0]  # this part's output features
        piece = y_tr[:, lo : lo + size]
        if module is not None:
            rows = slice(lo, lo + size)
            piece = module.apply(x_tr, piece, None if bias is None else bias[rows],
                                 lambda rows=rows: base_weight(base)[rows])
            changed = True
        pieces.append(piece)
        lo += size
    return y_inf, torch.cat(pieces, 1) if changed else y_tr


def _packed_lora(x: torch.Tensor, y: torch.Tensor, sizes: list[int], modules: list) -> torch.Tensor:
    """Plain LoRA (no DoRA, no gate) on every trained part of a packed linear in few ops: one shrink with
    the parts' A stacked (x read once), one small expand per part, one add of all the deltas.
    x [T, in], y [T, sum sizes] the base output -> y + [s_p B_p A_p x for each part] ([T, sum sizes])."""
    trained = [m for m in modules if m is not None]
    a = trained[0].lora_A if len(trained) == 1 else torch.cat([m.lora_A for m in trained])  # [sum r, in]
    h = x.float() @ a.T  # [T, sum r]
    deltas, lo = [], 0
    for size, m in zip(sizes, modules):
        if m is None:
            deltas.append(h.new_zeros(h.shape[0], size))
            continue
        r = m.lora_A.shape[0]
        deltas.append((h[:, lo : lo + r] * m.scale) @ m.lora_B.T)  # [T, size]
        lo += r
    delta = deltas[0] if len(deltas) == 1 else torch.cat(deltas, 1)
    return y + delta.to(y.dtype)


def _train_attention(attn, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rows: list[tuple[int, int]],
                     kv: dict[int, list[list[torch.Tensor]]], num_layers: int, layer: int) -> torch.Tensor:
    """Causal attention of each training chunk over its sequence's earlier chunks (their K/V in `kv`) and
    itself. rows: (sequence, tokens) per chunk. q [Tt, H, D], k / v [Tt, Hkv, D] -> [Tt, H * D]."""
    outs, lo = [], 0
    for key, n in rows:
        cache = kv.setdefault(key, [[] for _ in range(num_layers)])[layer]
        ks, vs = (torch.cat([cache[0], k[lo : lo + n]]), torch.cat([cache[1], v[lo : lo + n]])) if cache \
            else (k[lo : lo + n], v[lo : lo + n])
        cache[:] = [ks, vs]  # [P + n, Hkv, D]
        total = ks.shape[0]
        # query i sits at position total - n + i and sees keys 0 .. total - n + i
        mask = None if total == n else torch.arange(total)[None, :] <= (torch.arange(n)[:, None] + total - n)
        out = F.scaled_dot_product_attention(q[lo : lo + n].transpose(0, 1)[None], ks.transpose(0, 1)[None],
                                             vs.transpose(0, 1)[None], attn_mask=mask, is_causal=mask is None,
                                             scale=attn.scale, enable_gqa=True)  # [1, H, n, D]
        outs.append(out[0].transpose(0, 1).reshape(n, -1))
        lo += n
    return torch.cat(outs)


@dataclass
class _Stream:
    """One layer's view of the training rows: their chunks, rope tables and K/V of earlier chunks."""

    rows: list[tuple[int, int]]  # (sequence, tokens) per chunk, in row order
    cos: torch.Tensor  # [Tt, head_dim]
    sin: torch.Tensor
    kv: dict[int, list[list[torch.Tensor]]]  # seq -> [layer] -> [k, v]
    num_layers: int


def _layer_forward(layer, i: int, x_inf: torch.Tensor, inf_rope: tuple, meta: AttentionMetadata | None, kv_cache,
                   x_in: torch.Tensor, stream: _Stream, adapter: TrainableAdapter) -> tuple[torch.Tensor, torch.Tensor]:
    """One decoder layer over inference rows (no autograd; x_inf [Ti, hidden]) and training rows (autograd as
    the caller's mode sets it; x_in [Tt, hidden]), sharing each projection's base matmul.
    -> (x_inf, x_tr) after the layer."""
    attn, mlp = layer.self_attn, layer.mlp
    with torch.no_grad():
        h_inf = layer.input_layernorm(x_inf)
    qkv_i, qkv_t = coserved_linear(attn.qkv_proj, "self_attn.qkv_proj", i, h_inf, layer.input_layernorm(x_in), adapter)
    with torch.no_grad():
        a_inf = attn.paged(*attn.split_heads(qkv_i, *inf_rope), meta, kv_cache) if meta is not None \
            else qkv_i.new_zeros(0, attn.num_heads * attn.head_dim)
    a_tr = _train_attention(attn, *attn.split_heads(qkv_t, stream.cos, stream.sin), stream.rows, stream.kv,
                            stream.num_layers, i)
    o_i, o_t = coserved_linear(attn.o_proj, "self_attn.o_proj", i, a_inf, a_tr, adapter)
    with torch.no_grad():
        x_inf = x_inf + o_i
        m_inf = layer.post_attention_layernorm(x_inf)
    x_mid = x_in + o_t
    gu_i, gu_t = coserved_linear(mlp.gate_up_proj, "mlp.gate_up_proj", i, m_inf,
                                 layer.post_attention_layernorm(x_mid), adapter)
    with torch.no_grad():
        act_i = mlp.act(gu_i)
    d_i, d_t = coserved_linear(mlp.down_proj, "mlp.down_proj", i, act_i, mlp.act(gu_t), adapter)
    with torch.no_grad():
        x_inf = x_inf + d_i
    return x_inf, x_mid + d_t


def coserved_forward(
    model: CausalLM,
    input_ids: torch.Tensor,  # [Ti] inference tokens
    positions: torch.Tensor,  # [Ti]
    meta: AttentionMetadata | None,  # of the inference rows (None when there are none)
    kv_caches: list,
    rows: list[TrainRows],
    state: PassState,
    adapter: TrainableAdapter,
) -> torch.Tensor:
    """Run inference rows and one chunk of each training sequence; returns the inference hidden states
    [Ti, hidden]. Training activations go to `state` (for backward) and the chunk's loss into it."""
    keep_inputs = state.grad and state.recompute
    with torch.set_grad_enabled(state.grad):
        tr_ids = torch.tensor([t for r in rows for t in r.token_ids], dtype=torch.long)  # [Tt]
        tr_pos = torch.tensor([p for r in rows for p in range(r.start, r.start + len(r.token_ids))])
        with torch.no_grad():
            x_inf = model.model.embed_tokens(input_ids)
            x_tr = model.model.embed_tokens(tr_ids)
            inf_rope = model.rope(positions, x_inf.dtype)
        stream = _Stream([(r.key, len(r.token_ids)) for r in rows], *model.rope(tr_pos, x_tr.dtype), state.kv,
                         state.num_layers)
        if keep_inputs:
            state.spans.extend((r.key, r.start, len(r.token_ids)) for r in rows)
        with torch.set_grad_enabled(state.tracks_graph):
            for i, (layer, kv) in enumerate(zip(model.model.layers, kv_caches)):
                x_in = x_tr.detach().requires_grad_(state.tracks_graph)  # the graph is cut at each layer boundary
                if keep_inputs:
                    state.layer_inputs[i].append(x_in)
                x_inf, x_tr = _layer_forward(layer, i, x_inf, inf_rope, meta, kv, x_in, stream, adapter)
                if state.tracks_graph:
                    state.layer_io[i].append((x_in, x_tr))
        _head_loss(model, x_tr, rows, state)
        with torch.no_grad():
            return model.model.norm(x_inf)


def _head_loss(model: CausalLM, x_tr: torch.Tensor, rows: list[TrainRows], state: PassState) -> None:
    """Cross-entropy of the chunk's labelled rows (summed; scaled for the backward)."""
    labels = torch.tensor([t for r in rows for t in r.labels], dtype=torch.long)  # [Tt]
    keep = (labels != IGNORE).nonzero().flatten()
    x_last = x_tr.detach().requires_grad_(state.grad)
    losses = []
    for piece in keep.split(HEAD_ROWS):
        hidden = model.model.norm(x_last.index_select(0, piece))  # [k, hidden]
        with torch.no_grad():
            logits = model.lm_head(hidden)  # [k, vocab]
        # dx = dy W through compute_weight, so a packed lm_head is unpacked once per backward call, not per chunk
        logits = FrozenBaseGrad.apply(hidden, logits, model.lm_head).float()
        losses.append(F.cross_entropy(logits, labels.index_select(0, piece), reduction="sum"))
    loss = torch.stack(losses).sum() if losses else x_last.sum() * 0.0
    state.loss_sum += float(loss.detach())
    state.num_label_tokens += keep.numel()
    if state.grad:
        state.head.append((x_last, loss * state.loss_scale))


def backward_layers(state: PassState, num_layers: int, model: CausalLM | None = None,
                    adapter: TrainableAdapter | None = None) -> int:
    """Run backward for up to `num_layers` stages (the loss head counts as one), top layer first.
    Returns the stages run; adapter gradients accumulate in the parameters' .grad. A recomputing pass
    needs the model and the adapter to re-run its layers."""
    done = 0
    while done < num_layers and not state.backward_done:
        if state.next_backward is None:
            with _frozen_weights_made_once():
                torch.autograd.backward([loss for _, loss in state.head])
            if state.recompute:
                state.pass_grad = torch.cat([x.grad for x, _ in state.head]).index_select(0, _pass_order(state))
                state.head, state.kv = [], {}  # a recomputed layer makes its own K/V
            state.next_backward = state.num_layers - 1
        elif state.recompute:
            _recomputed_layer_backward(model, adapter, state, state.next_backward)
            state.next_backward -= 1
        else:
            i = state.next_backward
            below = state.layer_io[i + 1] if i + 1 < state.num_layers else None
            grads = [x.grad for x, _ in (below if below is not None else state.head)]
            outs = [(out, g) for (_, out), g in zip(state.layer_io[i], grads) if g is not None and out.requires_grad]
            if outs:
                with _frozen_weights_made_once():
                    torch.autograd.backward([o for o, _ in outs], [g for _, g in outs])
            if below is not None:
                state.layer_io[i + 1] = []
            else:
                state.head = []
            for per_layer in state.kv.values():
                per_layer[i] = []
            state.next_backward = i - 1
        done += 1
    if state.backward_done:
        state.layer_io, state.layer_inputs, state.kv, state.pass_grad = [], [], {}, None
    return done


def _pass_order(state: PassState) -> torch.Tensor:
    """Rows of the forwarded chunks (in forward order) -> pass order: each sequence's tokens contiguous and in
    position order, sequences by key. [T] indices into the chunks' rows concatenated."""
    offsets, lo = [], 0
    for key, start, n in state.spans:
        offsets.append((key, start, lo, n))
        lo += n
    offsets.sort()
    return torch.cat([torch.arange(lo, lo + n) for _, _, lo, n in offsets])


def _pass_sequences(state: PassState) -> list[tuple[int, int]]:
    """(sequence, tokens) in pass order; each sequence was forwarded from position 0 without gaps."""
    lengths: dict[int, int] = {}
    for key, start, n in sorted(state.spans):
        if start != lengths.get(key, 0):
            raise RuntimeError(f"training sequence {key} was forwarded with a gap at position {start}")
        lengths[key] = start + n
    return sorted(lengths.items())


def _recomputed_layer_backward(model: CausalLM, adapter: TrainableAdapter, state: PassState, i: int) -> None:
    """Re-run layer i over the whole pass with autograd (one graph, every sequence at once), back-propagate
    the gradient of its output, and leave the gradient of its input for layer i - 1 in state.pass_grad."""
    x_in = torch.cat(state.layer_inputs[i]).index_select(0, _pass_order(state)).requires_grad_(True)  # [T, hidden]
    state.layer_inputs[i] = []
    sequences = _pass_sequences(state)
    positions = torch.cat([torch.arange(n) for _, n in sequences])  # [T]
    stream = _Stream(sequences, *model.rope(positions, x_in.dtype), {}, state.num_layers)
    x_inf = x_in.new_zeros(0, x_in.shape[1])
    with torch.enable_grad():
        _, x_out = _layer_forward(model.model.layers[i], i, x_inf, (None, None), None, None, x_in, stream, adapter)
    if x_out.requires_grad:
        with _frozen_weights_made_once():
            torch.autograd.backward([x_out], [state.pass_grad])
    state.pass_grad = x_in.grad if x_in.grad is not None else torch.zeros_like(x_in)
