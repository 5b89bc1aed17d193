"""bench.py, opcount.py and peers.py: the smoke run prints every section, padding changes the cost and not the
result, and the work counts of section 3 are those of the batches that actually run. Figures are never asserted."""
import json
import math

import pytest
import torch

import bench
import data
import opcount
from model import Projector, SparseMedicalViT
from pack import row_mask
from model import model_flops_per_token
from peers import PEERS, peer_section
from train import Net, compute_loss
import views

@pytest.fixture(scope="module")
def batch():
    """One mixed LeJEPA step of small phantoms: 3 2D + 2 3D samples, 2 global + 8 local views each."""
    ds_2d = data.open_dataset("phantom2d", "train", n=3, size=56, seed=0)
    ds_3d = data.open_dataset("phantom3d", "train", n=2, size=42, seed=0)
    loader = views.make_loader(ds_2d, ds_3d, batch_2d=3, batch_3d=2, steps=1, n_global=2, n_local=8, patch=14, seed=0)
    b = next(iter(loader))
    assert len(set(b.packed.seqlens)) > 3 and any(b.packed.is_3d) and not all(b.packed.is_3d)
    return b


@pytest.fixture(scope="module")
def net():
    torch.manual_seed(0)
    return Net(SparseMedicalViT(dim=48, depth=2, heads=2, attn="sdpa"), Projector(48, 64, 32))


def test_smoke_run_prints_every_section(tmp_path, capsys):
    path = tmp_path / "bench.json"
    trace = tmp_path / "trace.json"
    report = bench.main(["--smoke", "--device", "cpu", "--json", str(path), "--profile", str(trace), "--paired-views", "2"])
    out = capsys.readouterr().out
    assert f"torch {torch.__version__}" in out and "- model: tiny" in out and "- scale: 0.01" in out
    for title in ("1. Training step", "2. Attention backends", "3. Work per scheme", "4. Data pipeline",
                  "6. Profile of one packed step", "8. Peers", "9. --paired-views 2"):
        assert f"### {title}" in out
    for row in ("| packed | sdpa |", "| padded | sdpa |", "| per-modality padded | sdpa |", "| sdpa |", "| sdpa (rows, the compiled layout) |",
                "| packed (varlen, flash, sdpa) |", "| packed (compiled sdpa rows) |", "| 2D |", "| 3D |"):
        assert row in out, row
    assert "Packing speed-up" in out and "The losses agree to" in out and "cores keep the packed step fed" in out
    saved = json.loads(path.read_text())
    assert set(saved) == set(report) >= {"meta", "step", "backends", "work", "data", "profile", "peers", "paired"}
    plain, paired = saved["paired"]  # two of each CT sample's volumes' local views became film crops
    n_3d = int(plain["views 2D + 3D"].split(" + ")[1]) // (bench.N_GLOBAL + bench.N_LOCAL)
    assert paired["views 2D + 3D"] == f"{int(plain['views 2D + 3D'].split(' + ')[0]) + 2 * n_3d} + " \
                                      f"{int(plain['views 2D + 3D'].split(' + ')[1]) - 2 * n_3d}"
    assert paired["step (s)"] > 0 and paired["time vs default"] > 0
    assert saved["meta"]["GEMM GFLOP/s"] > 0
    classes = {r["operations"]: r for r in saved["profile"]}
    assert classes["matmul"]["ms"] > 0 and classes["attention"]["calls"] > 0  # the step's own work is in it
    assert classes["outside aten operators"]["ms"] >= 0  # the classified time fits in the step's wall time
    assert json.loads(trace.read_text())["traceEvents"]  # a complete Chrome trace
    assert [r["scheme"] for r in saved["step"]] == ["packed", "padded", "per-modality padded"]
    dense, rows = saved["backends"][:2]  # the two sdpa layouts compute the same embeddings
    assert rows["backend"] == "sdpa (rows, the compiled layout)" and rows["max abs Δ embedding vs sdpa"] < 1e-4
    assert all(r["step (s)"] > 0 and math.isfinite(r["loss"]) for r in saved["step"])
    assert all(r["samples/s per core"] > 0 for r in saved["data"])


