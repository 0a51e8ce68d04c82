"""Kernel A (q_sample) and kernel B (loss + gradient) against the torch references."""
import pytest
import torch
from kernel_helpers import DEVICE, DTYPES, poisoned, random_batch, reduction_tolerance, tolerance

import kernels
from kernels import dispatch
from kernels.fused_loss import LossOptions, diffusion_loss_reference, launch_loss, launch_q_sample, \
    q_sample_reference

SHAPES = [(3, 1, 5, 7), (2, 4, 16, 16), (5, 37)]  # odd sizes: samples are not a multiple of the block


def per_sample_inputs(batch, seed):
    gen = torch.Generator().manual_seed(seed)
    alpha_bar = torch.rand(batch, generator=gen)
    alpha_bar[0], alpha_bar[-1] = 1e-6, 1 - 1e-6  # the extremes of the schedule
    sample_ids = torch.randint(0, 2**40, (batch,), generator=gen)
    return alpha_bar.to(DEVICE), sample_ids.to(DEVICE)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_q_sample_matches_reference_and_writes_every_element(shape, dtype):
    x0 = random_batch(shape[0], shape[1:], dtype, 1)
    alpha_bar, ids = per_sample_inputs(shape[0], 2)
    seed = 2**63 + 1234  # a 64-bit seed: both key words matter
    x_t = launch_q_sample(x0, alpha_bar, seed, ids, 17, poisoned(shape, dtype), block_size=64)
    assert not x_t.isnan().any()
    torch.testing.assert_close(x_t, q_sample_reference(x0, alpha_bar, seed, ids, 17), **tolerance(dtype))


def test_q_sample_same_noise_across_block_sizes_batches_and_memory_formats():
    x0 = random_batch(4, (3, 8, 8), torch.float32, 3)
    alpha_bar, ids = per_sample_inputs(4, 4)
    full = kernels.q_sample(x0, alpha_bar, 5, ids, 1, backend="triton", block_size=32)
    for block in (4, 256):
        assert torch.equal(kernels.q_sample(x0, alpha_bar, 5, ids, 1, backend="triton", block_size=block), full)
    # sample 2 alone, or at another position of another batch (another rank), gets the same x_t
    alone = kernels.q_sample(x0[2:3], alpha_bar[2:3], 5, ids[2:3], 1, backend="triton")
    assert torch.equal(alone[0], full[2])
    order = torch.tensor([3, 2, 0], device=DEVICE)
    shuffled = kernels.q_sample(x0[order], alpha_bar[order], 5, ids[order], 1, backend="triton")
    assert torch.equal(shuffled, full[order])
    channels_last = kernels.q_sample(x0.to(memory_format=torch.channels_last), alpha_bar, 5, ids, 1,
                                     backend="triton")
    assert torch.equal(channels_last, full)


def _loss_case(shape, dtype, seed):
    model_out = random_batch(shape[0], shape[1:], dtype, seed)
    x0 = random_batch(shape[0], shape[1:], dtype, seed + 1)
    alpha_bar, ids = per_sample_inputs(shape[0], seed + 2)
    weights = torch.rand(shape[0], generator=torch.Generator().manual_seed(seed + 3)).to(DEVICE) + 0.5
    buckets = torch.arange(shape[0], device=DEVICE) % 4
    return model_out, x0, alpha_bar, ids, weights, buckets


