"""Model FLOPs per image (pipeline.flops): checked against a count by hand, and independent of the device."""
import torch
from torch import nn

from pipeline.config import load_config
from pipeline.factory import build_model
from pipeline.flops import PEAK_BF16_TFLOPS, flops_per_image, peak_tflops


def test_mlp_flops_match_a_count_by_hand():
    """Every FLOP of the MLP denoiser is in its Linear layers: 2 per multiply-add, forward; backward computes
    the weight gradient of every layer and the input gradient of every layer but the first (its input, built
    from the data, needs none)."""
    config = load_config("configs/toy2d.yaml")
    linears = [m for m in build_model(config).modules() if isinstance(m, nn.Linear)]
    forward = sum(2 * m.in_features * m.out_features for m in linears)
    backward = forward + forward - 2 * linears[0].in_features * linears[0].out_features
    assert flops_per_image(config, train=False) == forward
    assert flops_per_image(config, train=True) == forward + backward


def test_unet_count_on_meta_equals_a_count_on_real_weights():
    from torch.utils.flop_counter import FlopCounterMode

    config = load_config("configs/tiny.yaml")
    model = build_model(config)
    x, t = torch.randn(2, 1, 8, 8), torch.zeros(2, dtype=torch.long)
    with FlopCounterMode(display=False) as counter:
        model(x, t).sum().backward()
    assert flops_per_image(config, train=True) == counter.get_total_flops() / 2 > 0


def test_peak_table_is_none_off_gpu_and_lists_a100_before_a10():
    assert peak_tflops(torch.device("cpu")) is None
    names = [name for name, _ in PEAK_BF16_TFLOPS]
    assert names.index("A100") < names.index("A10") and names.index("H100 PCIe") < names.index("H100")
