"""What the hardware costs: link and chip profiles, and the link cost model shared by the
engine's link emulation (--link) and the planner. Pure Python, no MLX; imports nothing
above it."""
