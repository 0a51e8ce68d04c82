"""The profile's categories: real operator names (CPU) and kernel names (CUDA: cuDNN, cuBLAS, at::native functors,
Triton) land where a reader of the breakdown expects them, since the GPU names cannot be produced here."""
import pytest

from benchmarks.profile_breakdown import breakdown, category


@pytest.mark.parametrize("name, expected", [
    ("aten::convolution_backward", "convolutions"),
    ("sm90_xmma_fprop_implicit_gemm_bf16bf16_bf16f32_f32_nhwckrsc_nhwc_tilesize128x128x64", "convolutions"),
    ("sm90_xmma_wgrad_implicit_gemm_indexed_bf16bf16_bf16f32_f32_nhwckrsc_nhwc", "convolutions"),
    ("aten::native_group_norm", "norms"),
    ("autograd::engine::evaluate_function: NativeGroupNormBackward0", "norms"),
    ("void at::native::(anonymous namespace)::RowwiseMomentsCUDAKernel<c10::BFloat16>", "norms"),
    ("pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits<64, 128, 128, 4>>", "attention"),
    ("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64", "matmuls (linear)"),
    ("aten::addmm", "matmuls (linear)"),
    ("void at::native::vectorized_elementwise_kernel<4, at::native::silu_kernel(at::TensorIteratorBase&)>",
     "activations"),
    ("void at::native::multi_tensor_apply_kernel<at::native::LerpFunctor<float>>", "EMA"),
    ("aten::_foreach_lerp_", "EMA"),
    ("void at::native::multi_tensor_apply_kernel<at::native::FusedAdamMathFunctor<float, 4>>", "optimizer"),
    ("aten::_foreach_norm", "optimizer"),
    ("void cudnn::ops::nchwToNhwcKernel<__nv_bfloat16>", "copies and casts"),
    ("Memcpy HtoD (Pageable -> Device)", "copies and casts"),
    ("_q_sample_kernel", "fused loss / noise kernels"),
    ("triton_red_fused_native_group_norm_silu_0", "compiled (inductor) graphs and kernels"),
    ("aten::add", "other (elementwise, reductions, ...)"),
])
def test_names_fall_into_their_category(name, expected):
    assert category(name) == expected


def test_a_cpu_breakdown_adds_up_to_the_wall_time():
    import torch

    conv, x = torch.nn.Conv2d(8, 8, 3), torch.randn(16, 8, 32, 32)
    rows, wall = breakdown(lambda: torch.nn.functional.silu(conv(x)), torch.device("cpu"), steps=3)
    by_name = {r["category"]: r["ms_per_step"] for r in rows}
    assert by_name["convolutions"] > 0 and by_name["activations"] > 0
    assert sum(by_name.values()) == pytest.approx(wall, abs=0.01)  # categories + outside operators = wall
