"""The fused GroupNorm + scale-shift + SiLU kernel, forward and backward, against the torch reference."""
import pytest
import torch
from kernel_helpers import DEVICE, DTYPES, poisoned, random_batch, reduction_tolerance, tolerance

import kernels
from kernels.group_norm import group_norm_act_reference, launch_backward, launch_forward, parameter_grads

# (B, C, *spatial), groups: 3 channels per group (not a power of two) over a 1-D odd length, 1x1 spatial in one
# group, 8 channels per group over 6x6. Few cases, each covering several edges: on a GPU every distinct shape,
# dtype and variant is its own Triton compile (the suite's test stage has a time limit).
CASES = [((3, 6, 7), 2), ((1, 4, 1, 1), 1), ((2, 16, 6, 6), 2)]


def inputs(shape, groups, dtype, seed, modulated=True, affine=True):
    b, c = shape[:2]
    x = (random_batch(b, shape[1:], torch.float32, seed) * 3 + 2).to(dtype)  # a mean and scale to remove
    weight = random_batch(c, (), dtype, seed + 1) if affine else None
    bias = random_batch(c, (), dtype, seed + 2) if affine else None
    scale = (random_batch(b, (c,), dtype, seed + 3) * 0.5) if modulated else None
    shift = random_batch(b, (c,), dtype, seed + 4) if modulated else None
    return x, weight, bias, scale, shift


def float_reference(x, groups, weight, bias, scale, shift, silu, dout):
    """Output and gradients of the reference in float32 (the exact values the kernel rounds once)."""
    leaves = [None if t is None else t.detach().float().requires_grad_(True) for t in (x, weight, bias, scale, shift)]
    out = group_norm_act_reference(leaves[0], groups, *leaves[1:3], 1e-5, *leaves[3:], silu=silu)
    grads = torch.autograd.grad(out, [t for t in leaves if t is not None], dout.float())
    return out, grads


def assert_close_scaled(actual, expected, dtype):
    """Relative to the largest entry: sums over a group's elements grow with its size."""
    scale = max(expected.abs().max().item(), 1e-6)
    torch.testing.assert_close(actual.float() / scale, expected.float() / scale, **tolerance(dtype))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,groups", CASES)
# the UNet's three: a residual block's second norm, its first norm (and the output's), the attention block's
@pytest.mark.parametrize("silu,modulated,affine", [(True, True, True), (True, False, True), (False, False, True)])
def test_forward_and_backward_match_the_reference(shape, groups, dtype, silu, modulated, affine):
    x, weight, bias, scale, shift = inputs(shape, groups, dtype, 10, modulated, affine)
    mean, rstd = poisoned((shape[0] * groups,), torch.float32), poisoned((shape[0] * groups,), torch.float32)
    # block_s=2: several tiles per group, the last one partial, so the loops and masks are exercised
    out = launch_forward(x, groups, weight, bias, scale, shift, 1e-5, silu, poisoned(shape, dtype), mean, rstd,
                         block_s=2)
    assert not out.isnan().any() and not mean.isnan().any() and not rstd.isnan().any()
    dout = random_batch(shape[0], shape[1:], dtype, 17)
    ref_out, ref_grads = float_reference(x, groups, weight, bias, scale, shift, silu, dout)
    torch.testing.assert_close(out.float(), ref_out.to(dtype).float(), **tolerance(dtype))

    dx = poisoned(shape, dtype)
    sums = launch_backward(x, dout, groups, weight, bias, scale, shift, silu, mean, rstd, dx, block_s=2)
    assert not dx.isnan().any()
    d_weight, d_bias, d_scale, d_shift = parameter_grads(sums, weight, bias, scale)
    ours = [dx] + ([d_weight, d_bias] if affine else []) + ([d_scale, d_shift] if modulated else [])
    assert len(ours) == len(ref_grads)
    assert_close_scaled(dx, ref_grads[0], dtype)
    for mine, ref in zip(ours[1:], ref_grads[1:]):
        torch.testing.assert_close(mine, ref, **reduction_tolerance()) if dtype == torch.float32 else \
            assert_close_scaled(mine, ref, torch.bfloat16)  # from 16-bit inputs: a 16-bit tolerance


