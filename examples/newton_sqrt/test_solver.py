"""The guard: results must stay accurate, whatever the speed."""
import math

from solver import sqrt

for a in (0.5, 2.0, 10.0, 12345.678, 1e6):
    root, _ = sqrt(a)
    assert math.isclose(root, math.sqrt(a), rel_tol=1e-9), (a, root)
print("ok")
