import contextlib

import pytest
import torch

from model import PRESETS, LayerNorm, Projector, SparseMedicalViT, available_backends, model_flops_per_token
from pack import pack
from tests.test_pack import random_views

P = 14


def tiny(**kw):
    torch.manual_seed(0)
    return SparseMedicalViT(**{**dict(dim=48, depth=2, heads=2, attn="sdpa"), **kw}).double()


@pytest.mark.parametrize("rows", [False, True], ids=["dense", "rows"])
def test_packed_equals_one_view_at_a_time(rows):
    """One packed forward over a mix of 2D and 3D views == each view alone (outputs and gradients),
    for both sdpa layouts: equal-length views as dense batches, and block-diagonal masked rows."""
    model = tiny()
    model.sdpa_rows = rows
    views = [v.double() for v in random_views(7, seed=4, max_side=3)]
    views += [torch.randn_like(views[0]), torch.randn_like(views[3]), torch.randn_like(views[0])]  # equal lengths
    assert {v.shape[1] > 1 for v in views} == {True, False}
    packed = pack(views, P)
    assert max(n for _, n in packed.dense_groups) >= 3 and len(packed.dense_groups) > 1
    packed_out = model(packed)
    packed_out.square().sum().backward()
    packed_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    alone = torch.cat([model(pack([v], P)) for v in views])
    alone.square().sum().backward()
    assert torch.allclose(packed_out, alone, atol=1e-5)
    for g_packed, p in zip(packed_grads, model.parameters()):
        assert torch.allclose(g_packed, p.grad, atol=1e-5)


def test_2d_fast_path_equals_zero_padded_volume():
    model = tiny()
    img = torch.randn(1, 1, 28, 42, dtype=torch.float64)
    padded = torch.zeros(1, P, 28, 42, dtype=torch.float64)
    padded[:, 0] = img[:, 0]  # paper 2.1.1: the image in slice 0 of a P-deep pseudo-volume
    fast = model.embed(pack([img], P))
    full = torch.nn.functional.linear(pack([padded], P).patches_3d, model.patch_embed.weight, model.patch_embed.bias)
    assert torch.allclose(fast, full, atol=1e-12)


def test_standardized_inputs_equal_the_model_fed_standardized_patches():
    """--standardize: input_stats scale each modality on its own before the shared embedding; the same weights
    fed the standardized views by hand give the same embeddings, and a 2D image's padding stays zero."""
    stats = [[0.3, 0.5], [-0.7, 0.25]]
    with_stats, plain = tiny(input_stats=stats), tiny()
    plain.load_state_dict(with_stats.state_dict())
    views = [v.double() for v in random_views(6, seed=2, max_side=3)]
    assert {v.shape[1] > 1 for v in views} == {True, False}
    by_hand = [(v - stats[v.shape[1] > 1][0]) / stats[v.shape[1] > 1][1] for v in views]
    assert torch.allclose(with_stats(pack(views, P)), plain(pack(by_hand, P)), atol=1e-10)
    assert not torch.allclose(with_stats(pack(views, P)), plain(pack(views, P)), atol=1e-3)
    assert SparseMedicalViT(**{**with_stats.config, "attn": "sdpa"}).input_stats == stats  # a checkpoint rebuilds it


def test_views_do_not_attend_to_each_other():
    model = tiny()
    a, b = torch.randn(1, 1, 28, 28).double(), torch.randn(1, 28, 14, 14).double()
    before = model(pack([a, b], P))[0]
    after = model(pack([a, 5 * torch.randn_like(b)], P))[0]
    assert torch.allclose(before, after, atol=1e-10)


def test_drop_path_drops_whole_views():
    model = tiny(drop_path=0.5).train()
    for blk in model.blocks:
        blk.drop_path = 0.5
    packed = pack(random_views(40, seed=2), P)
    ones = torch.ones(packed.n_tokens, 1)
    scale = model.blocks[0].drop_views(packed.token_view, packed.n_views, ones)
    per_view = [scale[packed.token_view == i].unique() for i in range(packed.n_views)]
    assert all(len(u) == 1 for u in per_view)  # one decision per view
    assert {u.item() for u in per_view} == {0.0, 2.0}  # some views dropped, others kept and rescaled
    model.eval()
    assert model.blocks[0].drop_views(packed.token_view, packed.n_views, ones) is ones  # eval: untouched, not even multiplied by 1


def test_dense_and_row_layouts_give_the_same_tokens_in_packed_order():
    """forward_features returns tokens in the packed order whichever sdpa layout ran, with drop path too."""
    model = tiny(drop_path=0.3).train()
    packed = pack([v.double() for v in random_views(12, seed=7)], P)
    assert packed.dense_order.tolist() != list(range(packed.n_tokens))  # the dense layout does reorder
    out = {}
    for rows in (False, True):
        model.sdpa_rows = rows
        torch.manual_seed(1)  # the same per-view drop decisions
        out[rows] = model.forward_features(packed)
    assert torch.allclose(out[False], out[True], atol=1e-10)


def test_presets_and_overrides():
    for name, cfg in PRESETS.items():
        model = SparseMedicalViT.from_preset(name, depth=1)
        assert (model.dim, len(model.blocks)) == (cfg["dim"], 1)
    assert SparseMedicalViT.from_preset("small").head_dim == 64
    with pytest.raises(ValueError, match="preset"):
        SparseMedicalViT.from_preset("huge")


def test_projector_shapes():
    assert Projector(48)(torch.randn(5, 48)).shape == (5, 128)


