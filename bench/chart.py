"""docs/benchmarks.png: the four parts of the benchmark in one figure."""

from __future__ import annotations

import textwrap

import usersites
from pressure import VARIANTS as PRESSURE_VARIANTS
from pressure import WORKLOADS as PRESSURE_WORKLOADS
from report import Results
from ring0 import CONFIG_TITLES, CONFIGS, LINUX_PV_OVERHEAD_PCT, TARGET_OVERHEAD_PCT


def _missing(ax, title: str, why: str) -> None:  # noqa: ANN001
    ax.set_title(title)
    why = textwrap.fill(why[:600], 60)
    ax.text(0.5, 0.5, why, ha="center", va="center", fontsize=8,
            transform=ax.transAxes)
    ax.set_xticks([])
    ax.set_yticks([])


def _ring0(ax, res: Results) -> None:  # noqa: ANN001
    title = "1. Ring 0 (QEMU -icount): instructions vs no paravirt"
    r0 = res.ring0
    if r0 is None or not r0.available:
        _missing(ax, title, "not measured: " + (r0.why if r0 else "not run"))
        return
    arches = [a for a in r0.per_op if r0.totals(a).get("nopv")]
    configs = [c for c in CONFIGS if c != "nopv" and any(c in r0.totals(a) for a in arches)]
    width = 0.8 / max(1, len(arches))
    for i, arch in enumerate(arches):
        w = r0.totals(arch)
        vals = [(w[c] - w["nopv"]) / w["nopv"] * 100 if c in w else 0 for c in configs]
        label = arch + ("" if r0.measured_workload(arch) else " (op sequence)")
        bars = ax.bar([x + i * width for x in range(len(configs))], vals, width, label=label)
        for bar, v in zip(bars, vals, strict=True):
            ax.annotate(f"{v:+.2f}", (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                        ha="center", va="bottom", fontsize=7)
    ax.axhline(LINUX_PV_OVERHEAD_PCT, color="red", ls="--", lw=1,
               label=f"Linux pvops 2009: +{LINUX_PV_OVERHEAD_PCT} %")
    ax.axhline(TARGET_OVERHEAD_PCT, color="green", ls=":", lw=1,
               label=f"target < {TARGET_OVERHEAD_PCT} %")
    ax.set_xticks([x + width * (len(arches) - 1) / 2 for x in range(len(configs))])
    ax.set_xticklabels([CONFIG_TITLES.get(c, c).replace(" ", "\n", 1) for c in configs],
                       fontsize=7)
    ax.set_ylabel("% more instructions than no paravirt")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=7)


def _sites(ax, res: Results) -> None:  # noqa: ANN001
    title = "2. One site in user space (x86_64): TSC ticks per site"
    r = res.sites.get("x86_64")
    if r is None:
        _missing(ax, title, "not measured")
        return
    shapes = [s.key for s in usersites.SHAPES if any(f"{s.key}_{op}" in r.samples
                                                     for op in usersites.OPS)]
    height = 0.8 / len(usersites.OPS)
    for i, op in enumerate(usersites.OPS):
        vals = [r.net_ticks(f"{s}_{op}") or 0 for s in shapes]
        ax.barh([y + i * height for y in range(len(shapes))], vals, height, label=op)
    ax.set_yticks([y + height for y in range(len(shapes))])
    ax.set_yticklabels(shapes, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("ticks per site (empty loop subtracted)")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=7)


def _pressure(ax, res: Results) -> None:  # noqa: ANN001
    title = "3. Register pressure: hungry() per iteration"
    if not res.pressure:
        _missing(ax, title, "not measured")
        return
    groups = [(arch, w.key) for arch in res.pressure for w in PRESSURE_WORKLOADS]
    keys = [v.key for v in PRESSURE_VARIANTS]
    labels = {"full": "full C-ABI", "rax": "%rax only (2007)", "linkfix": "linkfix"}
    width = 0.8 / len(keys)
    for i, k in enumerate(keys):
        vals = [res.pressure[a].median_ticks(f"{w}_{k}") or 0 for a, w in groups]
        bars = ax.bar([x + i * width for x in range(len(groups))], vals, width,
                      label=labels[k])
        for bar, (a, w) in zip(bars, groups, strict=True):
            s = res.pressure[a].static[f"{w}_{k}"]
            ax.annotate(str(s.stack_loads + s.stack_stores), (bar.get_x() + bar.get_width()
                        / 2, bar.get_height()), ha="center", va="bottom", fontsize=7)
    ax.set_xticks([x + width * (len(keys) - 1) / 2 for x in range(len(groups))])
    ax.set_xticklabels([f"{a}\n{w}" for a, w in groups], fontsize=8)
    ax.set_ylabel("TSC ticks per iteration\n(labels: stack loads+stores in hungry())")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=7)


def _postlink(ax, res: Results) -> None:  # noqa: ANN001
    title = "4. Post-link pass: end-to-end time"
    pl = res.postlink
    if pl is None or not pl.sizes:
        _missing(ax, title, "not measured")
        return
    n = [s.sites for s in pl.sizes]
    ax.plot(n, [s.copy.median for s in pl.sizes], "o-", label="cp (floor)")
    floor = [(s.sites, s.pyfloor.median) for s in pl.sizes if s.pyfloor.median]
    if floor:
        ax.plot(*zip(*floor, strict=True), "o:", label="Python per-site loop floor")
    pts = [(s.sites, s.patch.median) for s in pl.sizes if s.patch.median]
    if pts:
        ax.plot(*zip(*pts, strict=True), "o-", label="linkfix patch")
    meas = [(s.sites, s.naive.median) for s in pl.sizes if s.naive.median]
    if meas:
        ax.plot(*zip(*meas, strict=True), "o-", label="naive lief loop (lower bound)")
    full = [(s.sites, s.naive_full.median) for s in pl.sizes if s.naive_full.median]
    if full:
        ax.plot(*zip(*full, strict=True), "s-", label="naive complete (lief + capstone)")
    extra = [(s.sites, s.naive_extrapolated) for s in pl.sizes if s.naive_extrapolated]
    if extra and meas:
        ax.plot([meas[-1][0], *[e[0] for e in extra]], [meas[-1][1], *[e[1] for e in extra]],
                "o--", color=ax.lines[-1].get_color(), label="naive (extrapolated)")
    ax.plot([1_000_000], [2.0], "r*", ms=10, label="target: 1M sites <= 2 s")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("sites")
    ax.set_ylabel("seconds (median)")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=7)


def draw(res: Results, path: str) -> None:
    import matplotlib  # noqa: PLC0415 - checked by run.py before anything runs

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    fig, axes = plt.subplots(2, 2, figsize=(14, 10))
    _ring0(axes[0][0], res)
    _sites(axes[0][1], res)
    _pressure(axes[1][0], res)
    _postlink(axes[1][1], res)
    fig.suptitle(f"linkfix benchmarks - {res.machine.cpu}, {res.machine.cores} cores, "
                 f"{res.machine.date}" + (" (--quick)" if res.quick else ""), fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=90, metadata={"Software": None})
    plt.close(fig)