def test_modulation_without_affine_parameters():
    """GroupNorm(affine=False) then the modulation: d scale is then the sum of dz * xhat alone."""
    x, _, _, scale, shift = inputs((2, 8, 3, 3), 2, torch.float32, 90, affine=False)
    leaves = [t.detach().requires_grad_(True) for t in (x, scale, shift)]
    out = kernels.group_norm_act(leaves[0], 2, None, None, 1e-5, *leaves[1:], backend="triton", block_s=4)
    dout = random_batch(2, (8, 3, 3), torch.float32, 95)
    ref_out, ref_grads = float_reference(x, 2, None, None, scale, shift, True, dout)
    torch.testing.assert_close(out, ref_out, **tolerance(torch.float32))
    for mine, ref in zip(torch.autograd.grad(out, leaves, dout), ref_grads):
        torch.testing.assert_close(mine, ref, **reduction_tolerance())


def test_statistics_survive_a_large_mean():
    """x = 1000 + N(0, 0.01^2): E[x^2] - mean^2 in float32 would lose the variance entirely."""
    x = random_batch(2, (8, 6, 6), torch.float32, 5) * 0.01 + 1000.0
    out = kernels.group_norm_act(x, 2, eps=1e-12, silu=False, backend="triton", block_s=4)
    expected = group_norm_act_reference(x.double(), 2, eps=1e-12, silu=False)
    torch.testing.assert_close(out.double(), expected, atol=5e-3, rtol=0)
    assert out.std().item() == pytest.approx(1.0, abs=0.01)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "channel_slice"])
def test_public_op_keeps_the_layout_and_matches_autograd_of_the_reference(layout):
    """The public op in a graph: non-contiguous (B, C) vectors as chunk() gives them, channels_last activations
    (output and gradient stay channels_last, no copy), a slice of channels (packed first), a reused input."""
    x, weight, bias, _, _ = inputs((2, 8, 5, 4), 2, torch.float32, 40)
    emb = random_batch(2, (16,), torch.float32, 44)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    elif layout == "channel_slice":
        x = torch.cat([x, x], dim=1)[:, 4:12]
    results = []
    for backend in ("triton", "torch"):
        leaves = [t.detach().clone().requires_grad_(True) for t in (x, weight, bias, emb)]
        xl, wl, bl, el = leaves
        if layout == "channels_last":
            xl.data = xl.data.contiguous(memory_format=torch.channels_last)
        scale, shift = el.chunk(2, dim=1)
        out = kernels.group_norm_act(xl, 2, wl, bl, 1e-5, scale, shift, backend=backend)
        loss = (out * xl).sum() + out.square().mean()
        results.append((out, torch.autograd.grad(loss, leaves)))
    (out, grads), (ref_out, ref_grads) = results
    torch.testing.assert_close(out, ref_out, **tolerance(torch.float32))
    for mine, ref in zip(grads, ref_grads):
        torch.testing.assert_close(mine, ref, **reduction_tolerance())
    if layout == "channels_last":
        assert out.is_contiguous(memory_format=torch.channels_last) and not out.is_contiguous()
        assert grads[0].is_contiguous(memory_format=torch.channels_last)


def test_mixed_dtypes_as_under_autocast():
    """bf16 activations and modulation (a convolution's and a linear layer's autocast outputs) with the module's
    float32 weight and bias: a bf16 output, each gradient in its input's dtype."""
    x, weight, bias, scale, shift = inputs((2, 8, 4, 4), 2, torch.bfloat16, 80)
    weight, bias = weight.float(), bias.float()
    leaves = [t.detach().requires_grad_(True) for t in (x, weight, bias, scale, shift)]
    out = kernels.group_norm_act(leaves[0], 2, *leaves[1:3], 1e-5, *leaves[3:], backend="triton")
    dout = random_batch(2, (8, 4, 4), torch.bfloat16, 85)
    grads = torch.autograd.grad(out, leaves, dout)
    assert out.dtype == torch.bfloat16 and [g.dtype for g in grads] == [t.dtype for t in leaves]
    ref_out, ref_grads = float_reference(x, 2, weight, bias, scale, shift, True, dout)
    torch.testing.assert_close(out.float(), ref_out.to(torch.bfloat16).float(), **tolerance(torch.bfloat16))
    for mine, ref in zip(grads, ref_grads):
        assert_close_scaled(mine, ref, torch.bfloat16)


