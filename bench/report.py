"""BENCHMARKS.md, bench/results.json and the PNG plots, from the results of one run.

Every number in the Markdown comes from results.json; a value that was not
measured is printed with its reason, never as a number.
"""

from __future__ import annotations

import json
from pathlib import Path

from tierline_shared.wire import TIERS

RESULTS = Path("bench/results.json")  # relative to the output directory
PLOTS = Path("bench/plots")
MARKDOWN = Path("BENCHMARKS.md")


def is_not_measured(v) -> bool:
    return isinstance(v, dict) and set(v) == {"not_measured"}


def fmt(v, unit: str = "", pct: bool = False) -> str:
    if is_not_measured(v):
        return f"*not measured: {v['not_measured']}*"
    if isinstance(v, (int, float)):
        if pct:
            return f"{100 * v:.1f}%"
        text = f"{v:,.0f}" if abs(v) >= 100 else f"{v:.3g}" if abs(v) < 1 else f"{v:.1f}"
        return text + unit
    return str(v)


def _x(v) -> str:
    return fmt(v) if is_not_measured(v) else f"{v:.2f}x"


def _points(v) -> str:
    return fmt(v) if is_not_measured(v) else f"{100 * v:+.1f} points"


def _val(v):
    """A plottable number (0 where not measured)."""
    return 0.0 if is_not_measured(v) or not isinstance(v, (int, float)) else float(v)


def _plain(v) -> str:
    if isinstance(v, dict):
        return "{" + ", ".join(f"{k} {_plain(x)}" for k, x in v.items()) + "}"
    return str(v)


def _how(method: dict) -> str:
    parts = [f"{k.replace('_', ' ')}: {_plain(v)}" for k, v in method.items()]
    return "*How measured:* " + "; ".join(parts) + "."


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return out + [""]


