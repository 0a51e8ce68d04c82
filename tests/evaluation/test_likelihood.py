"""Item 2: likelihood of held-out real shards under real exports (pipeline.checkpoint format)."""
import json
import math

import pytest
import torch

from pipeline.checkpoint import export_weights
from pipeline.cli import main
from pipeline.config import load_config
from pipeline.data.ingest import prepare
from pipeline.diffusion.likelihood import bits_per_dim
from pipeline.evaluation.likelihood import vae_bounds
from pipeline.factory import build_model, build_schedule
from pipeline.images import to_model_range


@pytest.fixture(scope="module")
def digits_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("digits") / "digits"
    prepare("digits", folder, progress=False)
    return folder


def fresh_export(config_name, run_dir):
    """A real export of a freshly initialised model (what training writes, minus the training)."""
    config = load_config(f"configs/{config_name}.yaml")
    torch.manual_seed(0)
    model = build_model(config)
    return config, model, export_weights(model.state_dict(), config, 0, run_dir)


def evaluate_json(capsys, *args):
    assert main(["evaluate", *map(str, args)]) == 0
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_iwae_is_never_looser_than_the_elbo_of_the_same_draws(digits_halves):
    config = load_config("configs/tiny_vae.yaml")
    torch.manual_seed(0)
    vae = build_model(config).eval()
    x = to_model_range(digits_halves[0][:32])
    bounds = vae_bounds(vae, x, num_importance=16, generator=torch.Generator().manual_seed(0))
    assert torch.all(bounds["niwae"] <= bounds["nelbo"] + 1e-9)
    # the Monte-Carlo ELBO (KL sampled) agrees with the model's own (KL in closed form) on average
    many = vae_bounds(vae, x, num_importance=128, generator=torch.Generator().manual_seed(1))["nelbo"].mean()
    with torch.no_grad():
        own = torch.stack([vae.elbo(x, torch.Generator().manual_seed(s))["nelbo"] for s in range(32)]).mean()
    assert float(many) == pytest.approx(float(own), rel=0.005)


def test_ddpm_ode_nll_of_an_untrained_unet_matches_its_closed_form(capsys, digits_dir, tmp_path):
    # the UNet's output layer starts at zero, so eps = 0 and the probability-flow ODE only rescales x:
    # x_T = x_0 sqrt(ab_T / ab_0), i.e. the model density is exactly N(0, (ab_0 / ab_T) I).
    config, _, export = fresh_export("tiny", tmp_path / "run")
    result = evaluate_json(capsys, "--real", digits_dir, "--checkpoint", export, "--likelihood-num", 8,
                           "--vlb-steps", 20, "--ode-steps", 20)
    ab = build_schedule(config).alphas_cumprod64
    variance = float(ab[0] / ab[-1])
    dims = 64
    nats = 0.5 * dims * math.log(2 * math.pi * variance)  # + |x|^2 / (2 variance) < 1e-3 nats: dropped
    expected = float(bits_per_dim(torch.tensor(nats), dims, num_bins=256))
    assert result["ddpm_ode_bpd"] == pytest.approx(expected, abs=2e-3)
    assert result["num_likelihood"] == 8 and result["model_step"] == 0
    assert math.isfinite(result["ddpm_vlb20_bpd"]) and result["ddpm_vlb20_bpd"] > 0


def test_vae_export_reports_elbo_iwae_and_psnr(capsys, digits_dir, tmp_path):
    _, _, export = fresh_export("tiny_vae", tmp_path / "run")
    result = evaluate_json(capsys, "--real", digits_dir, "--checkpoint", export, "--likelihood-num", 16,
                           "--iwae-samples", 8)
    assert result["vae_iwae8_bpd"] <= result["vae_elbo_bpd"]
    assert math.isfinite(result["vae_recon_psnr_db"])


def test_model_of_another_shape_is_refused(capsys, tmp_path):
    from .conftest import write_shard_set

    images = torch.zeros(4, 1, 28, 28, dtype=torch.uint8)
    write_shard_set(tmp_path / "big", images, torch.zeros(4, dtype=torch.int64), {"kind": "test"})
    _, _, export = fresh_export("tiny", tmp_path / "run")
    assert main(["evaluate", "--real", str(tmp_path / "big"), "--checkpoint", str(export)]) == 2
    assert "expects (1, 8, 8)" in capsys.readouterr().err
