"""False-keep rate of the keep rules over repeated A/A comparisons (a SIMULATION driven by a
measured noise distribution), and their power on planted real gains.

    uv run bench/false_keep.py --values 3.3362 3.1992 ...      # measured val_bpb of one file
    uv run bench/false_keep.py --ledger ledger.jsonl           # the latest `noise` record

Each trial plays what the runner does: the baseline is run --noise-runs times (its mean is
the best, its sample std the rule's sigma, so sigma's own estimation error is included),
then a candidate with the SAME distribution (A/A) or one shifted by g * sigma is judged by
greedy and by the noise-aware rule (decide.py, re-runs drawn from the same distribution).
Draws are either resampled from the measured values (empirical, with replacement) or
normal with their mean and std (--normal). Prints keep rates and re-runs per decision, of
the rule against the best's record and of the runner's rule, paired with runs of the best
(drawn from the baseline's distribution). The waves judge against the record (the rule
before 2026-12-07). --no-clear-wins turns off the runner's keep of a clear win after the
first pair (decide.NoiseAware.clear_win), for the figures before it.

--parallel N (default 4) plays a wave of N candidates from one parent, as `run --workers N`
does: the best first run of the wave is confirmed by a fresh run that goes through the rule
(re-runs and all), every other candidate is discarded. It prints the keep rate per wave and
per candidate against the sequential rule's, and what keeping the wave's best on its own
(selected) first run would do: the bias the confirmation removes. With a planted gain, one
candidate of the wave has it and the others are A/A.

--after-keep G judges a second candidate against a first one, G sigma better than the
baseline, that was kept by the runner's rule: the best's record is then the kept candidate's
mean, on its runs (one, for a clear win), which the next candidate's first run must beat
before it is confirmed beside runs of the best.

--drift D adds what a shared box does: its speed, and so every run's value, wanders as a
random walk of D sigma per run. The candidate is judged --gap runs after the baseline was
measured, once against the best's record and once beside runs of the best (the runner's
rule), each on the same draws.
"""
from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from autoresearch.decide import DEFAULT_RERUNS, Best, Greedy, NoiseAware  # noqa: E402

CLEAR_WINS = True     # --no-clear-wins: the runner's rule without its clear-win look


def noise_rule(sigma, confidence, reruns, df):
    return NoiseAware(sigma, confidence, reruns, df=df, clear_wins=CLEAR_WINS)


def load_values(args) -> list[float]:
    if args.values:
        return list(args.values)
    records = [json.loads(l) for l in Path(args.ledger).read_text().splitlines() if l.strip()]
    noise = [r for r in records if r.get("event") == "noise"]
    if not noise:
        sys.exit(f"{args.ledger} has no noise record: run `autoresearch noise` first.")
    return noise[-1]["values"]


def sampler(values, normal, seed):
    """(draw(shift) -> one run's value, mean, std): resampled from the measured values, or a normal fit."""
    rng = random.Random(seed)
    mu, sd = statistics.fmean(values), statistics.stdev(values)
    centred = [v - mu for v in values]

    def draw(shift):
        return mu + shift + (rng.gauss(0.0, sd) if normal else rng.choice(centred))
    return draw, mu, sd


def simulate(values, trials, noise_runs, reruns, confidence, shift_sigmas, normal, seed):
    draw, mu, sd = sampler(values, normal, seed)
    out = {}
    for g in shift_sigmas:
        shift = -g * sd    # lower val_bpb is better: a real gain of g sigma
        keeps = {"greedy": 0, "noise": 0, "paired": 0}
        rerun_count = paired_count = 0
        for _ in range(trials):
            base_runs = [draw(0.0) for _ in range(noise_runs)]
            single = base_runs[0]
            cand = draw(shift)
            # greedy: upstream compares with a single baseline run
            keeps["greedy"] += Greedy().decide(cand, Best(single), lambda i: None).status == "keep"
            rule = noise_rule(statistics.stdev(base_runs), confidence, reruns, noise_runs - 1)
            best = Best(statistics.fmean(base_runs), noise_runs)
            used = []

            def rerun(i):
                used.append(i)
                return draw(shift)

            def rerun_best(i):
                used.append(i)
                return draw(0.0)
            keeps["noise"] += rule.decide(cand, best, rerun).status == "keep"
            rerun_count += len(used)
            used.clear()
            keeps["paired"] += rule.decide(cand, best, rerun, rerun_best=rerun_best).status == "keep"
            paired_count += len(used)
        out[g] = {"greedy": keeps["greedy"] / trials, "noise": keeps["noise"] / trials,
                  "paired": keeps["paired"] / trials, "reruns_per_decision": rerun_count / trials,
                  "paired_reruns": paired_count / trials}
    return mu, sd, out