# -- plots ---------------------------------------------------------------------------------------------------
def _plots(sections: dict, plot_dir: Path) -> dict[str, Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plot_dir.mkdir(parents=True, exist_ok=True)
    files: dict[str, Path] = {}

    def bars(ax, labels, values, title, ylabel, log=False):
        if log:
            ax.set_yscale("log")
        ax.bar(labels, [_val(v) for v in values], color=["#4c72b0", "#dd8452", "#55a868", "#c44e52"][:len(labels)])
        ax.set_title(title, fontsize=10)
        ax.set_ylabel(ylabel)
        for i, v in enumerate(values):
            ax.annotate("n/m" if is_not_measured(v) else f"{_val(v):.3g}", (i, _val(v)), ha="center",
                        va="bottom", fontsize=8)

    m = sections["edge_vs_cloud"]["metrics"]
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.6))
    bars(axes[0], ["edge p50", "cloud p50", "edge p95", "cloud p95"],
         [m["edge"]["first_token_ms_p50"], m["cloud"]["first_token_ms_p50"], m["edge"]["first_token_ms_p95"],
          m["cloud"]["first_token_ms_p95"]], "first token (stream, concurrency 1)", "ms")
    bars(axes[1], ["edge", "cloud"], [m["edge"]["qps"], m["cloud"]["qps"]],
         f"throughput at concurrency {sections['edge_vs_cloud']['method']['concurrency']}", "requests/s")
    bars(axes[2], ["edge", "cloud"], [m["edge"]["peak_rss_mib"], m["cloud"]["peak_rss_mib"]],
         "peak RSS of the tier (its processes)", "MiB")
    files["edge_vs_cloud"] = _save(fig, plot_dir / "edge_vs_cloud.png")

    m = sections["tiered_vs_cloud"]["metrics"]
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.6))
    bars(axes[0], ["tiered", "cloud only"], [m["tiered"]["qps"], m["cloud_only"]["qps"]], "throughput", "requests/s")
    bars(axes[1], ["tiered", "cloud only"], [m["tiered"]["cost_per_request"], m["cloud_only"]["cost_per_request"]],
         "cost per request", "relative units")
    bottom = [0.0, 0.0]
    for tier, color in (("device", "#55a868"), ("edge", "#4c72b0"), ("cloud", "#dd8452")):
        vals = [_val(m["tiered"]["share"][tier]), _val(m["cloud_only"]["share"][tier])]
        axes[2].bar(["tiered", "cloud only"], vals, bottom=bottom, label=tier, color=color)
        bottom = [b + v for b, v in zip(bottom, vals)]
    axes[2].set_title("share of requests answered per tier", fontsize=10)
    axes[2].legend(fontsize=8)
    files["tiered_vs_cloud"] = _save(fig, plot_dir / "tiered_vs_cloud.png")

    b, o, p = (sections[k]["metrics"] for k in ("batching", "platform_overhead", "peer_litserve"))
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.6))
    bars(axes[0], ["batching on", "batching off"], [b["on"]["qps"], b["off"]["qps"]],
         f"edge throughput at concurrency {sections['batching']['method']['concurrency']}", "requests/s")
    bars(axes[1], ["bare engine", "edge node", "router+NATS", "LitServe batch", "LitServe continuous"],
         [o["bare"]["qps"], o["edge_node"]["qps"], o["platform"]["qps"], p["litserve_batch"]["qps"],
          p["litserve_continuous"]["qps"]],
         f"edge model throughput, concurrency {sections['platform_overhead']['method']['concurrency']}", "requests/s")
    files["serving"] = _save(fig, plot_dir / "serving.png")

    c = sections["cache"]["metrics"]
    r = sections["router_and_nats"]["metrics"]
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.6))
    bars(axes[0], ["miss", "hit"], [c["repeat"]["miss_latency_ms_p50"], c["repeat"]["hit_latency_ms_p50"]],
         "repeated prompt, latency p50", "ms")
    turns = c["multi_turn"]["per_turn"]
    for j, (target, color) in enumerate((("on", "#55a868"), ("off", "#c44e52"))):
        values = [row[f"prefill_first_token_ms_p50_{target}"] for row in turns.values()]
        xs = [i + (j - 0.5) * 0.4 for i in range(len(values))]
        axes[1].bar(xs, [_val(v) for v in values], width=0.4, color=color, label=f"prefix reuse {target}")
    axes[1].set_xticks(range(len(turns)), list(turns))
    axes[1].set_title("multi-turn: prefill + first token per turn, p50", fontsize=10)
    axes[1].set_ylabel("ms")
    axes[1].legend(fontsize=8)
    bars(axes[2], ["decide\np50", "decide\np99", "NATS\np50", "NATS\np99"],
         [r["decision_us"]["p50"], r["decision_us"]["p99"], _ms_to_us(r["nats_round_trip_ms"]["p50"]),
          _ms_to_us(r["nats_round_trip_ms"]["p99"])], "router decision vs one NATS round trip", "µs (log)",
         log=True)
    files["cache_and_routing"] = _save(fig, plot_dir / "cache_and_routing.png")
    return files


def _ms_to_us(v):
    return v if is_not_measured(v) else v * 1000


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path


# -- markdown ----------------------------------------------------------------------------------------------------
TARGETS = (  # issue 23: (what, section, path to the value, the bound, "min" or "max", how to show it)
    ("edge node over gRPC vs the bare engine at its best batch", "platform_overhead",
     ("ratio", "edge_node_over_bare"), 0.9, "min", "pct"),
    ("router + NATS + edge vs the bare engine", "platform_overhead", ("ratio", "platform_over_bare"), 0.85, "min",
     "pct"),
    ("edge node vs LitServe in its best mode", "peer_litserve", ("ratio", "edge_node_over_litserve"), 1.3, "min", "x"),
    ("batching on vs off (concurrency 32)", "batching", ("ratio", "qps_on_over_off"), 3.0, "min", "x"),
    ("edge first token under load (concurrency 16) over unloaded, p50", "edge_vs_cloud",
     ("edge", "loaded_over_unloaded_first_token"), 3.0, "max", "x"),
    ("prefix reuse, dialogue turns 2-3: prefill + first token time saving, one dialogue at a time", "cache",
     ("multi_turn", "later_turns_prefill_time_saving"), 0.25, "min", "pct"),
    ("the same, 4 dialogues at a time", "cache", ("multi_turn_concurrent", "later_turns_prefill_time_saving"), 0.25,
     "min", "pct"),
    ("tiered vs cloud-only throughput (3.85x before the scheduler)", "tiered_vs_cloud",
     ("ratio", "throughput_tiered_over_cloud"), 3.85, "min", "x"),
)


