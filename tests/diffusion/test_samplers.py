"""Samplers: coefficient tables against the papers' formulas, and every sampler run with the EXACT
eps-predictor of a Gaussian and of a Gaussian mixture must reproduce that distribution."""
import math

import numpy as np
import pytest
import torch
from scipy import stats

from oracles import GaussianMixture, ddim_step, ddpm_step, dpmpp_2m_step, eps_gaussian, linear_alpha_bar
from pipeline.diffusion import make_schedule
from pipeline.diffusion import samplers

SCHEDULE = make_schedule("linear", 1000)
CONFIGS = {  # name: (sampler, steps, kwargs)
    "ddpm-1000-beta_tilde": ("ddpm", 1000, {"ddpm_variance": "beta_tilde"}),
    "ddpm-100-beta": ("ddpm", 100, {"ddpm_variance": "beta"}),
    "ddim-100": ("ddim", 100, {}),
    "ddim-250-eta0.5": ("ddim", 250, {"eta": 0.5}),
    "dpmpp-20": ("dpmpp", 20, {}),
}


def kept_steps(sampler: str, steps: int, ab: np.ndarray) -> np.ndarray:
    """The respacing written out: evenly in t, or (DPM-Solver++) nearest steps evenly in log-SNR."""
    if sampler != "dpmpp":
        return np.unique(np.round(np.linspace(0, len(ab) - 1, steps)).astype(int))
    log_snr = np.log(ab / (1 - ab))
    return np.unique([int(np.argmin(np.abs(log_snr - v))) for v in np.linspace(log_snr[0], log_snr[-1], steps)])


def textbook_rows(sampler: str, ab_kept: np.ndarray, **kw):
    """Per step (sampling order): (c_xt, c_x0, c_x0_prev, sigma) read off the textbook update by evaluating
    it at unit inputs (every update is linear in x_t, x0_hat, x0_hat_prev)."""
    ab_t = ab_kept[::-1]
    ab_prev = np.concatenate([ab_kept[:-1][::-1], [1.0]])
    rows, h_prev = [], None
    for a, ap in zip(ab_t, ab_prev):
        if sampler == "ddpm":
            step = lambda x, x0, p: ddpm_step(a, ap, x, x0, kw.get("ddpm_variance", "beta_tilde"))  # noqa: E731
        elif sampler == "ddim":
            step = lambda x, x0, p: ddim_step(a, ap, x, x0, kw.get("eta", 0.0))  # noqa: E731
        else:
            step = lambda x, x0, p: (dpmpp_2m_step(a, ap, x, x0, p, h_prev)[0], 0.0)  # noqa: E731
        c_xt, sigma = step(1.0, 0.0, 0.0)
        c_x0, c_x0_prev = step(0.0, 1.0, 0.0)[0], step(0.0, 0.0, 1.0)[0]
        rows.append((c_xt, c_x0, c_x0_prev, sigma))
        if sampler == "dpmpp":
            h_prev = dpmpp_2m_step(a, ap, 0.0, 0.0, 0.0, h_prev)[1]
    return rows


@pytest.mark.parametrize("name", list(CONFIGS))
def test_coefficient_table_matches_textbook_formulas(name):
    sampler, steps, kw = CONFIGS[name]
    ab = linear_alpha_bar()
    keep = kept_steps(sampler, steps, ab)
    chain = SCHEDULE.respace(steps, "logsnr" if sampler == "dpmpp" else "linear")
    np.testing.assert_array_equal(chain.timesteps.numpy(), keep)
    np.testing.assert_allclose(chain.alphas_cumprod64.numpy(), ab[keep], rtol=1e-12)
    table = samplers.coefficient_table(chain, sampler, eta=kw.get("eta", 0.0),
                                       ddpm_variance=kw.get("ddpm_variance", "beta_tilde")).double().numpy()
    expected = np.array(textbook_rows(sampler, ab[keep], **kw))
    np.testing.assert_allclose(table[:, 0], np.sqrt(ab[keep][::-1]), rtol=1e-6)
    np.testing.assert_allclose(table[:, 1], np.sqrt(1 - ab[keep][::-1]), rtol=1e-6)
    np.testing.assert_allclose(table[:, [4, 2, 3, 5]], expected, rtol=1e-5, atol=1e-7)