def simulate_wave(values, trials, noise_runs, reruns, confidence, shift_sigmas, normal, seed, n):
    """Keep rates of a wave of n candidates (one shifted by g sigma, the rest A/A), per wave."""
    draw, _, sd = sampler(values, normal, seed + 1)
    out = {}
    for g in shift_sigmas:
        shifts = [-g * sd] + [0.0] * (n - 1)
        kept = {"confirmed": 0, "naive": 0}
        kept_real = 0
        for _ in range(trials):
            base_runs = [draw(0.0) for _ in range(noise_runs)]
            best = Best(statistics.fmean(base_runs), noise_runs)
            rule = noise_rule(statistics.stdev(base_runs), confidence, reruns, noise_runs - 1)
            first = [draw(s) for s in shifts]
            w = min(range(n), key=lambda i: first[i])
            rerun = lambda i: draw(shifts[w])   # noqa: E731
            # naive: the rule applied to the selected first run itself
            kept["naive"] += rule.decide(first[w], best, rerun).status == "keep"
            if first[w] < best.value:
                # the runner: a fresh, selection-free run goes through the rule
                if rule.decide(draw(shifts[w]), best, rerun).status == "keep":
                    kept["confirmed"] += 1
                    kept_real += (w == 0 and g > 0)
        out[g] = {k: v / trials for k, v in kept.items()}
        out[g]["real"] = kept_real / trials
    return out


def simulate_after_keep(values, trials, noise_runs, reruns, confidence, shift_sigmas, normal, seed, first_gain):
    """The decision after a keep, both by the runner's rule: a first candidate with a clear
    gain (first_gain sigma) is judged beside runs of the baseline; where kept, its verdict's
    mean and runs become the best's record, and a second candidate g sigma better than the
    first is judged against that record and beside runs of the first. A record that is one
    lucky run turns away real gains at the second candidate's first run."""
    draw, _, sd = sampler(values, normal, seed + 2)
    out = {}
    for g in shift_sigmas:
        first_kept = second_kept = runs = 0
        for _ in range(trials):
            base_runs = [draw(0.0) for _ in range(noise_runs)]
            rule = noise_rule(statistics.stdev(base_runs), confidence, reruns, noise_runs - 1)
            s1, s2 = -first_gain * sd, -(first_gain + g) * sd
            first = rule.decide(draw(s1), Best(statistics.fmean(base_runs), noise_runs), lambda i: draw(s1),
                                rerun_best=lambda i: draw(0.0))
            runs += len(first.runs) + len(first.best_runs)
            if first.status != "keep":
                continue
            first_kept += 1
            second = rule.decide(draw(s2), Best(first.value, len(first.runs)), lambda i: draw(s2),
                                 rerun_best=lambda i: draw(s1))
            runs += len(second.runs) + len(second.best_runs)
            second_kept += second.status == "keep"
        out[g] = {"kept": second_kept / max(first_kept, 1), "runs": runs / trials}
    return out


def simulate_drift(values, trials, noise_runs, reruns, confidence, shift_sigmas, normal, seed, drift, gap):
    """Keep rates with a drifting box: against the best's record (measured `gap` runs before
    the candidate) and paired with runs of the best beside the candidate's."""
    draw, _, sd = sampler(values, normal, seed + 3)
    rng = random.Random(seed + 4)
    out = {}
    for g in shift_sigmas:
        kept = {"record": 0, "paired": 0}
        runs = {"record": 0, "paired": 0}
        for _ in range(trials):
            level = [0.0]

            def run(shift):
                level[0] += rng.gauss(0.0, drift * sd)
                return draw(shift) + level[0]
            base_runs = [run(0.0) for _ in range(noise_runs)]
            for _ in range(gap):
                level[0] += rng.gauss(0.0, drift * sd)
            best = Best(statistics.fmean(base_runs), noise_runs)
            start = level[0]
            for how in ("record", "paired"):
                level[0] = start      # both rules see the box in the same state
                rule = noise_rule(statistics.stdev(base_runs), confidence, reruns, noise_runs - 1)
                shift = -g * sd
                used = []

                def rerun(i, s=shift):
                    used.append(i)
                    return run(s)

                def rerun_best(i):
                    used.append(i)
                    return run(0.0)
                v = rule.decide(run(shift), best, rerun, rerun_best=rerun_best if how == "paired" else None)
                kept[how] += v.status == "keep"
                runs[how] += len(used)
        out[g] = {k: kept[k] / trials for k in kept} | {f"{k}_runs": runs[k] / trials for k in runs}
    return out