def _targets(s: dict) -> list[str]:
    """The serving targets (issue 23), each with its measured value and whether this run met it."""
    rows = []
    for what, section, path, bound, kind, unit in TARGETS:
        v = s[section]["metrics"]
        for k in path:
            v = v.get(k, {"not_measured": "missing"}) if isinstance(v, dict) else v
        shown = fmt(v, pct=True) if unit == "pct" and not is_not_measured(v) else _x(v) if unit == "x" else fmt(v)
        want = f"{'>=' if kind == 'min' else '<='} " + (f"{bound:.0%}" if unit == "pct" else f"{bound:g}x")
        met = "-" if is_not_measured(v) else "met" if (v >= bound if kind == "min" else v <= bound) else "**not met**"
        rows.append([what, shown, want, met])
    return ["## Serving targets", ""] + _table(["target", "measured here", "target", ""], rows) + [""]


def render(results: dict, plots: dict[str, str]) -> str:
    meta, s = results["meta"], results["sections"]
    ev, tv, ba, ca, po, pe, rn = (s[k] for k in ("edge_vs_cloud", "tiered_vs_cloud", "batching", "cache",
                                                 "platform_overhead", "peer_litserve", "router_and_nats"))
    m1, m2, m3, m4, m5, m6, m7 = (x["metrics"] for x in (ev, tv, ba, ca, po, pe, rn))
    L = [f"# Benchmarks (`{meta['command']}`)", "",
         f"Measured in one run of `{meta['command']}` on {meta['generated']}: {meta['machine']['cpus']} CPU cores "
         f"({meta['machine']['cpu']}), Python {meta['machine']['python']}, the `{meta['family']}` model family "
         f"from `{meta['models_dir']}`; {meta['total_seconds']:.0f} s in all. Every tier, the router, nats-server "
         "and the LitServe peer are real processes on this machine; compared targets run interleaved, repeat by "
         "repeat (ABBA order), and ratios are taken within a repeat before the median, so machine drift "
         "cancels. The raw data is `bench/results.json`.", ""]
    if meta["quick"]:
        L += ["> **Quick run** (`--quick`): a handful of requests and one repeat, to check that the report is "
              "complete. The numbers below mean nothing.", ""]
    L += _targets(s)
    L += ["## Headline", ""]
    L += _table(["what", "measured here", "the article"], [
        ["first token, edge vs cloud (p50)", f"{fmt(m1['edge']['first_token_ms_p50'], ' ms')} vs "
         f"{fmt(m1['cloud']['first_token_ms_p50'], ' ms')}", "230 vs 850 ms"],
        [f"throughput at concurrency {ev['method']['concurrency']}, edge vs cloud",
         f"{fmt(m1['edge']['qps'], ' req/s')} vs {fmt(m1['cloud']['qps'], ' req/s')}", "120 vs 45 QPS"],
        ["peak RSS, edge vs cloud tier (its processes, summed)", f"{fmt(m1['edge']['peak_rss_mib'], ' MiB')} vs "
         f"{fmt(m1['cloud']['peak_rss_mib'], ' MiB')}", "1.2 vs 4.8 GB"],
        ["tiered vs cloud only: throughput", _x(m2["ratio"]["throughput_tiered_over_cloud"]), "2.8x"],
        ["tiered vs cloud only: cost per request, reduction", fmt(m2["ratio"]["cost_reduction"], pct=True), "80%"],
        ["traffic kept below the cloud", fmt(m2["ratio"]["share_below_cloud"], pct=True), "90% at the edge"],
        ["tiered vs cloud only: accuracy (exact answer)", f"{fmt(m2['tiered']['accuracy'], pct=True)} vs "
         f"{fmt(m2['cloud_only']['accuracy'], pct=True)}", "-"],
        [f"continuous batching on vs off (concurrency {ba['method']['concurrency']})",
         _x(m3["ratio"]["qps_on_over_off"]), "about 3x (Triton)"],
        ["repeated prompt: cache hit vs miss latency", _x(m4["repeat"]["hit_speedup"]), "-"],
        ["multi-turn prefix KV reuse: prefill tokens computed, saving (prefill time saving)",
         f"{fmt(m4['multi_turn']['prefix_kv_reuse_compute_saving'], pct=True)} "
         f"({fmt(m4['multi_turn']['prefill_time_saving'], pct=True)})", "40% less compute"],
        ["platform (router + NATS + gRPC) vs bare onnxruntime", fmt(m5["ratio"]["platform_over_bare"], pct=True)
         if not is_not_measured(m5["ratio"]["platform_over_bare"]) else fmt(m5["ratio"]["platform_over_bare"]),
         ">= 85% (target)"],
        ["edge node vs LitServe (same model)", _x(m6["ratio"]["edge_node_over_litserve"]), "-"],
        ["router decision p50 / p99",
         f"{fmt(m7['decision_us']['p50'], ' µs')} / {fmt(m7['decision_us']['p99'], ' µs')}", "-"],
        ["one NATS round trip p50 / p99", f"{fmt(m7['nats_round_trip_ms']['p50'], ' ms')} / "
         f"{fmt(m7['nats_round_trip_ms']['p99'], ' ms')}", "-"],
        ["NATS round trip with TLS + per-role permissions vs without (p50)",
         f"{fmt(m7['nats_security']['secure_ms_p50'], ' ms')} vs {fmt(m7['nats_security']['plain_ms_p50'], ' ms')}"
         f" ({_x(m7['nats_security']['secure_over_plain'])})", "-"],
        *_device_headline(s["device_profile"]),
        ["cloud tier vs transformers serve (same checkpoint), throughput",
         f"{_x(s['peer_transformers']['metrics']['ratio']['cloud_over_transformers_serve'])} "
         f"({_x(s['peer_transformers']['metrics']['ratio']['cloud_over_transformers_serve_cb'])} against its "
         "continuous batching)", "-"],
    ])

    L += [f"## 1. {ev['title']}", "", _how(ev["method"]), ""]
    rows = [["first token p50 (stream, concurrency 1)", "first_token_ms_p50", " ms", "first_token_p50_cloud_over_edge",
             "230 vs 850 ms"],
            ["first token p95 (stream, concurrency 1)", "first_token_ms_p95", " ms", None, ""],
            [f"throughput at concurrency {ev['method']['concurrency']}", "qps", " req/s", "qps_edge_over_cloud",
             "120 vs 45 QPS"],
            ["first token under load p50 (tier timing)", "loaded_first_token_ms_p50", " ms", None, ""],
            ["first token under load p95 (tier timing)", "loaded_first_token_ms_p95", " ms", None, ""],
            ["first token unloaded p50 (tier timing, concurrency 1)", "unloaded_first_token_ms_p50", " ms", None, ""],
            ["latency under load p50", "latency_ms_p50", " ms", None, ""],
            ["peak RSS of the tier (its processes, summed)", "peak_rss_mib", " MiB", "peak_rss_cloud_over_edge",
             "1.2 vs 4.8 GB"],
            ["errors", "errors", "", None, ""]]
    L += _table(["", "edge (onnxruntime int8)", "cloud (torch fp32)", "ratio", "the article (edge vs cloud)"],
                [[label, fmt(m1["edge"][k], u), fmt(m1["cloud"][k], u), _x(m1["ratio"][r]) if r else "", a]
                 for label, k, u, r, a in rows])
    other = ", ".join(f"{k} {fmt(v, ' MiB')}" for k, v in m1["peak_rss_mib_other"].items())
    L += [f"Peak RSS of the other processes: {other}.", ""] if other else []
    L += _notes(ev) + [f"![edge vs cloud]({plots['edge_vs_cloud']})", ""]

    L += [f"## 2. {tv['title']}", "", _how(tv["method"]), ""]
    t, c = m2["tiered"], m2["cloud_only"]
    L += _table(["", "tiered (router)", "cloud only"], [
        ["throughput", fmt(t["qps"], " req/s"), fmt(c["qps"], " req/s")],
        ["accuracy (exact answer)", fmt(t["accuracy"], pct=True), fmt(c["accuracy"], pct=True)],
        ["cost per request (relative units)", fmt(t["cost_per_request"]), fmt(c["cost_per_request"])],
        *[[f"share answered by the {tier}", fmt(t["share"][tier], pct=True), fmt(c["share"][tier], pct=True)]
          for tier in TIERS],
        ["escalated (more than one tier ran)", fmt(t["escalated_share"], pct=True),
         fmt(c["escalated_share"], pct=True)],
        ["latency p50 / p95", f"{fmt(t['latency_ms_p50'], ' ms')} / {fmt(t['latency_ms_p95'], ' ms')}",
         f"{fmt(c['latency_ms_p50'], ' ms')} / {fmt(c['latency_ms_p95'], ' ms')}"],
        ["errors", fmt(t["errors"]), fmt(c["errors"])],
        *[[f"drafts accepted by the {tier} (draft tokens)",
           f"{fmt(d['acceptance'], pct=True)} ({d['draft_tokens']})", "-"]
          for tier, d in t.get("drafts", {}).items()]])
    if "cpu_ms_per_request" in t:  # where the cores went (results from before it lack it)
        tc, cc = t["cpu_ms_per_request"], c["cpu_ms_per_request"]
        names = [n for n in tc if (tc[n] or 0) + (cc.get(n) or 0) >= 0.005]  # idle ones left out
        L += ["CPU per request, by process (ms of CPU time per answered request):", ""]
        L += _table(["process", "tiered (router)", "cloud only"],
                    [[n, fmt(tc[n], " ms"), fmt(cc.get(n), " ms")] for n in names]
                    + [["all", *(fmt(sum(v or 0 for v in x.values()), " ms") for x in (tc, cc))],
                       ["cores busy (CPU time over wall time)", fmt(t["cores_busy"]), fmt(c["cores_busy"])]])
    r2 = m2["ratio"]
    L += [f"Tiered over cloud only: throughput {_x(r2['throughput_tiered_over_cloud'])} (article 2.8x), cost "
          f"{fmt(r2['cost_reduction'], pct=True)} lower (article 80%), {fmt(r2['share_below_cloud'], pct=True)} "
          f"of the traffic answered below the cloud (article: 90% at the edge), accuracy "
          f"{_points(r2['accuracy_delta'])} against the cloud only.", ""]
    L += _notes(tv) + [f"![tiered vs cloud only]({plots['tiered_vs_cloud']})", ""]

    L += [f"## 3. {ba['title']}", "", _how(ba["method"]), ""]
    L += _table(["", "throughput", "latency p50", "latency p95", "errors"],
                [[k, fmt(m3[k]["qps"], " req/s"), fmt(m3[k]["latency_ms_p50"], " ms"),
                  fmt(m3[k]["latency_ms_p95"], " ms"), fmt(m3[k]["errors"])] for k in ("on", "off")])
    L += [f"Batching on over off: {_x(m3['ratio']['qps_on_over_off'])} (Triton's tutorial: about 3x).", ""]
    L += _notes(ba)

    L += [f"## 4. {ca['title']}", "", _how(ca["method"]), ""]
    rp = m4["repeat"]
    L += _table(["repeated prompts", "value"], [
        ["latency p50, miss (first time)", fmt(rp["miss_latency_ms_p50"], " ms")],
        ["latency p50, hit (same request again)", fmt(rp["hit_latency_ms_p50"], " ms")],
        ["hit over miss speed-up", _x(rp["hit_speedup"])],
        ["Zipf traffic: share of requests that repeat an earlier one", fmt(rp["zipf_repeat_share"], pct=True)],
        ["Zipf traffic: measured hit rate", fmt(rp["zipf_hit_rate"], pct=True)],
        ["Zipf traffic: throughput", fmt(rp["zipf_qps"], " req/s")]])
    L += _multi_turn(m4["multi_turn"])
    mc = m4["multi_turn_concurrent"]
    L += [f"{mc['concurrency']} dialogues at a time (other dialogues, the same tiers):", ""]
    L += _multi_turn(mc)
    idle = m4["prefill_after_idle"]
    L += _table(["one prefill (a dialogue question) on the bare edge engine", "prefill + first token p50",
                 "over back to back"],
                [["right after another forward", fmt(idle["first_token_ms_p50_back_to_back"], " ms"), "1.00x"]]
                + [[f"after {ms} ms idle", fmt(v["first_token_ms_p50"], " ms"), _x(v["over_back_to_back"])]
                   for ms, v in idle["after_idle"].items()])
    L += _notes(ca) + [f"![cache and routing]({plots['cache_and_routing']})", ""]

    L += [f"## 5. {po['title']}", "", _how(po["method"]), ""]
    L += _serving_table(m5, ("bare", "edge_node", "platform"))
    ratio = m5["ratio"]["platform_over_bare"]
    verdict = ("not measured" if is_not_measured(ratio) else "target met" if ratio >= po["article"]["target_ratio"]
               else "target **not** met")
    L += [f"Router + NATS + gRPC + edge reach {fmt(ratio, pct=True)} of the bare engine's throughput (target >= 85%: "
          f"{verdict}); the edge node alone over gRPC reaches {fmt(m5['ratio']['edge_node_over_bare'], pct=True)}.", ""]
    L += _notes(po)

    L += [f"## 6. {pe['title']}", "", _how(pe["method"]), ""]
    L += _serving_table(m6, ("litserve_batch", "litserve_continuous", "edge_node"))
    best = pe["litserve_best_mode"]
    L += [f"Edge node over LitServe in its best mode ({best if isinstance(best, str) else fmt(best)}): "
          f"{_x(m6['ratio']['edge_node_over_litserve'])} (over its batching loop "
          f"{_x(m6['ratio']['edge_node_over_litserve_batch'])}, over its continuous-batching loop "
          f"{_x(m6['ratio']['edge_node_over_litserve_continuous'])}).", ""]
    L += _notes(pe) + [f"![serving]({plots['serving']})", ""]

    L += [f"## 7. {rn['title']}", "", _how(rn["method"]), ""]
    L += _table(["", "p50", "p99"], [
        ["router decision (Policy.decide)", fmt(m7["decision_us"]["p50"], " µs"), fmt(m7["decision_us"]["p99"], " µs")],
        ["one NATS request/reply round trip", fmt(m7["nats_round_trip_ms"]["p50"], " ms"),
         fmt(m7["nats_round_trip_ms"]["p99"], " ms")],
        ["the same on a nats-server with a shared password, no TLS", fmt(m7["nats_security"]["plain_ms_p50"], " ms"),
         fmt(m7["nats_security"]["plain_ms_p99"], " ms")],
        ["the same on a nats-server with TLS and per-role identities and permissions",
         fmt(m7["nats_security"]["secure_ms_p50"], " ms"), fmt(m7["nats_security"]["secure_ms_p99"], " ms")]])
    L += _notes(rn)
    L += _device_profile(s["device_profile"], 8)
    L += _cloud_peer(s["peer_transformers"], 9)
    L += _batch_api(s["batch_api"], 10)
    L += ["## Reproduce", "", "`make bench` (this report, "
          f"{meta['total_seconds']:.0f} s here) or `tierline bench --quick --models DIR --out DIR` (the "
          "tiny family, a completeness check run by `make test`). Raw engine speed without serving is "
          "`tierline models bench` (docs/MODEL_SPEED.md).", ""]
    return "\n".join(L)