def test_ddim_with_eta_one_is_ddpm_with_beta_tilde():
    chain = SCHEDULE.respace(40)
    ddim = samplers.coefficient_table(chain, "ddim", eta=1.0)
    ddpm = samplers.coefficient_table(chain, "ddpm", ddpm_variance="beta_tilde")
    torch.testing.assert_close(ddim, ddpm, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------------ Gaussian data
MEAN = torch.tensor([0.5, -0.3, 0.1, 0.8]).reshape(1, 2, 2)
STD = torch.tensor([0.3, 0.5, 0.7, 1.0]).reshape(1, 2, 2)
N = 3000


def exact_law(sampler, ab_kept, mu, s, **kw):
    """Mean and std of one dimension after the sampler's textbook updates with the exact x0_hat of
    N(mu, s^2) data (an affine map of x_t), propagated exactly from x_T ~ N(0, 1)."""
    m, cov = np.zeros(2), np.diag([1.0, 0.0])  # joint law of (x_t, previous x0_hat)
    for (c_xt, c_x0, c_x0_prev, sigma), a in zip(textbook_rows(sampler, ab_kept, **kw), ab_kept[::-1]):
        gain = math.sqrt(a) * s ** 2 / (a * s ** 2 + 1 - a)  # x0_hat = mu + gain (x_t - sqrt(a) mu)
        offset = mu - gain * math.sqrt(a) * mu
        M = np.array([[c_xt + c_x0 * gain, c_x0_prev], [gain, 0.0]])
        m = M @ m + np.array([c_x0 * offset, offset])
        cov = M @ cov @ M.T + np.diag([sigma ** 2, 0.0])
    return m[0], math.sqrt(cov[0, 0])


def gaussian_eps(x, t, y):
    return eps_gaussian(x, SCHEDULE.alphas_cumprod[t], MEAN, STD)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_sampler_reproduces_gaussian(name):
    sampler, steps, kw = CONFIGS[name]
    x = samplers.sample(gaussian_eps, (N, 1, 2, 2), SCHEDULE, sampler=sampler, steps=steps, clip_x0=False,
                        seed=1, **kw).reshape(N, -1).double()
    ab = linear_alpha_bar()
    ab_kept = ab[kept_steps(sampler, steps, ab)]
    reference = (MEAN + STD * torch.randn(N, 1, 2, 2, generator=torch.Generator().manual_seed(5))).reshape(N, -1)
    for d, (mu, s) in enumerate(zip(MEAN.flatten().tolist(), STD.flatten().tolist())):
        law_mean, law_std = exact_law(sampler, ab_kept, mu, s, **kw)
        # the implementation follows its own discretisation exactly (Monte Carlo error only) ...
        assert abs(x[:, d].mean() - law_mean) < 4 * law_std / math.sqrt(N), (d, float(x[:, d].mean()), law_mean)
        assert abs(x[:, d].std() / law_std - 1) < 4 / math.sqrt(2 * N), (d, float(x[:, d].std()), law_std)
        # ... and that discretisation reproduces the data distribution
        assert abs(law_mean - mu) < 0.01 * s and abs(law_std / s - 1) < 0.05, (d, law_mean, law_std)
        assert stats.ks_2samp(x[:, d].numpy(), reference[:, d].numpy()).pvalue > 1e-3


# ------------------------------------------------------------------------------------- mixture data
MIXTURE = GaussianMixture([0.3, 0.7], [[-0.8, 0.5], [0.7, -0.4]], [[0.25, 0.3], [0.3, 0.2]], (2,))
LABELLED = [GaussianMixture([1.0], [m], [s], (2,)) for m, s in zip(MIXTURE.m.tolist(), MIXTURE.s.tolist())]


def mixture_eps(x, t, y):
    return MIXTURE.eps(x, SCHEDULE.alphas_cumprod[t])


def assert_same_distribution(x: torch.Tensor, reference: torch.Tensor):
    x, reference = x.double(), reference.double()
    torch.testing.assert_close(x.mean(0), reference.mean(0), atol=0.05, rtol=0)
    torch.testing.assert_close(x.std(0), reference.std(0), atol=0.05, rtol=0)
    projection = torch.tensor([0.6, 0.8], dtype=torch.float64)
    for a, b in [(x[:, 0], reference[:, 0]), (x[:, 1], reference[:, 1]), (x @ projection, reference @ projection)]:
        assert stats.ks_2samp(a.numpy(), b.numpy()).pvalue > 1e-3


@pytest.mark.parametrize("sampler,steps,kw", [("ddpm", 250, {}), ("ddim", 100, {}), ("dpmpp", 25, {}),
                                              ("ddim", 50, {"corrector_steps": 1, "corrector_snr": 0.1})])
def test_sampler_reproduces_gaussian_mixture(sampler, steps, kw):
    n = 2000
    x = samplers.sample(mixture_eps, (n, 2), SCHEDULE, sampler=sampler, steps=steps, clip_x0=False, seed=2, **kw)
    reference = MIXTURE.sample(n, seed=3)
    assert_same_distribution(x, reference)
    assert abs(float((x[:, 0] > 0).double().mean()) - 0.7) < 0.04  # the mixture weights survive


def test_langevin_corrector_moves_a_coarse_sampler_towards_the_data():
    n, reference = 2000, MIXTURE.sample(20000, seed=6)
    coarse = {"sampler": "ddim", "steps": 20, "spacing": "linear", "clip_x0": False, "seed": 2}
    plain = samplers.sample(mixture_eps, (n, 2), SCHEDULE, **coarse)
    corrected = samplers.sample(mixture_eps, (n, 2), SCHEDULE, **coarse, corrector_steps=2, corrector_snr=0.3)
    # 20 deterministic DDIM steps shrink the spread; Langevin steps with the exact score restore part of it
    plain_error = (plain.double().std(0) - reference.std(0)).abs()
    corrected_error = (corrected.double().std(0) - reference.std(0)).abs()
    assert (corrected_error < 0.7 * plain_error).all(), (plain_error, corrected_error)


# --------------------------------------------------------------------------- classifier-free guidance
class LabelledMixture:
    """Exact conditional (y = 0, 1) and unconditional (y = 2 = null) eps; records every call."""

    def __init__(self):
        self.batch_sizes = []

    def __call__(self, x, t, y):
        self.batch_sizes.append(x.shape[0])
        ab = SCHEDULE.alphas_cumprod[t]
        out = MIXTURE.eps(x, ab)
        for label, dist in enumerate(LABELLED):
            rows = y == label
            if rows.any():
                out[rows] = dist.eps(x[rows], ab[rows])
        return out


def test_guidance_one_batched_call_per_step_and_limits():
    n, steps = 1500, 30
    model = LabelledMixture()
    y0 = torch.zeros(n, dtype=torch.int64)
    # w = 0 keeps only the unconditional model: the whole mixture, although every label is 0
    x = samplers.sample(model, (n, 2), SCHEDULE, sampler="dpmpp", steps=steps, guidance=0.0, y=y0,
                        null_class=2, clip_x0=False)
    assert model.batch_sizes == [2 * n] * steps  # one doubled call per step
    assert_same_distribution(x, MIXTURE.sample(n, seed=4))
    # w = 1 is plain conditional sampling (one un-doubled call per step): component 0 only
    model.batch_sizes.clear()
    x = samplers.sample(model, (n, 2), SCHEDULE, sampler="dpmpp", steps=steps, guidance=1.0, y=y0,
                        null_class=2, clip_x0=False)
    assert model.batch_sizes == [n] * steps
    assert_same_distribution(x, LABELLED[0].sample(n, seed=4))
    # w = 3 pushes away from the unconditional: samples move further from component 1 than w = 1 does
    guided = samplers.sample(model, (n, 2), SCHEDULE, sampler="dpmpp", steps=steps, guidance=3.0, y=y0,
                             null_class=2, clip_x0=False)
    component1 = MIXTURE.m[1].float()
    assert (guided - component1).norm(dim=1).mean() > (x - component1).norm(dim=1).mean() + 0.05


def test_guidance_without_null_class_is_an_error():
    with pytest.raises(ValueError, match="null_class"):
        samplers.sample(mixture_eps, (4, 2), SCHEDULE, sampler="ddim", steps=5, guidance=2.0,
                        y=torch.zeros(4, dtype=torch.int64))


# ------------------------------------------------------------------------------------- determinism
@pytest.mark.parametrize("sampler", ["ddpm", "dpmpp"])
def test_a_sample_depends_on_seed_and_id_not_on_the_batch(sampler):
    full = samplers.sample(gaussian_eps, (8, 1, 2, 2), SCHEDULE, sampler=sampler, steps=20, seed=7)
    part = samplers.sample(gaussian_eps, (2, 1, 2, 2), SCHEDULE, sampler=sampler, steps=20, seed=7,
                           sample_ids=[5, 3])
    torch.testing.assert_close(part, full[[5, 3]], rtol=0, atol=0)
    other = samplers.sample(gaussian_eps, (8, 1, 2, 2), SCHEDULE, sampler=sampler, steps=20, seed=8)
    assert (other - full).abs().min() > 0


def test_clip_x0_keeps_samples_in_range():
    x = samplers.sample(lambda x, t, y: -x, (64, 1, 2, 2), SCHEDULE, sampler="ddim", steps=10, clip_x0=True)
    assert x.abs().max() <= 1.0


@pytest.mark.parametrize("bad,match", [({"sampler": "euler"}, "sampler"), ({"prediction": "score"}, "prediction"),
                                       ({"sample_ids": [1, 2]}, "sample_ids"), ({"eta": -1.0}, "eta")])
def test_bad_arguments_name_the_problem(bad, match):
    kwargs = {"sampler": "ddim", "steps": 5, **bad}
    with pytest.raises(ValueError, match=match):
        samplers.sample(gaussian_eps, (4, 1, 2, 2), SCHEDULE, **kwargs)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="host-device synchronisation only exists on CUDA")