def test_peers_are_timed_against_ours_or_skipped_by_name(monkeypatch):
    """Section 8: every peer has its row per modality, timed (ratio = its time / ours) or skipped with the reason."""
    def missing(cfg, views):
        raise ModuleNotFoundError("No module named 'nosuchpeer'")

    peers = {"2D": [*PEERS["2D"], ("absent peer", missing)], "3D": PEERS["3D"]}
    monkeypatch.setattr("peers.PEERS", peers)
    args = bench.get_args(["--smoke"])
    net = bench.make_net(args, args.model, torch.device("cpu"))
    views = bench.Workload(args, net.backbone.patch).views(args.scale)
    with bench.threads(1):
        rows = peer_section(args, net, views, torch.device("cpu"))
    for modality, listed in peers.items():
        mine = [r for r in rows if r["modality"] == modality]
        ours = next(r for r in mine if r["model"].startswith("ours"))
        assert ours["step (s)"] > 0 and ours["time vs ours"] == 1.0
        assert sorted(r["model"] for r in mine if r is not ours) == sorted(name for name, _ in listed)
        for r in mine:
            if r["step (s)"] is None:
                assert r["note"].startswith("skipped: ") and r["time vs ours"] is None
            else:
                assert r["time vs ours"] == pytest.approx(r["step (s)"] / ours["step (s)"])
                assert r["params (M)"] > 0
    absent = next(r for r in rows if r["model"] == "absent peer")
    assert absent["note"] == "skipped: ModuleNotFoundError: No module named 'nosuchpeer'"


def test_gemm_line_is_one_line_with_a_rate(capsys):
    report = bench.main(["--gemm"])
    out = capsys.readouterr().out
    assert out.count("\n") == 1 and "GFLOP/s" in out and report["meta"]["GEMM GFLOP/s"] > 0


def test_traffic_counts_every_matmul_flop_of_the_step(batch, capsys):
    """Section 7's FLOP count (torch's counter over every aten op) equals the FLOPs written out by hand."""
    report = bench.main(["--smoke", "--traffic"])  # counting only: no timed section runs
    assert set(report) == {"meta", "traffic"} and "### 7. Bytes and FLOPs" in capsys.readouterr().out
    args = bench.get_args(["--smoke", "--traffic", "H200"])
    net = bench.make_net(args, args.model, torch.device("cpu"))
    cfg, p = net.backbone.config, batch.packed
    rows, note = opcount.traffic_section(args, net, batch)
    counted = {r["operations"]: r for r in rows}
    d, depth, patch, n_views = cfg["dim"], cfg["depth"], cfg["patch"], p.n_views
    attention = 3 * depth * 2 * 2 * d * sum(n * n for n in p.seqlens)
    blocks = model_flops_per_token(cfg, p.seqlens) * p.n_tokens - attention  # forward + backward (x3)
    embed = 2 * 2 * d * (len(p.index_2d) * patch**2 + len(p.index_3d) * patch**3)  # forward + weight gradient
    widths = [d, 2048, 2048, 128]  # projector: forward + input and weight gradients
    head = 3 * 2 * n_views * sum(a * b for a, b in zip(widths, widths[1:]))
    sigreg = 2 * 2 * n_views * 128 * 256  # SIGReg's projection onto 256 directions: forward + input gradient
    probe = 3 * 2 * n_views * d * 5  # online probe (layer norm, linear) on detached embeddings: forward + both gradients
    assert counted["matmul"]["TFLOP"] * 1e12 == pytest.approx(blocks + embed + head + sigreg + probe, rel=1e-9)
    assert counted["attention (varlen, by formula)"]["TFLOP"] * 1e12 == pytest.approx(attention * 3.5 / 3)
    assert "H200: 989 TFLOP/s dense bf16, 4.8 TB/s" in note
    assert counted["total"]["least ms"] == pytest.approx(sum(r["least ms"] for r in rows[:-1]))


