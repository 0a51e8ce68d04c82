"""The settings objects of `sample` and `generate`: flags declared once, checked in the object."""
import argparse

import pytest

from pipeline.cli import main
from pipeline.config import load_config
from pipeline.generation import settings as s
from tests.generate.helpers import generate, manifest, read_samples

DDPM = load_config("configs/tiny.yaml", ["diffusion.timesteps=100", "diffusion.sample_steps=7"])
COND = load_config("configs/tiny.yaml", ["model.num_classes=3", "diffusion.guidance=1.5"])
VAE = load_config("configs/tiny_vae.yaml")


def parse(settings_type, *argv):
    parser = argparse.ArgumentParser()
    s.add_arguments(parser, settings_type)
    return settings_type.from_args(parser.parse_args(list(argv)))


def test_sample_and_generate_share_the_sampler_flags():
    shared = {f.name for f in s.dataclasses.fields(s.SamplerSettings)}
    for command in (s.SampleSettings, s.GenerateSettings):
        assert shared <= {f.name for f in s.dataclasses.fields(command)}
    got = parse(s.GenerateSettings, "--checkpoint", "c", "--out", "o", "--num-samples", "5", "--compile",
                "--no-progress", "--no-cuda-graph", "--classes", "1", "2", "--eta", "0.5")
    assert (got.compile_model, got.progress, got.cuda_graph, got.classes, got.eta) == (True, False, False, [1, 2], 0.5)
    assert parse(s.SampleSettings, "--checkpoint", "c") == s.SampleSettings(checkpoint="c")


def test_config_fills_what_the_flags_leave_open():
    ddim = s.DEFAULT_SPACING["ddim"]
    assert s.SampleSettings(checkpoint="c", seed=4).sampling_for(DDPM) == s.Sampling("ddim", 7, 0.0, 1.0, 4, None,
                                                                                    spacing=ddim)
    assert s.SampleSettings(checkpoint="c").sampling_for(COND) == s.Sampling("ddim", 50, 0.0, 1.5, 0, [0, 1, 2],
                                                                             spacing=ddim)


def test_spacing_is_recorded_only_when_it_differs_from_before_the_flag(recwarn):
    def record(**kwargs):
        return s.SampleSettings(checkpoint="c", **kwargs).sampling_for(DDPM).record()

    assert "spacing" not in record(sampler="ddim", spacing="linear")  # folders from before --spacing resume
    assert "spacing" not in record(sampler="dpmpp")
    assert record(sampler="ddim", spacing="trailing")["spacing"] == "trailing"
    assert not recwarn.list


def test_dpm_solver_with_an_unstable_spacing_warns():
    with pytest.warns(s.SamplingWarning, match="--spacing linear with --sampler dpmpp"):
        s.SampleSettings(checkpoint="c", sampler="dpmpp", spacing="linear").sampling_for(DDPM)


@pytest.mark.parametrize("kwargs,config,named", [
    ({"steps": 0}, DDPM, "--steps must be >= 1, got 0"),
    ({"steps": -3}, DDPM, "--steps must be >= 1"),
    ({"steps": 101}, DDPM, "--steps must be in [1, 100]"),
    ({"eta": -0.1}, DDPM, "--eta must be >= 0"),
    ({"eta": 0.3, "sampler": "dpmpp"}, DDPM, "applies to --sampler ddim only"),
    ({"num": 0}, DDPM, "--num must be >= 1, got 0"),
    ({"guidance": 2.0}, DDPM, "unconditional model"),
    ({"classes": [3]}, COND, "--classes [3] out of range"),
    ({"steps": 5}, VAE, "--steps apply to diffusion (ddpm) models only"),
    ({"sampler": "ddim", "eta": 1.0}, VAE, "--sampler, --eta apply to diffusion"),
    ({"corrector_steps": 1}, VAE, "--corrector-steps apply to diffusion"),
    ({"spacing": "trailing"}, VAE, "--spacing apply to diffusion"),
    ({"corrector_steps": -1}, DDPM, "--corrector-steps must be >= 0"),
    ({"corrector_snr": 0.0}, DDPM, "--corrector-snr > 0"),
])
def test_flags_that_cannot_apply_are_refused(kwargs, config, named):
    with pytest.raises(s.SettingsError, match=None) as info:
        s.SampleSettings(checkpoint="c", **kwargs).sampling_for(config)
    assert named in str(info.value)


@pytest.mark.parametrize("argv,named", [
    (["sample", "--checkpoint", "nowhere", "--steps", "0"], "--steps must be >= 1, got 0"),
    (["sample", "--checkpoint", "nowhere", "--num", "-1"], "--num must be >= 1"),
    (["generate", "--checkpoint", "nowhere", "--out", "x", "--num-samples", "0"], "--num-samples"),
])
def test_cli_prints_one_line_and_exits_2(capsys, tmp_path, monkeypatch, argv, named):
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert named in err and err.count("\n") == 1
    assert list(tmp_path.iterdir()) == []


def test_langevin_corrector_is_reachable_and_recorded(uncond_run, tmp_path):
    plain, corrected = tmp_path / "plain", tmp_path / "corrected"
    assert generate(uncond_run, plain, 3, "--sampler", "ddim") == 0
    assert generate(uncond_run, corrected, 3, "--sampler", "ddim", "--corrector-steps", "1") == 0
    assert "corrector_steps" not in manifest(plain)["generator"]  # folders from before the corrector resume
    assert manifest(corrected)["generator"]["corrector_steps"] == 1
    a, b = read_samples(plain), read_samples(corrected)
    assert b[0]["meta"]["corrector_snr"] == 0.1 and "corrector_steps" not in a[0]["meta"]
    assert any((x["image"] != y["image"]).any() for x, y in zip(a, b))