def _cloud_peer(section: dict, number: int) -> list[str]:
    m = section["metrics"]
    names = {"cloud": "cloud tier (gRPC)", "transformers_serve": "transformers serve",
             "transformers_serve_cb": "transformers serve --continuous-batching"}
    L = [f"## {number}. {section['title']}", "", _how(section["method"]), ""]
    L += _table(["", "throughput", "tokens/s", "first token p50 (concurrency 1)", "latency p50",
                 "greedy answers equal to the cloud tier's", "cloud tier over it (per-repeat ratio)"],
                [[names[k], fmt(m[k]["qps"], " req/s"), fmt(m[k]["tokens_per_s"], " tok/s"),
                  fmt(m[k]["first_token_ms_p50"], " ms"), fmt(m[k]["latency_ms_p50"], " ms"),
                  "-" if k == "cloud" else f"{fmt(m[k]['same_greedy_text'], pct=True)}"
                  + (f" of {m[k]['compared']}" if "compared" in m[k] else ""),
                  "-" if k == "cloud" else _x(m["ratio"][f"cloud_over_{k}"])] for k in names])
    return L + _notes(section)


def _batch_api(section: dict, number: int) -> list[str]:
    """The Batch API section (bench/batch_jobs.py)."""
    m = section["metrics"]
    L = [f"## {number}. {section['title']}", "", _how(section["method"]), ""]
    if "lines" not in m:
        return L + [f"Not measured: {m['lines_per_s']['not_measured']}", ""]
    i = m["interactive"]
    L += _table(["", "measured here", "the article"], [
        ["lines, completed / failed", f"{m['lines']:,}: {m['completed']:,} / {m['failed']:,}", ""],
        ["throughput (create to completed)", f"{fmt(m['lines_per_s'], ' lines/s')} in {fmt(m['wall_s'], ' s')}",
         f"{m['article_lines_per_day'] / 86400:.0f} lines/s"],
        ["lines a day at that rate", f"{m['lines_per_day']:,} ({_x(m['over_article'])} the article's)",
         f"{m['article_lines_per_day']:,}"],
        ["answered below the cloud", fmt(m["share_below_cloud"], pct=True)
         + " (" + ", ".join(f"{t} {fmt(v, pct=True)}" for t, v in m["share"].items()) + ")", "90%"],
        ["cost per line vs cloud only (section 2)", f"{fmt(m['cost_per_line'])} vs "
         f"{fmt(m['cloud_only_cost_per_request'])}: {fmt(m['cost_reduction_vs_cloud_only'], pct=True)} less", "-80%"],
        ["accuracy (exact answer)", fmt(m["accuracy"], pct=True), "-"],
        ["interactive latency p50 / p95, alone", f"{fmt(i['alone']['p50_ms'], ' ms')} / "
                                                 f"{fmt(i['alone']['p95_ms'], ' ms')}", "-"],
        ["interactive latency p50 / p95, beside the batch", f"{fmt(i['beside_batch']['p50_ms'], ' ms')} / "
         f"{fmt(i['beside_batch']['p95_ms'], ' ms')} ({_x(i['p50_beside_over_alone'])} p50)", "-"]])
    return L + _notes(section)


