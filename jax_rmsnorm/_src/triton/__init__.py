"""The Pallas kernels lowered through Pallas's Triton backend: forward (with
the fused residual add), backward, and their launch configuration."""