def test_a_unet_with_fused_norms_matches_the_unfused_one(monkeypatch):
    """The switch the trainer sets (train.fused_norm): same outputs and gradients, the same parameter names."""
    from pipeline.models.unet import UNet, use_fused_norms

    monkeypatch.setenv("DIFFUSION_KERNELS", "triton")  # the kernels in Triton's interpreter on CPU
    torch.manual_seed(0)
    model = UNet(in_channels=3, base_channels=16, channel_mult=(1, 2), num_classes=4, image_size=8).to(DEVICE)
    for p in model.parameters():  # zero-initialised output layers would hide most of the gradient
        torch.nn.init.normal_(p, std=0.2)
    x = random_batch(2, (3, 8, 8), torch.float32, 50)
    t, y = torch.tensor([5, 700], device=DEVICE), torch.tensor([1, 4], device=DEVICE)
    results = []
    for fused in (False, True):
        # 8 residual blocks x 2 norms, 5 attention blocks (8x8 is split into 4x4 once: attention there), the output
        assert use_fused_norms(model, fused) == 8 * 2 + 5 + 1
        model.zero_grad()
        out = model(x, t, y)
        out.square().sum().backward()
        results.append((out.detach(), [p.grad.clone() for p in model.parameters()]))
    (ref_out, ref_grads), (out, grads) = results
    assert not torch.equal(out, ref_out)  # the fused path really ran (float32 sums in another order)
    torch.testing.assert_close(out, ref_out, atol=1e-4, rtol=1e-4)
    for mine, ref in zip(grads, ref_grads):
        torch.testing.assert_close(mine, ref, atol=1e-3, rtol=1e-3)


def test_bad_arguments_name_what_is_wrong():
    x = random_batch(2, (6, 4, 4), torch.float32, 60)
    with pytest.raises(ValueError, match="num_groups must be a positive divisor of the 6 channels, got 4"):
        kernels.group_norm_act(x, 4)
    with pytest.raises(ValueError, match="scale and shift come together"):
        kernels.group_norm_act(x, 2, scale=torch.zeros(2, 6, device=DEVICE))
    with pytest.raises(ValueError, match=r"shift must be \(2, 6\)"):
        kernels.group_norm_act(x, 2, scale=torch.zeros(2, 6, device=DEVICE), shift=torch.zeros(6, device=DEVICE))
    with pytest.raises(ValueError, match=r"x must be \(B, C, \*spatial\)"):
        kernels.group_norm_act(x[:, :, 0, 0], 2)
    with pytest.raises(ValueError, match="weight and bias come together"):
        kernels.group_norm_act(x, 2, torch.ones(6, device=DEVICE), None, backend="triton")


# on CPU only: the interpreter check of kernels.dispatch is behind functools.cache, which dynamo traces through
@pytest.mark.filterwarnings("ignore:Dynamo detected a call to a `functools.lru_cache`")
def test_torch_compile_sees_one_opaque_op_per_norm_and_keeps_the_gradients(monkeypatch):
    """train.compile with train.fused_norm: the UNet stays one graph (the kernel is a torch.library custom op, no
    graph break), and autograd through the compiled graph gives the eager gradients. aot_eager runs the same
    tracing (fake tensors, the registered backward) as inductor without its C++ build."""
    from pipeline.models.unet import UNet, use_fused_norms

    monkeypatch.setenv("DIFFUSION_KERNELS", "triton")
    torch.manual_seed(0)
    model = UNet(in_channels=1, base_channels=8, channel_mult=(1, 1), image_size=8).to(DEVICE)
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.2)
    use_fused_norms(model)
    x, t = random_batch(2, (1, 8, 8), torch.float32, 70), torch.tensor([3, 700], device=DEVICE)
    explained = torch._dynamo.explain(model)(x, t)
    assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons
    results = []
    for forward in (model, torch.compile(model, backend="aot_eager")):
        model.zero_grad()
        out = forward(x, t)
        out.square().sum().backward()
        results.append((out.detach(), [p.grad.clone() for p in model.parameters()]))
    (eager, eager_grads), (compiled, compiled_grads) = results
    torch.testing.assert_close(compiled, eager)
    for mine, ref in zip(compiled_grads, eager_grads):
        torch.testing.assert_close(mine, ref)
