"""vlp bench: run a registered benchmark (or all) and print its ratios.

The benchmarks themselves, and why they are ratios against a baseline interleaved in the same
process, are in `vlp_cli.benches`.
"""

from __future__ import annotations

from vlp_cli import VlpError
from vlp_cli.benches import BENCHES
from vlp_cli.benches.common import spread


def _spread(r: dict) -> str:
    low, med, high = r.get("spread") or spread(r.get("ratios") or [0.0])
    return f"min/median/max {low}/{med}/{high}"


def run(name: str, reps: int = 5) -> dict:
    """Run one benchmark (or `all`) and print its ratios."""
    from vlp_cli.console import out

    if name != "all" and name not in BENCHES:
        raise VlpError(f"unknown benchmark {name!r}; available: {', '.join(BENCHES)}, all")
    results = {}
    for n, fn in BENCHES.items():
        if name in (n, "all"):
            r = fn(reps=reps)
            results[n] = r
            verdict = "met" if r["met"] else "MISSED"
            direction = r.get("direction", ">=")
            what = r.get("unit", "ratio")
            out.print(f"[bold]{n}[/]: {what} {r['ratio']} (target {direction} {r['target']}, "
                      f"{verdict}); per-rep {r['ratios']}; {_spread(r)}")
            for part, pr in (r.get("parts") or {}).items():
                out.print(f"  {part}: {pr.get('unit', 'ratio')} {pr.get('ratio')} per-rep "
                          f"{pr.get('ratios')}; {_spread(pr)}")
                for extra, er in (pr.get("also") or {}).items():
                    out.print(f"    {extra}: {er.get('unit', 'ratio')} {er.get('ratio')} "
                              f"per-rep {er.get('ratios')}; {_spread(er)}")
                if "checksum" in pr:  # store-read: what verifying each record costs
                    cs = pr["checksum"]
                    out.print(f"    record checksum: {cs['us_per_record']} us per "
                              f"{cs['record_kib']} KiB record, {cs['share_of_vlp_read']:.0%} "
                              "of a vlp read")
                    wp = pr.get("with_probs_over_uniter")
                    if wp:
                        out.print(f"    reading the class distribution too (MRC-kl): ratio "
                                  f"{wp['ratio']} per-rep {wp['ratios']}")
            if "r1_delta_fast_minus_full" in r:  # retrieval-eval: what the shortlist costs
                out.print(f"  R@1 full {r['full']['i2t_r1']} / {r['full']['t2i_r1']}, fast "
                          f"{r['fast']['i2t_r1']} / {r['fast']['t2i_r1']} (image->text / "
                          f"text->image); fast - full {r['r1_delta_fast_minus_full']} (target "
                          f"{r['r1_target']}); time full / fast {r['time_ratio']}; queries "
                          f"{r['queries']}")
            for kind, e in (r.get("emd2") or {}).items():  # ipot: agreement with the exact OT
                out.print(f"  emd2 {kind}: max relative error {e['max_rel_err']} (target <= "
                          f"{e['target']}, {'met' if e['met'] else 'MISSED'}), median "
                          f"{e['median_rel_err']}; by iterations {e['by_iters']}")
    return results
