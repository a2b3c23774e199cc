"""The metric: wall time (and Newton iterations) to take 5,000 square roots."""
import time

from solver import sqrt

inputs = [0.5 + i * 0.37 for i in range(5_000)]
t0 = time.perf_counter()
iterations = sum(sqrt(a)[1] for a in inputs)
print(f"iterations: {iterations}")
print(f"time_ms: {(time.perf_counter() - t0) * 1000:.2f}")