def test_bad_input_errors():
    model = tiny()
    with pytest.raises(ValueError, match="channel"):
        model(pack([torch.randn(2, 1, 14, 14).double()], P))
    with pytest.raises(ValueError, match="not a whole number"):
        model(pack([torch.randn(1, 1, 14, 20).double()], P))
    with pytest.raises(ValueError, match="empty"):
        model(pack([], P))
    with pytest.raises(ValueError, match="unknown attention backend"):
        tiny(attn="magic")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only error")
def test_cuda_backend_on_cpu_says_why():
    with pytest.raises(ValueError, match=r"needs CUDA.*available"):
        tiny(attn="varlen")


def test_flex_agrees_with_sdpa_on_cpu():
    if "flex" not in available_backends("cpu"):
        pytest.skip("flex_attention not in this torch")
    model = tiny()
    packed = pack([v.double() for v in random_views(6, seed=5, max_side=2)], P)
    with torch.no_grad():  # flex has no CPU backward
        ref = model(packed)
        model.attn = "flex"
        assert torch.allclose(model(packed), ref, atol=1e-6)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["varlen", "flash", "flex"])
def test_cuda_backends_agree_with_sdpa_in_bf16(backend):
    if backend not in available_backends("cuda"):
        pytest.skip(f"{backend} not available")
    torch.manual_seed(0)
    model = SparseMedicalViT(dim=192, depth=4, heads=3, attn="sdpa").cuda()
    packed = pack(random_views(24, seed=6), P).to("cuda")
    outs, grads = {}, {}
    for name in ("sdpa", backend):
        model.attn = name
        model.zero_grad()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = model(packed)
        out.float().square().mean().backward()
        outs[name], grads[name] = out.float(), model.patch_embed.weight.grad.clone()
    assert torch.allclose(outs[backend], outs["sdpa"], atol=3e-2, rtol=3e-2)
    cos = torch.nn.functional.cosine_similarity(grads[backend].flatten(), grads["sdpa"].flatten(), dim=0)
    assert cos > 0.99


def test_layer_norm_keeps_the_input_dtype_under_autocast():
    torch.manual_seed(0)
    ours, ref = LayerNorm(32), torch.nn.LayerNorm(32)
    for m in (ours, ref):  # non-trivial affine parameters, the same in both
        torch.nn.init.normal_(m.weight, 1.0, 0.5, generator=torch.Generator().manual_seed(1))
        torch.nn.init.normal_(m.bias, 0.0, 0.5, generator=torch.Generator().manual_seed(2))
    x = torch.randn(64, 32) * 3 + 1
    assert torch.equal(ours(x), ref(x))  # no autocast: exactly nn.LayerNorm
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = ours(x.bfloat16())
    assert low.dtype == torch.bfloat16
    assert torch.allclose(low.float(), ref(x.bfloat16().float()), atol=0.05, rtol=0.02)
    low.float().square().sum().backward()  # gradients reach the float32 parameters
    assert ours.weight.grad.dtype == torch.float32 and ours.weight.grad.abs().sum() > 0


@pytest.mark.gpu
def test_bf16_autocast_model_agrees_with_float32():
    """The whole bf16 path on CUDA (varlen, bf16 layer norms, RoPE in float32) against float32 sdpa."""
    torch.manual_seed(0)
    model = SparseMedicalViT(dim=192, depth=4, heads=3, attn="sdpa").cuda()
    packed = pack(random_views(24, seed=7), P).to("cuda")
    ref = model(packed)
    model.attn = "auto"
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = model(packed)
    assert out.dtype == torch.float32  # the final norm and the view mean stay in float32
    assert torch.allclose(out, ref, atol=5e-2, rtol=5e-2)
    assert torch.nn.functional.cosine_similarity(out.flatten(), ref.flatten(), dim=0) > 0.999


def test_compiled_model_equals_eager_without_recompiling_for_new_lengths():
    """train.py --compile: one graph (no breaks) serves batches of every token count and view length.
    Compiled sdpa runs masked rows, eager the dense layout: this also compares the two."""
    model = SparseMedicalViT(dim=48, depth=1, heads=2, attn="sdpa")
    compiled = SparseMedicalViT(dim=48, depth=1, heads=2, attn="sdpa")
    compiled.load_state_dict(model.state_dict())
    compiled.compile(dynamic=True, fullgraph=True)  # fullgraph: a graph break is an error
    batches = [pack(random_views(n, seed=n), P) for n in (9, 5, 12)]
    assert len({(b.n_tokens, b.max_seqlen) for b in batches}) == 3
    for i, packed in enumerate(batches):
        with torch.compiler.set_stance("fail_on_recompile") if i else contextlib.nullcontext():
            got = compiled(packed)
            got.square().sum().backward()
        want = model(packed)
        want.square().sum().backward()
        assert torch.allclose(got, want, atol=1e-5)
        for a, b in zip(compiled.parameters(), model.parameters()):
            assert torch.allclose(a.grad, b.grad, atol=1e-5)
            a.grad = b.grad = None


def test_flops_formula():
    cfg = dict(dim=10, mlp_ratio=4.0, depth=1)
    # one view of 2 tokens: dense 2*(4+8)*100*2 = 4800, attention 2*2*10*4 = 160, x3 for backward
    assert model_flops_per_token(cfg, [2]) == 3 * (4800 + 160) / 2


def test_activation_checkpointing_gives_the_same_gradients():
    model = tiny().train()
    packed = pack([v.double() for v in random_views(5, seed=7, max_side=2)], P)
    grads = []
    for ckpt in (False, True):
        model.grad_checkpointing = ckpt
        model.zero_grad()
        model(packed).square().sum().backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    for a, b in zip(*grads):
        assert torch.allclose(a, b, atol=1e-10)