@pytest.mark.parametrize("heads", [1, 4, 12])
def test_rope_rotation_moves_few_bytes_counted(heads):
    """The eager RoPE is memory-bound: its bytes per element of q (bf16) are counted, not timed.

    Floor: read q and write the result, 4 bytes. The table form reads q twice as bf16 and once as a
    float32 product, and swaps pairs with copies: 18 bytes, plus each float32 table read once
    (4 bytes per channel, shared by the heads). The float32 stack-and-concatenate form it replaced
    moved 57.5 at 4 heads.
    """
    from rope3d import rope_angles, rope_tables, rotate
    t, dim = 512, 64
    x = torch.randn(t, heads, dim, dtype=torch.bfloat16, requires_grad=True)
    cos, sin = rope_tables(rope_angles(torch.rand(t, 3) * 128, dim), dim)
    grad = torch.randn(t, heads, dim, dtype=torch.bfloat16)
    forward, backward = opcount.OpCounter(), opcount.OpCounter()
    with forward:
        y = rotate(x, cos, sin)
    with backward:
        y.backward(grad)
    per_element = [sum(c[1] for c in counter.ops.values()) / x.numel() for counter in (forward, backward)]
    tables = 2 * 4 / heads  # cos and sin, float32, each read once, shared by the heads
    assert per_element[0] == pytest.approx(18 + tables)
    assert per_element[1] == pytest.approx(18 + tables + 8 / heads)  # + negating the sin table (read, write)
    assert torch.allclose(x.grad.float(), rotate(grad.float(), cos, -sin), atol=2e-2)  # the inverse rotation


def test_operations_are_classified_by_aten_and_cuda_kernel_names():
    cases = {"aten::addmm": "matmul", "sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64": "matmul",
             "aten::_scaled_dot_product_flash_attention_for_cpu": "attention",
             "void pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits<64, 128>>": "attention",
             "triton_poi_fused__to_copy_add_mul_0": "compiled fused kernels", "aten::addcmul": "RoPE (addcmul, flip)",
             "aten::native_layer_norm_backward": "layer norm", "aten::gelu": "GELU", "aten::_to_copy": "casts and copies",
             "aten::index_copy": "gather / scatter", "aten::sum": "reductions", "aten::add": "other elementwise",
             "aten::empty": "other", "fmha_cutlassF_bf16_aligned_64x64_rf_sm80": "attention",
             "void pytorch_flash::flash_fwd_kernel<pytorch_flash::Flash_fwd_kernel_traits<128, 64, 64, 4, 0, 0, "
             "cutlass::bfloat16_t, Flash_kernel_traits<128, 64, 64, 4, cutlass::bfloat16_t>>, false, true>":
                 "attention",
             "triton_red_fused__scaled_dot_product_flash_attention_backward_sum_4": "compiled fused kernels", "nvjet_tst_192x192_64x4_2x1_v_bz_coopA_TNN": "matmul",
             "triton_tem_fused_mm_0": "matmul", "triton_poi_fused_addmm_gelu_3": "compiled fused kernels",
             "void at::native::GammaBetaBackwardCUDAKernel<c10::BFloat16, float>": "layer norm",
             "void at::native::vectorized_elementwise_kernel<4, at::native::CUDAFunctor_add<c10::BFloat16>>":
                 "other elementwise"}
    assert {name: opcount.op_class(name) for name in cases} == cases


@pytest.mark.gpu
def test_smoke_run_on_cuda_reports_mfu_and_largest_batch(capsys):
    report = bench.main(["--smoke", "--device", "cuda", "--compile", "--profile"])
    out = capsys.readouterr().out
    assert {r["step"] for r in report["profile"]} == {"eager", "compiled"}
    assert any(r["operations"] == "matmul" and r["ms"] > 0 for r in report["profile"])
    assert "### 5. GPU" in out and "### 5b. Largest batch" in out and "| varlen |" in out
    assert [r["model"] for r in report["largest batch"]] == ["small", "base"]


