"""The operators of one training step, counted, not timed (bench.py sections 6 and 7; paper 2.1.2's packed step).

- Kinds of operation (OP_CLASSES, op_class, by_class): aten operators and CUDA kernels sorted into matmul,
  attention, RoPE, norms, casts, ..., for the profile (section 6) and for the count (section 7).
- The count (traffic_section, `python bench.py --traffic GPU`): one eager bf16 step of the packed batch on
  fake tensors (shapes only, so the paper's batch of `base` counts in seconds on any machine), the FLOPs and
  bytes of every aten operator (OpCounter), CUDA autocast's float32 layer norm (CudaLayerNormPolicy), attention
  by formula as varlen does its work (attention_by_formula), and the least time the named GPU (GPUS) needs.

Imports model (its attention swapped for the formula), pack, views (Batch), train (the loss whose step it
counts), lejepa (the paper's lambda) and torch. bench.py imports this module.
"""
import copy
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_map
from torch.utils.flop_counter import flop_registry

import model as model_lib
from lejepa import PAPER_LAMBD
from model import model_flops_per_token
from pack import Packed
from train import compute_loss
from views import Batch

# section 6: kinds of operation, matched in order against lower-cased aten operator or CUDA kernel names.
# Inductor's pointwise/reduction kernels first: they are named after the ops they fuse
# ("triton_poi_fused_addmm_gelu" is a bias add and GELU, not a GEMM). Attention before GEMMs: flash and
# memory-efficient kernels carry "cutlass" in their template arguments ("fmha_cutlassF_...").
OP_CLASSES = (("compiled fused kernels", ("triton_poi", "triton_per", "triton_red", "cpp_fused")),
              ("attention", ("flash", "fmha", "attention", "sdpa")),
              ("matmul", ("gemm", "nvjet", "cutlass", "xmma", "triton_tem", "::mm", "addmm", "bmm", "matmul", "linear")),
              ("compiled fused kernels", ("triton",)),
              ("RoPE (addcmul, flip)", ("addcmul", "flip")),
              ("layer norm", ("layer_norm", "gammabeta")),
              ("GELU", ("gelu",)),
              ("gather / scatter", ("index", "gather", "scatter")),
              ("casts and copies", ("copy", "clone", "cat", "stack")),
              ("reductions", ("reduce", "sum", "mean")),
              ("other elementwise", ("elementwise", "add", "mul", "sub", "div", "neg", "where", "fill", "zero")))
# dense (no sparsity) bf16 tensor-core peak TFLOP/s and memory bandwidth TB/s, by a fragment of
# torch.cuda.get_device_name() (or --traffic GPU); first match
GPUS = (("H100 PCIe", 756, 2.0, "H100 PCIe"), ("H100 NVL", 835, 3.9, "H100 NVL"), ("H100", 989, 3.35, "H100 SXM"),
        ("H200", 989, 4.8, "H200"), ("A100", 312, 2.0, "A100 80GB"), ("L40S", 362, 0.864, "L40S"),
        ("RTX PRO 6000", 500, 1.79, "RTX PRO 6000 Blackwell (approximate)"))


def op_class(name: str) -> str:
    name = name.lower()
    return next((label for label, keys in OP_CLASSES if any(k in name for k in keys)), "other")


def by_class(tallies) -> dict[str, dict]:
    """(operator name, {"s": seconds, other numbers...}) -> per kind of operation (op_class): the numbers
    summed, "calls" counted, and "largest", the operator with the most seconds. Sorted by seconds, most first."""
    classes, seconds = {}, {}
    for name, numbers in tallies:
        kind = op_class(name)
        c = classes.setdefault(kind, {"calls": 0})
        c["calls"] += numbers.pop("calls", 1)
        for key, v in numbers.items():
            c[key] = c.get(key, 0) + v
        per_name = seconds.setdefault(kind, {})
        per_name[name] = per_name.get(name, 0) + numbers["s"]
    for kind, c in classes.items():
        c["largest"] = max(seconds[kind], key=seconds[kind].get)
    return dict(sorted(classes.items(), key=lambda kv: -kv[1]["s"]))


class _ShapeOnlyAttention(torch.autograd.Function):
    """Stands in for packed attention in section 7: right shapes, no work (it is counted by formula)."""

    @staticmethod
    def forward(ctx, q, k, v):
        out = torch.empty_like(q)
        ctx.save_for_backward(q, k, v, out)  # what flash attention keeps for backward (less its small logsumexp)
        return out

    @staticmethod
    def backward(ctx, grad):
        return torch.empty_like(grad), torch.empty_like(grad), torch.empty_like(grad)


@contextmanager
def attention_by_formula(backbone):
    """Section 7 counts attention as varlen does its work (sum of n^2 per view), on the tokens in the packed
    order: the rows flag keeps the CPU's sdpa from reordering them into its dense layout, as on CUDA."""
    saved = model_lib.packed_attention, model_lib.attention_mask, backbone.sdpa_rows
    model_lib.packed_attention = lambda q, k, v, *rest: _ShapeOnlyAttention.apply(q, k, v)
    model_lib.attention_mask = lambda *a, **k: None
    backbone.sdpa_rows = True
    try:
        yield
    finally:
        model_lib.packed_attention, model_lib.attention_mask, backbone.sdpa_rows = saved


class CudaLayerNormPolicy(TorchFunctionMode):
    """CPU autocast runs layer_norm in its input's dtype, CUDA autocast in float32: count CUDA's way.

    The other ops this model runs under autocast (linear, matmul) follow the same policy on both.
    """

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.layer_norm and torch.is_autocast_enabled("cpu"):
            up = lambda t: t.float() if isinstance(t, torch.Tensor) and t.is_floating_point() else t  # noqa: E731
            args, kwargs = tree_map(up, args), tree_map(up, kwargs)
        return func(*args, **kwargs)