@pytest.mark.parametrize("target", ["eps", "x0", "v"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_loss_and_gradient_match_autograd_through_reference(shape, dtype, target):
    model_out, x0, alpha_bar, ids, weights, buckets = _loss_case(shape, dtype, 10)
    options = LossOptions(target, 4, 64)
    grad = poisoned(shape, dtype)
    per_sample = poisoned((shape[0],), torch.float32)
    loss, sums, counts = launch_loss(model_out, x0, alpha_bar, weights, ids, buckets, 77, 3, options, grad,
                                     per_sample)
    assert not grad.isnan().any() and not per_sample.isnan().any()

    leaf = model_out.detach().requires_grad_(True)
    ref = diffusion_loss_reference(leaf, x0, alpha_bar, 77, ids, 3, target=target, weights=weights,
                                   buckets=buckets)
    (ref_grad,) = torch.autograd.grad(ref.loss, leaf)
    torch.testing.assert_close(loss, ref.loss.detach(), **reduction_tolerance())
    torch.testing.assert_close(per_sample, ref.per_sample, **reduction_tolerance())
    torch.testing.assert_close(sums, ref.bucket_sums, **reduction_tolerance())
    assert torch.equal(counts, ref.bucket_counts)
    scale = ref_grad.abs().max().item()  # gradient entries are O(1 / numel): compare relative to their scale
    torch.testing.assert_close(grad.float() / scale, ref_grad.float() / scale, **tolerance(dtype))


def test_autograd_function_scales_stored_gradient_and_refuses_second_backward():
    model_out, x0, alpha_bar, ids, weights, buckets = _loss_case((4, 3, 6, 6), torch.float32, 20)
    leaf = model_out.clone().requires_grad_(True)
    fused = kernels.diffusion_loss(leaf, x0, alpha_bar, 1, ids, 2, target="v", weights=weights,
                                   buckets=buckets, backend="triton")
    (fused.loss * 3.5).backward(retain_graph=True)
    ref_leaf = model_out.clone().requires_grad_(True)
    ref = kernels.diffusion_loss(ref_leaf, x0, alpha_bar, 1, ids, 2, target="v", weights=weights,
                                 buckets=buckets, backend="torch")
    (ref.loss * 3.5).backward()
    torch.testing.assert_close(leaf.grad, ref_leaf.grad, **tolerance(torch.float32))
    assert not fused.per_sample.requires_grad and not fused.bucket_sums.requires_grad
    with pytest.raises(RuntimeError, match="twice"):
        fused.loss.backward()


def test_loss_without_grad_buckets_or_weights():
    model_out, x0, alpha_bar, ids, _, _ = _loss_case((3, 2, 5, 5), torch.float32, 30)
    with torch.no_grad():
        fused = kernels.diffusion_loss(model_out, x0, alpha_bar, 1, ids, 2, backend="triton")
    ref = kernels.diffusion_loss(model_out, x0, alpha_bar, 1, ids, 2, backend="torch")
    torch.testing.assert_close(fused.loss, ref.loss, **reduction_tolerance())
    assert torch.equal(fused.bucket_counts, torch.zeros(4, dtype=torch.int64, device=DEVICE))
    assert torch.equal(fused.bucket_sums, torch.zeros(4, device=DEVICE))


def test_loss_channels_last_and_block_sizes_agree():
    model_out, x0, alpha_bar, ids, weights, _ = _loss_case((2, 3, 8, 8), torch.float32, 40)
    results = []
    for fmt, block in ((torch.contiguous_format, 16), (torch.channels_last, 64), (torch.contiguous_format, 256)):
        leaf = model_out.detach().clone(memory_format=fmt).requires_grad_(True)
        out = kernels.diffusion_loss(leaf, x0.to(memory_format=fmt), alpha_bar, 9, ids, 1, weights=weights,
                                     backend="triton", block_size=block)
        out.loss.backward()
        results.append((out.per_sample, leaf.grad))
    for per_sample, grad in results[1:]:
        torch.testing.assert_close(per_sample, results[0][0], **reduction_tolerance())
        torch.testing.assert_close(grad, results[0][1], **tolerance(torch.float32))


def test_bad_arguments_are_named():
    x = torch.randn(2, 3, device=DEVICE)
    ab, ids = torch.rand(2, device=DEVICE), torch.arange(2, device=DEVICE)
    with pytest.raises(ValueError, match="target"):
        kernels.diffusion_loss(x, x, ab, 0, ids, 0, target="score")
    with pytest.raises(ValueError, match="alpha_bar"):
        kernels.q_sample(x, ab[:1], 0, ids, 0)
    with pytest.raises(TypeError, match="sample_ids"):
        kernels.q_sample(x, ab, 0, ids.float(), 0)
    with pytest.raises(ValueError, match="x0 has shape"):
        kernels.diffusion_loss(x, x[:, :2], ab, 0, ids, 0)
    with pytest.raises(ValueError, match="stream"):
        kernels.q_sample(x, ab, 0, ids, -1)
    with pytest.raises(ValueError, match="block_size"):
        kernels.q_sample(x, ab, 0, ids, 0, backend="triton", block_size=6)


def test_dispatch_backend_choice(monkeypatch):
    cpu = torch.zeros(1)
    monkeypatch.delenv(dispatch.ENV_VAR, raising=False)
    assert dispatch.choose_backend(cpu) == "torch"
    monkeypatch.setenv(dispatch.ENV_VAR, "triton")
    if dispatch.interpreter_active():  # CPU runs of these tests
        assert dispatch.choose_backend(cpu) == "triton"
    assert dispatch.choose_backend(cpu, backend="torch") == "torch"  # the argument wins over the env
    monkeypatch.setenv(dispatch.ENV_VAR, "cuda")
    with pytest.raises(ValueError, match="DIFFUSION_KERNELS"):
        dispatch.choose_backend(cpu)
    monkeypatch.setattr(dispatch, "interpreter_active", lambda: False)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        dispatch.choose_backend(cpu, backend="triton")
    if torch.cuda.is_available():
        assert dispatch.choose_backend(torch.zeros(1, device="cuda"), backend="auto") == "triton"