def _serving_table(m: dict, keys) -> list[str]:
    occupancy = all("seqs_per_step" in m[k] for k in keys)
    names = {"bare": "bare onnxruntime (the limit)", "edge_node": "edge node (gRPC)",
             "platform": "router + NATS + edge", "litserve_batch": "LitServe, batching loop (HTTP)",
             "litserve_continuous": "LitServe, continuous-batching loop (HTTP)"}
    rows = []
    for k in keys:
        r = m[k]
        share = "100%" if k == "bare" else fmt(m["ratio"][f"{k}_over_bare"], pct=True)
        rows.append([names[k], fmt(r["qps"], " req/s"), fmt(r["tokens_per_s"], " tok/s"),
                     fmt(r["latency_ms_p50"], " ms"), fmt(r["latency_ms_p95"], " ms"), share]
                    + ([fmt(r["seqs_per_step"])] if occupancy else []))
    return _table(["", "throughput", "tokens/s", "latency p50", "latency p95", "of bare (per-repeat ratio)"]
                  + (["sequences per step (mean)"] if occupancy else []), rows)


def _multi_turn(m: dict) -> list[str]:
    """The dialogues with prefix KV reuse on vs off: a row per turn, then the savings."""
    def pair(row: dict, key: str, unit: str = "") -> str:
        return f"{fmt(row[key + '_on'], unit)} / {fmt(row[key + '_off'], unit)}"

    L = _table(["multi-turn dialogue", "prompt tokens (mean)", "prefill tokens computed, on / off",
                "prefill + first token p50, on / off", "e2e latency p50, on / off", "prompt tokens/s, on / off"],
               [[turn, fmt(r["prompt_tokens_mean"]), pair(r, "prefill_tokens_computed_mean"),
                 pair(r, "prefill_first_token_ms_p50", " ms"), pair(r, "e2e_latency_ms_p50", " ms"),
                 pair(r, "prompt_tokens_per_s")] for turn, r in m["per_turn"].items()])
    L += _table(["prefix KV reuse, all turns", "value"], [
        ["prefill tokens computed, on / off", f"{fmt(m['prefill_tokens_computed_on'])} / "
         f"{fmt(m['prefill_tokens_computed_off'])}"],
        ["compute saving: prefill tokens (the article: 40%)", fmt(m["prefix_kv_reuse_compute_saving"], pct=True)],
        ["compute saving: prefill tokens, turns 2 and 3", fmt(m["later_turns_compute_saving"], pct=True)],
        ["compute saving: all tokens processed (decode included)", fmt(m["all_tokens_compute_saving"], pct=True)],
        ["prefill + first token time saving (median of repeats)", fmt(m["prefill_time_saving"], pct=True)],
        ["share of later turns' prompt a cache of whole turns could skip", fmt(m["shared_prefix_token_share"],
                                                                                 pct=True)],
        ["identical answers with and without reuse", fmt(m["identical_answer_share"], pct=True)],
        ["turns answered on / off, errors", f"{m['turns_answered_on']} / {m['turns_answered_off']}, {m['errors']}"]])
    return L


