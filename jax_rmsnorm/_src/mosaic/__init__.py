"""The Pallas kernels on the Mosaic GPU backend (`plgpu.kernel`, Hopper):
forward (with the fused residual add), backward, and their launch
configuration."""
