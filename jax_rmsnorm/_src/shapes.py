"""The (rows, hidden, dtype) list shared by the tests, benchmarks and main job.

LLM shapes: hidden sizes of real models (896 Qwen2-0.5B, 2048, 3072, 4096
Llama, 5120, 8192, 14336) and token counts from one decode step to a long
prefill. The large ones are the shapes peers and earlier runs were measured at; 13 x 5120 and
4096 x 4099 are where XLA was measured ahead of the Triton forward on an
H200.
"""

from __future__ import annotations

BENCHMARK_SHAPES: tuple[tuple[int, int, str], ...] = (
    (32768, 4096, "bfloat16"),
    (16384, 8192, "bfloat16"),
    (32768, 3072, "bfloat16"),
    (65536, 896, "bfloat16"),
    (4096, 14336, "bfloat16"),
    (8192, 5120, "bfloat16"),
    (4096, 2048, "bfloat16"),
    (2048, 4096, "bfloat16"),
    (256, 4096, "bfloat16"),
    (128, 14336, "bfloat16"),
    (16, 4096, "bfloat16"),
    (1, 4096, "bfloat16"),
    (1, 8192, "bfloat16"),
    (13, 5120, "bfloat16"),    # a decode batch at an odd row count
    (4096, 4099, "bfloat16"),  # N not a multiple of 128 (nor of 8)
    (32768, 4096, "float32"),
    (16384, 8192, "float32"),
    (65536, 896, "float32"),
    (4096, 14336, "float32"),
    (8192, 5120, "float32"),
    (2048, 4096, "float32"),
    (256, 4096, "float32"),
    (16, 4096, "float32"),
    (1, 8192, "float32"),
    (13, 5120, "float32"),
    (4096, 4099, "float32"),
)

# Inputs of at least this many elements are "large": they must run near the
# copy ceiling (8M elements = 16 MiB of bf16).
LARGE_ELEMENTS = 8 * 1024 * 1024
