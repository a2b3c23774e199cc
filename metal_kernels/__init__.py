"""Attention hot path: Metal kernel sources, the MLX wrapper with its VJP, the CPU emulator."""
