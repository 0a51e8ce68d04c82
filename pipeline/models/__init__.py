"""Networks: the DDPM denoisers (UNet, DiT, MLP for 2-D points) and the convolutional VAE."""
from .unet import UNet, drop_labels
from .vae import VAE

__all__ = ["UNet", "VAE", "drop_labels"]
