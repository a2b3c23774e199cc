"""Square roots by damped Newton iteration: the file the agent edits in the
general-mode example (README: "Any target a command can score")."""

# Hyperparameters
DAMPING = 0.2        # fraction of the Newton step taken per iteration
TOLERANCE = 1e-12    # stop when |x*x - a| <= TOLERANCE * a


def sqrt(a: float) -> tuple[float, int]:
    """(square root of a > 0, iterations used)."""
    x = max(a, 1.0)
    iterations = 0
    while abs(x * x - a) > TOLERANCE * a:
        x -= DAMPING * (x * x - a) / (2.0 * x)
        iterations += 1
        if iterations > 100_000:
            raise RuntimeError(f"no convergence for a={a} (DAMPING={DAMPING})")
    return x, iterations