class OpCounter(TorchDispatchMode):
    """FLOPs (torch.utils.flop_counter's formulas) and bytes read + written of every aten operator.

    Views move nothing, allocations touch nothing and metadata queries return no tensor, so none of
    them counts; a broadcast input counts its storage once.
    """

    def __init__(self):
        super().__init__()
        self.ops = {}  # aten name -> [calls, bytes, flops]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        name = func._schema.name
        is_view = any(r.alias_info is not None and not r.alias_info.is_write for r in func._schema.returns)
        if is_view or name.startswith("aten::empty"):
            return out
        outs = [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)]
        if not outs:  # prim::device and the like: metadata, no memory traffic
            return out
        written_only = args[1:] if name == "aten::copy_" else args  # a copy writes its destination, never reads it
        reads = tree_flatten((written_only, {k: v for k, v in kwargs.items() if k != "out"}))[0]  # out= too
        tensors = [t for t in reads if isinstance(t, torch.Tensor)] + outs
        moved = sum(min(t.numel() * t.element_size(), t.untyped_storage().nbytes()) for t in tensors)
        flops = flop_registry[func.overloadpacket](*args, **kwargs, out_val=out) if func.overloadpacket in flop_registry else 0
        c = self.ops.setdefault(name, [0, 0, 0])
        c[0], c[1], c[2] = c[0] + 1, c[1] + moved, c[2] + flops
        return out


def traffic_section(args, net, batch: Batch) -> tuple[list[dict], str]:
    """Section 7 (--traffic GPU): what one eager bf16 step of the packed batch asks of a GPU, counted, not timed.

    The step (forward + backward of the LeJEPA loss under bf16 autocast) runs on fake tensors: shapes
    and dtypes only, no memory and no arithmetic, so the paper's batch of `base` counts in seconds on
    any machine. Each operator needs at least max(FLOPs / peak, bytes / bandwidth) on the named GPU;
    their sum bounds the eager step from below, and model FLOPs over it bounds eager MFU from above.
    Attention is counted by formula as varlen does it: 4 d n^2 FLOPs per view and layer forward,
    2.5 times that backward, q, k, v, out (and their gradients) through memory once.
    """
    key = (args.traffic or "H100").lower()
    gpu = next((g for g in GPUS if key in (g[0].lower(), g[3].lower())), None) or \
        next((g for g in GPUS if key in g[3].lower().split()), None)
    if gpu is None:
        raise SystemExit(f"--traffic {args.traffic!r}: unknown GPU; known: {', '.join(g[3] for g in GPUS)}")
    peak, bandwidth, label = gpu[1] * 1e12, gpu[2] * 1e12, gpu[3]
    config = net.backbone.config
    net, counter, saved = copy.deepcopy(net), OpCounter(), {}  # the caller's model stays a real one

    def keep(t):  # activations autograd keeps for backward, by storage: views of one tensor count once
        saved[t.untyped_storage()._cdata] = t.untyped_storage().nbytes()
        return t

    with FakeTensorMode() as fake, attention_by_formula(net.backbone):
        net = net._apply(fake.from_tensor)
        b = batch._map(lambda t: t._map(fake.from_tensor) if isinstance(t, Packed) else fake.from_tensor(t))
        with counter, CudaLayerNormPolicy():
            with torch.autocast("cpu", dtype=torch.bfloat16), torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
                loss, *_ = compute_loss(net, b, "lejepa", PAPER_LAMBD, 0)
            loss.backward()
    params = sum(p.numel() for p in net.parameters())
    d, depth, tokens, seqlens = config["dim"], config["depth"], batch.packed.n_tokens, batch.packed.seqlens
    classes = by_class((name, {"calls": calls, "bytes": moved, "flops": flops, "s": max(flops / peak, moved / bandwidth)})
                       for name, (calls, moved, flops) in counter.ops.items())
    flops = 3.5 * 4 * d * sum(n * n for n in seqlens) * depth
    moved = 12 * tokens * d * 2 * depth  # bf16 q, k, v, out forward; q, k, v, out, dout, dq, dk, dv backward
    attention = "attention (varlen, by formula)"  # the stand-in above ran none: counted here instead
    classes[attention] = {"calls": 2 * depth, "bytes": moved, "flops": flops, "s": max(flops / peak, moved / bandwidth)}
    classes = dict(sorted(classes.items(), key=lambda kv: -kv[1]["s"]))
    total = {key: sum(c[key] for c in classes.values()) for key in ("calls", "bytes", "flops", "s")}
    rows = [{"operations": k, "calls": c["calls"], "GB moved": c["bytes"] / 1e9, "TFLOP": c["flops"] / 1e12,
             "least ms": 1e3 * c["s"], "% of step": 100 * c["s"] / total["s"]} for k, c in [*classes.items(), ("total", total)]]
    model_flops = model_flops_per_token(config, seqlens) * tokens
    note = (f"{label}: {gpu[1]} TFLOP/s dense bf16, {gpu[2]} TB/s. Model FLOPs {model_flops / 1e12:.1f} T: "
            f"eager MFU at most **{100 * model_flops / total['s'] / peak:.1f}%** (every operator at its roofline); "
            f"the matmuls and attention alone would allow "
            f"{100 * model_flops / (classes['matmul']['s'] + classes[attention]['s']) / peak:.0f}%. "
            "What torch.compile fuses moves fewer bytes than counted here. "
            f"Activations kept for backward: **{sum(saved.values()) / 2**30:.1f} GiB**, plus "
            f"{params * 16 / 2**30:.1f} GiB of weights, gradients and AdamW state.")
    return rows, note