def gain_label(g: float) -> str:
    return "A/A" if g == 0 else f"{g:g} sigma"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--values", type=float, nargs="+", help="measured values of one training file")
    src.add_argument("--ledger", help="ledger.jsonl with a `noise` record")
    p.add_argument("--trials", type=int, default=20000)
    p.add_argument("--noise-runs", type=int, default=5)
    p.add_argument("--reruns", type=int, default=DEFAULT_RERUNS)
    p.add_argument("--confidence", type=float, default=0.95)
    p.add_argument("--gains", type=float, nargs="+", default=[0.0, 1.0, 2.0, 3.0],
                   help="real gains to plant, in units of sigma (0 = A/A)")
    p.add_argument("--normal", action="store_true", help="draw from a normal fit instead of resampling")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--parallel", type=int, default=4, metavar="N", help="candidates per wave (0: skip the waves)")
    p.add_argument("--after-keep", type=float, default=None, metavar="G",
                   help="also judge a second candidate after a first one G sigma better was kept")
    p.add_argument("--drift", type=float, default=None, metavar="D",
                   help="also simulate a box whose speed drifts D sigma per run (random walk)")
    p.add_argument("--gap", type=int, default=10, help="with --drift: runs between the baseline's and the candidate's")
    p.add_argument("--no-clear-wins", action="store_true",
                   help="the runner's rule without its keep of a clear win after the first pair")
    args = p.parse_args(argv)
    global CLEAR_WINS
    CLEAR_WINS = not args.no_clear_wins
    values = load_values(args)
    if len(values) < 3:
        sys.exit("need at least 3 measured values")
    mu, sd, res = simulate(values, args.trials, args.noise_runs, args.reruns, args.confidence, args.gains,
                           args.normal, args.seed)
    kind = "normal fit" if args.normal else "resampled measured values"
    print(f"SIMULATION ({kind}): {len(values)} measured values, mean {mu:.6f}, std {sd:.6f}; "
          f"{args.trials} trials each; baseline {args.noise_runs} runs, {args.reruns} re-runs, "
          f"confidence {args.confidence}")
    print("noise: against the best's record; paired: beside runs of the best (the runner's rule)")
    print(f"{'real gain':>10}  {'greedy keeps':>12}  {'noise keeps':>11}  {'re-runs/decision':>16}  "
          f"{'paired keeps':>12}  {'re-runs/decision':>16}")
    for g, r in res.items():
        label = gain_label(g)
        print(f"{label:>10}  {r['greedy']:>12.3f}  {r['noise']:>11.3f}  {r['reruns_per_decision']:>16.2f}  "
              f"{r['paired']:>12.3f}  {r['paired_reruns']:>16.2f}")
    aa = res.get(0.0)
    if aa and aa["noise"] > 0:
        print(f"A/A false-keep ratio greedy / noise-aware: {aa['greedy'] / aa['noise']:.1f}x")
    if args.parallel > 1:
        n = args.parallel
        waves = simulate_wave(values, args.trials, args.noise_runs, args.reruns, args.confidence, args.gains,
                              args.normal, args.seed, n)
        print(f"\nWAVES of {n} candidates from one parent (run --workers {n}); noise-aware rule; one candidate has the "
              "planted gain, the others are A/A")
        print(f"{'real gain':>10}  {'sequential':>10}  {'wave, confirmed':>15}  {'per candidate':>13}  "
              f"{'wave, naive':>11}  {'the real one kept':>17}")
        for g, r in waves.items():
            label = gain_label(g)
            print(f"{label:>10}  {res[g]['noise']:>10.4f}  {r['confirmed']:>15.4f}  {r['confirmed'] / n:>13.4f}  "
                  f"{r['naive']:>11.4f}  {r['real']:>17.4f}")
        w = waves.get(0.0)
        if w is not None and aa is not None:
            se = (w["confirmed"] * (1 - w["confirmed"]) / args.trials) ** 0.5
            per = w["confirmed"] / n
            verdict = "does not exceed" if per <= aa["noise"] else "EXCEEDS"
            print(f"A/A keep rate per candidate in waves of {n}: {per:.4f} {verdict} the sequential rule's "
                  f"{aa['noise']:.4f} per experiment; per decision (a wave vs one experiment): {w['confirmed']:.4f} "
                  f"+- {se:.4f} vs {aa['noise']:.4f}; keeping the wave's best on its selected run: {w['naive']:.4f}")
    if args.after_keep is not None:
        after = simulate_after_keep(values, args.trials, args.noise_runs, args.reruns, args.confidence,
                                    args.gains, args.normal, args.seed, args.after_keep)
        print(f"\nAFTER A KEEP: a first candidate {args.after_keep:g} sigma better than the baseline, kept; then a "
              "second one judged against it (keep rate of the second, given the first was kept; runs of both)")
        print(f"{'real gain':>10}  {'second kept':>11}  {'runs of both':>12}")
        for g, r in after.items():
            label = gain_label(g)
            print(f"{label:>10}  {r['kept']:>11.4f}  {r['runs']:>12.2f}")
    if args.drift is not None:
        drifted = simulate_drift(values, args.trials, args.noise_runs, args.reruns, args.confidence, args.gains,
                                 args.normal, args.seed, args.drift, args.gap)
        print(f"\nDRIFT of {args.drift:g} sigma per run (random walk), the candidate {args.gap} runs after the "
              "baseline: keep rates against the best's record and beside runs of the best (re-runs per decision)")
        print(f"{'real gain':>10}  {'vs record':>9}  {'paired':>6}  {'re-runs, record':>15}  {'re-runs, paired':>15}")
        for g, r in drifted.items():
            label = gain_label(g)
            print(f"{label:>10}  {r['record']:>9.4f}  {r['paired']:>6.4f}  {r['record_runs']:>15.2f}  "
                  f"{r['paired_runs']:>15.2f}")


if __name__ == "__main__":
    main()
