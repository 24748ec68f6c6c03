"""Flax models. Each returns a dict: ``{"disp": field, "features": {level: F_level}, ...}``."""

from crd_jax.models.registrar import Registrar, downsample_pair
from crd_jax.models.voxelmorph import VM_DECODER, VM_ENCODER, UNet, VoxelMorph

__all__ = ["Registrar", "downsample_pair", "UNet", "VoxelMorph", "VM_ENCODER", "VM_DECODER"]