def _notes(section: dict) -> list[str]:
    return [f"- {n}" for n in section.get("notes", [])] + [""]


def _device_headline(section: dict) -> list[list[str]]:
    m, how = section["metrics"], section["method"]
    return [[f"device model, Pi-class profile ({how['cores']} core, {how['threads']} thread): decode / first "
             "token p50 / peak RSS", f"{fmt(m['decode_tokens_per_s'], ' tok/s')} / "
             f"{fmt(m['first_token_ms_p50'], ' ms')} / {fmt(m['peak_rss_mib'], ' MiB')}", "-"]]


def _device_profile(section: dict, number: int) -> list[str]:
    """The Pi-class device profile section (bench/device_profile.py)."""
    m = section["metrics"]
    L = [f"## {number}. {section['title']}", "", _how(section["method"]), ""]
    L += _table(["device model (LiteRT), one request at a time", "value"], [
        ["decode tokens/s (after the first token)", fmt(m["decode_tokens_per_s"], " tok/s")],
        ["tokens/s (prefill included)", fmt(m["tokens_per_s"], " tok/s")],
        ["first token p50", fmt(m["first_token_ms_p50"], " ms")],
        ["first token p95", fmt(m["first_token_ms_p95"], " ms")],
        ["peak RSS of the process (VmHWM)", fmt(m["peak_rss_mib"], " MiB")],
        ["model load (sha256 check included)", fmt(m["load_s"], " s")],
        *([["model", f"{m['model']['params']:,} params, {m['model']['bytes']:,} bytes"]] if "model" in m else []),
    ])
    return L + _notes(section)


def write_report(results: dict, out_dir: Path) -> dict[str, Path]:
    """Write results.json, the plots and BENCHMARKS.md under out_dir; returns their paths."""
    out_dir = Path(out_dir)
    (out_dir / RESULTS).parent.mkdir(parents=True, exist_ok=True)
    (out_dir / RESULTS).write_text(json.dumps(results, indent=2, allow_nan=False) + "\n")
    plots = _plots(results["sections"], out_dir / PLOTS)
    rel = {k: str(p.relative_to(out_dir)) for k, p in plots.items()}
    (out_dir / MARKDOWN).write_text(render(results, rel))
    return {"results": out_dir / RESULTS, "markdown": out_dir / MARKDOWN, **plots}
