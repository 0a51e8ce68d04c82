"""The adaLN kernels (modulated LayerNorm, gated residual), forward and backward, against the torch references."""
import pytest
import torch
from kernel_helpers import DEVICE, DTYPES, poisoned, random_batch, reduction_tolerance, tolerance

import kernels
from kernels.adaln import (gated_residual_reference, launch_gated_residual, launch_gated_residual_backward,
                           launch_modulated_ln, launch_modulated_ln_backward, modulated_layer_norm_reference)

# odd shapes: D not a power of two, N not a multiple of the rows per program, a single token
SHAPES = [(2, 5, 12), (3, 17, 33), (1, 1, 7), (2, 64, 48)]


def inputs(shape, dtype, seed):
    b, n, d = shape
    x = random_batch(b, (n, d), torch.float32, seed) * 3 + 1  # a non-zero mean and scale for LayerNorm to remove
    vectors = [random_batch(b, (d,), dtype, seed + k) * 0.5 for k in (1, 2)]
    y = random_batch(b, (n, d), dtype, seed + 3)
    return x.to(dtype), *vectors, y


def grads_through(fn, *tensors, dout):
    leaves = [t.detach().float().requires_grad_(True) for t in tensors]  # float32 autograd: the exact gradient
    out = fn(*leaves)
    return torch.autograd.grad(out, leaves, dout.float())


def assert_close_scaled(actual, expected, dtype):
    """Compare relative to the largest entry: sums over N tokens grow with N."""
    scale = max(expected.abs().max().item(), 1e-6)
    torch.testing.assert_close(actual.float() / scale, expected.float() / scale, **tolerance(dtype))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_modulated_layer_norm_forward_and_backward(shape, dtype):
    x, shift, scale, dout = inputs(shape, dtype, 10)
    b, n, d = shape
    mean, rstd = poisoned((b * n,), torch.float32), poisoned((b * n,), torch.float32)
    out = launch_modulated_ln(x, shift, scale, 1e-6, poisoned(shape, dtype), mean, rstd, block_rows=4)
    assert not out.isnan().any() and not mean.isnan().any() and not rstd.isnan().any()
    reference = modulated_layer_norm_reference(x, shift, scale, 1e-6)
    torch.testing.assert_close(out.float(), reference.float(), **tolerance(dtype))

    dx = poisoned(shape, dtype)
    dshift, dscale = launch_modulated_ln_backward(x, scale, dout, mean, rstd, dx, block_rows=4)
    assert not dx.isnan().any()
    ref_dx, ref_dshift, ref_dscale = grads_through(modulated_layer_norm_reference, x, shift, scale, dout=dout)
    assert_close_scaled(dx, ref_dx, dtype)
    torch.testing.assert_close(dshift, ref_dshift, **reduction_tolerance())
    assert_close_scaled(dscale, ref_dscale, torch.float32)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_gated_residual_forward_and_backward(shape, dtype):
    x, gate, _, y = inputs(shape, dtype, 20)
    out = launch_gated_residual(x, gate, y, poisoned(shape, dtype), block_rows=4)
    torch.testing.assert_close(out.float(), gated_residual_reference(x, gate, y).float(), **tolerance(dtype))

    dout = random_batch(shape[0], shape[1:], dtype, 24)
    dy = poisoned(shape, dtype)
    dgate = launch_gated_residual_backward(gate, y, dout, dy, block_rows=4)
    assert not dy.isnan().any()
    _, ref_dgate, ref_dy = grads_through(gated_residual_reference, x, gate, y, dout=dout)
    assert_close_scaled(dy, ref_dy, dtype)
    assert_close_scaled(dgate, ref_dgate, torch.float32)


def test_autograd_functions_match_the_reference_end_to_end():
    """Public API, default tiling, non-contiguous (B, D) vectors as a DiT's chunk() gives them, a second use."""
    x, _, _, y = inputs((2, 9, 20), torch.float32, 30)
    modulation = random_batch(2, (60,), torch.float32, 33)
    grads = []
    for backend in ("triton", "torch"):
        leaves = [t.detach().clone().requires_grad_(True) for t in (x, y, modulation)]
        xl, yl, ml = leaves
        shift, scale, gate = ml.chunk(3, dim=1)
        h = kernels.modulated_layer_norm(xl, shift, scale, backend=backend)
        out = kernels.gated_residual(xl, gate, h * yl, backend=backend)
        (out.square().sum() + out.sum()).backward()
        grads.append([out.detach()] + [t.grad for t in leaves])
    for fused, ref in zip(*grads):
        torch.testing.assert_close(fused, ref, **reduction_tolerance())


def test_bad_arguments_are_named():
    x = torch.randn(2, 3, 4, device=DEVICE)
    with pytest.raises(ValueError, match="x must be"):
        kernels.modulated_layer_norm(x[0], x[:, 0], x[:, 0])
    with pytest.raises(ValueError, match="scale must be"):
        kernels.modulated_layer_norm(x, x[:, 0], x[:, :, 0])
    with pytest.raises(ValueError, match="y has shape"):
        kernels.gated_residual(x, x[:, 0], x[:, :2])
    with pytest.raises(ValueError, match="block_rows"):
        kernels.gated_residual(x, x[:, 0], x, backend="triton", block_rows=3)


def test_dit_forward_and_gradients_are_the_same_with_the_kernels(monkeypatch):
    """The DiT reaches the kernels through the dispatcher: forcing Triton changes nothing but rounding."""
    from pipeline.models.dit import DiT

    torch.manual_seed(0)
    model = DiT(2, 8, 2, hidden=24, depth=2, heads=2, num_classes=3).to(DEVICE)
    for p in model.parameters():  # leave adaLN-Zero's zero start, so the gates and modulation matter
        torch.nn.init.normal_(p, std=0.2) if torch.all(p == 0) else None
    x = random_batch(3, (2, 8, 8), torch.float32, 40)
    t, y = torch.tensor([1, 500, 999], device=DEVICE), torch.tensor([0, 2, 3], device=DEVICE)
    results = []
    for backend in ("triton", "torch"):
        monkeypatch.setenv("DIFFUSION_KERNELS", backend)
        model.zero_grad()
        out = model(x, t, y)
        out.square().mean().backward()
        results.append([out.detach()] + [p.grad.clone() for p in model.parameters()])
    for fused, ref in zip(*results):
        torch.testing.assert_close(fused, ref, atol=1e-4, rtol=1e-4)
