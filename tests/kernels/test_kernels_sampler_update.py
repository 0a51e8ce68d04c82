"""The fused sampler update against its torch reference, and CUDA-graph capture of a sampling loop."""
import itertools

import pytest
import torch
from kernel_helpers import DEVICE, DTYPES, poisoned, random_batch, tolerance

import kernels
from kernels.sampler_update import launch_sampler_update, sampler_update_reference


def coefficient_row(sigma: float, alpha_bar: float = 0.7) -> torch.Tensor:
    """[sqrt_ab_t, sqrt_1m_ab_t, c_x0, c_x0_prev, c_xt, sigma]: arbitrary but valid-looking numbers."""
    return torch.tensor([alpha_bar**0.5, (1 - alpha_bar) ** 0.5, 0.6, -0.2, 0.45, sigma], device=DEVICE)


CASES = list(itertools.product(["eps", "x0", "v"], [False, True], [False, True], [False, True]))


@pytest.mark.parametrize("prediction, guided, clip, with_prev", CASES)
def test_update_matches_reference(prediction, guided, clip, with_prev):
    shape, dtype = (3, 3, 5, 7), torch.float32
    x_t, out, uncond, prev = (random_batch(3, shape[1:], dtype, s) for s in range(4))
    args = (x_t, out, coefficient_row(0.3), prediction, uncond if guided else None, 4.0, clip,
            prev if with_prev else None, 11, torch.tensor([5, 0, 2**35], device=DEVICE), 7)
    x_next, x0_hat = launch_sampler_update(*args, poisoned(shape, dtype), poisoned(shape, dtype), block_size=32)
    ref_next, ref_x0 = sampler_update_reference(*args)
    torch.testing.assert_close(x_next, ref_next, **tolerance(dtype))
    torch.testing.assert_close(x0_hat, ref_x0, **tolerance(dtype))
    if clip:
        assert x0_hat.abs().max() <= 1


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(2, 1, 9, 9), (4, 37)])
@pytest.mark.parametrize("sigma", [0.0, 0.8])  # sigma == 0 skips the noise inside the kernel
def test_dtypes_odd_sizes_and_deterministic_steps(shape, dtype, sigma):
    x_t, out, prev = (random_batch(shape[0], shape[1:], dtype, s) for s in (20, 21, 22))
    args = (x_t, out, coefficient_row(sigma, alpha_bar=1e-4), "eps", None, 1.0, False, prev, 3,
            torch.arange(shape[0], device=DEVICE), 2)
    x_next, x0_hat = launch_sampler_update(*args, poisoned(shape, dtype), poisoned(shape, dtype))
    assert not x_next.isnan().any() and not x0_hat.isnan().any()
    ref_next, ref_x0 = sampler_update_reference(*args)
    # eps -> x0 divides by sqrt(alpha_bar) = 0.01: compare relative to the output's scale
    scale = ref_x0.float().abs().max()
    torch.testing.assert_close(x0_hat.float() / scale, ref_x0.float() / scale, **tolerance(dtype))
    torch.testing.assert_close(x_next.float() / scale, ref_next.float() / scale, **tolerance(dtype))


def test_noise_follows_sample_ids_and_block_sizes():
    x_t, out = random_batch(4, (2, 6, 6), torch.float32, 30), random_batch(4, (2, 6, 6), torch.float32, 31)
    coeffs, ids = coefficient_row(1.0), torch.tensor([8, 3, 6, 1], device=DEVICE)
    full, _ = kernels.sampler_update(x_t, out, coeffs, seed=4, sample_ids=ids, stream=9, backend="triton",
                                     block_size=16)
    wide, _ = kernels.sampler_update(x_t, out, coeffs, seed=4, sample_ids=ids, stream=9, backend="triton",
                                     block_size=128)
    assert torch.equal(wide, full)
    part, _ = kernels.sampler_update(x_t[1:3], out[1:3], coeffs, seed=4, sample_ids=ids[1:3], stream=9,
                                     backend="triton")
    assert torch.equal(part, full[1:3])
    other_step, _ = kernels.sampler_update(x_t, out, coeffs, seed=4, sample_ids=ids, stream=10, backend="triton")
    assert not torch.allclose(other_step, full)


def test_bad_coefficients_are_named():
    x = torch.randn(2, 4, device=DEVICE)
    with pytest.raises(ValueError, match="coeffs must be a \\(6,\\) tensor"):
        kernels.sampler_update(x, x, torch.ones(5, device=DEVICE))
    with pytest.raises(ValueError, match="prediction"):
        kernels.sampler_update(x, x, torch.ones(6, device=DEVICE), prediction="score")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_sampling_loop_captured_in_cuda_graph_matches_eager():
    steps, batch = 6, 8
    table = torch.stack([coefficient_row(0.1 * k, alpha_bar=0.1 + 0.1 * k) for k in range(steps)])
    ids = torch.arange(batch, device=DEVICE) + 100
    x_start = torch.randn(batch, 3, 32, 32, device=DEVICE)

    def loop(x):
        x0_prev = torch.zeros_like(x)
        for k in range(steps):
            model_out = torch.tanh(x)  # a stand-in model: any device-only function of x
            x, x0_prev = kernels.sampler_update(x, model_out, table[k], x0_prev=x0_prev, seed=1, sample_ids=ids,
                                                stream=k + 1)
        return x

    eager = loop(x_start.clone())
    static_in = x_start.clone()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        loop(static_in)  # warm up: compile the kernels outside the capture
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = loop(static_in)
    graph.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(static_out, eager, atol=0, rtol=0)
    table[:, 5] = 0.0  # coefficients are read from the device at replay time: change them, no re-capture
    graph.replay()
    torch.testing.assert_close(static_out, loop(x_start.clone()), atol=0, rtol=0)


def test_reference_draws_noise_only_where_sigma_is_nonzero(monkeypatch):
    """Deterministic steps (sigma = 0: DDIM eta=0, DPM-Solver++) cost no Philox work on CPU either."""
    import sys

    module = sys.modules["kernels.sampler_update"]  # `kernels.sampler_update` is also the function's name
    calls = []
    real_randn = module.randn
    monkeypatch.setattr(module, "randn", lambda *a: calls.append(a) or real_randn(*a))
    x_t, out = (random_batch(4, (1, 8, 8), torch.float32, s) for s in (1, 2))
    for sigma in (0.0, 0.5):
        sampler_update_reference(x_t, out, coefficient_row(sigma), "eps", seed=3,
                                 sample_ids=torch.arange(4, device=DEVICE), stream=2)
    assert len(calls) == 1 and calls[0][:2] == (3, 2)