@pytest.mark.parametrize("per_modality", [False, True])
def test_padded_batch_computes_the_packed_loss_and_gradients(batch, net, per_modality):
    with bench.threads(1), bench.attention(net, "sdpa"):  # one thread: small work, no stalls on a busy machine
        net.zero_grad()
        packed_loss, *_ = compute_loss(net, batch, "lejepa", 0.025, 0)
        packed_loss.backward()
        packed_grads = [p.grad.clone() for p in net.parameters()]
        net.zero_grad()
        padded = bench.padded_batch(batch, per_modality)
        padded_loss, *_ = compute_loss(bench.PaddedNet(net), padded, "lejepa", 0.025, 0)
        padded_loss.backward()
    assert padded.packed.n_tokens > batch.packed.n_tokens  # padding is computed, not skipped
    assert torch.allclose(padded_loss, packed_loss, rtol=1e-5, atol=1e-7)
    for g_packed, p in zip(packed_grads, net.parameters()):
        assert torch.allclose(p.grad, g_packed, rtol=1e-4, atol=1e-6)


def test_padded_rows_hold_one_view_then_its_zero_padding(batch):
    packed = batch.packed
    keep = [i for i, f in enumerate(packed.is_3d) if f]
    padded, real = bench.pad_views(packed, keep)
    length = max(packed.seqlens[i] for i in keep)
    assert padded.row_segment.shape == (len(keep), length) and padded.max_seqlen == length
    for r, i in enumerate(keep):
        n = packed.seqlens[i]
        segments = padded.row_segment[r].tolist()
        assert segments[:n] == [real[r]] * n and len(set(segments[n:])) <= 1 and real[r] not in segments[n:]
        tokens = padded.patches_3d[r * length:(r + 1) * length]  # 3D only: row r is slots r*L .. r*L+L-1
        source = packed.patches_3d[(packed.index_3d >= packed.cu_seqlens[i]) & (packed.index_3d < packed.cu_seqlens[i + 1])]
        assert torch.equal(tokens[:n], source) and not tokens[n:].any()
        assert torch.equal(padded.patch_index[r * length:r * length + n], packed.patch_index[packed.token_view == i])


def test_work_counts_match_the_batches_that_run(batch):
    """Section 3's counts against an independent count on the padded batches and the masks actually built."""
    p = batch.packed
    work = {w["scheme"]: w for w in bench.scheme_work(p.seqlens, p.is_3d)}
    real_pairs = (row_mask(p)[:, 0] & (p.row_segment < p.n_views)[:, :, None]).sum().item()  # same real view
    assert real_pairs == sum(n * n for n in p.seqlens)
    runs = {"packed (varlen, flash, sdpa)": (p.n_tokens, sum(n * length**2 for length, n in p.dense_groups)),
            "packed (compiled sdpa rows)": (p.n_tokens, row_mask(p).numel()),
            "padded": (bench.padded_batch(batch, False).packed.n_tokens,
                       sum(row_mask(q).numel() for q, _, _ in bench.padded_batch(batch, False).packed.groups)),
            "per-modality padded": (bench.padded_batch(batch, True).packed.n_tokens,
                                    sum(row_mask(q).numel() for q, _, _ in bench.padded_batch(batch, True).packed.groups))}
    for scheme, (tokens, pairs) in runs.items():
        w = work[scheme]
        assert w["real tokens"] == p.n_tokens and w["tokens computed"] == tokens, scheme
        assert w["padding %"] == pytest.approx(100 * (tokens - p.n_tokens) / tokens), scheme
        assert w["attention pairs (M)"] * 1e6 == pytest.approx(pairs), scheme
        assert w["useful attention %"] == pytest.approx(100 * real_pairs / pairs), scheme
