"""Networks: the noise-prediction UNet and the convolutional VAE."""
from .unet import UNet, drop_labels
from .vae import VAE

__all__ = ["UNet", "VAE", "drop_labels"]