def test_step_loop_makes_no_host_device_sync():
    from pipeline.models import UNet

    device = torch.device("cuda")
    schedule = SCHEDULE.to(device)
    model = UNet(1, 32, (1, 2), 1, (4,), 0.0, 10, 8).to(device).eval()
    plan = samplers.make_plan(schedule, 16, sampler="dpmpp", steps=10, y=torch.zeros(16, dtype=torch.int64),
                              device=device)
    x_T = torch.randn(16, 1, 8, 8, device=device)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:  # guidance + corrector: every code path of the loop, with a real class-conditional UNet
        out = samplers.denoise(model, x_T, plan, guidance=2.0, null_class=10, corrector_steps=1)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.isfinite(out).all()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the fused Triton sampler update runs on CUDA")
@pytest.mark.parametrize("sampler", ["ddpm", "ddim", "dpmpp"])
def test_triton_sampler_matches_the_torch_reference_on_cuda(sampler):
    schedule = SCHEDULE.to("cuda")
    model = lambda x, t, y: eps_gaussian(x, schedule.alphas_cumprod[t], MEAN.cuda(), STD.cuda())  # noqa: E731
    kwargs = dict(sampler=sampler, steps=25, eta=0.5, seed=3, sample_ids=torch.arange(100, 356), clip_x0=True)
    fused = samplers.sample(model, (256, 1, 2, 2), schedule, backend="triton", **kwargs)
    reference = samplers.sample(model, (256, 1, 2, 2), schedule, backend="torch", **kwargs)
    torch.testing.assert_close(fused, reference, rtol=1e-4, atol=1e-4)
