"""The benchmark's report as plain-text tables (also pasted into docs/performance.md)."""

from __future__ import annotations

from typing import Any


def _table(headers: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(c)) for c in column) for column in zip(headers, *rows, strict=True)]

    def line(cells: list[str]) -> str:
        return "| " + " | ".join(str(c).ljust(w) for c, w in zip(cells, widths, strict=True)) + " |"

    return "\n".join(
        [line(headers), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, rows)]
    )


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:.1f}" if seconds >= 0.01 else f"{seconds * 1e3:.3f}"


def _spread(s: dict[str, Any], scale: float = 1.0, fmt: str = "{:.1f}") -> str:
    if not s.get("n"):
        return "-"
    return (
        f"{fmt.format(s['median'] * scale)} [{fmt.format(s['q1'] * scale)}-"
        f"{fmt.format(s['q3'] * scale)}]"
    )


def render_step(unit: str, r: dict[str, Any]) -> str:
    out = [
        f"### {unit}: {r['family']} UNet ({r['unet_parameters_m']} M parameters, "
        f"{r['attn2_layers']} attn2), latent {r['latent'][0]}x{r['latent'][1]}, "
        f"{r.get('images', r['batch'] // 2)} image(s) = {r['batch']} rows, {r['dtype']} on {r['device']}; {r['rounds']} interleaved rounds; clock: "
        f"{r['clock']}"
        + (
            "; STOPPED EARLY: the tables below are those measured before"
            if r.get("partial")
            else ""
        )
    ]
    rows = []
    syncs = r.get("synchronisations_per_step", {})
    for name, v in r["variants"].items():
        rows.append(
            [
                name,
                _spread(v["step_s"], 1e3),
                f"{v['step_s']['min'] * 1e3:.1f}-{v['step_s']['max'] * 1e3:.1f}",
                _spread(v["wall_s"], 1e3),
                str(v.get("peak_gpu_mib", "-")),
                str(syncs.get(name, "-")),
            ]
        )
    out.append(
        _table(
            [
                "variant",
                "step ms median [IQR]",
                "min-max",
                "wall ms median [IQR]",
                "peak GPU MiB",
                "syncs/step",
            ],
            rows,
        )
    )
    rows = []
    for c in r["comparisons"]:
        ratio = c["ratio"]
        target = c["target"]
        verdict = "-" if target is None else ("yes" if c.get("meets_target") else "NO")
        rows.append(
            [
                c["label"],
                f"{ratio['median']:.4f}",
                f"{ratio['q1']:.4f}-{ratio['q3']:.4f}",
                f"{ratio['min']:.4f}-{ratio['max']:.4f}",
                f"{c['ratio_of_medians']:.4f}",
                f"{c['wall_ratio']['median']:.4f}",
                "-" if target is None else f"<= {target}",
                verdict,
            ]
        )
    out.append(
        _table(
            [
                "ratio (per round)",
                "median",
                "IQR",
                "min-max",
                "of medians",
                "wall median",
                "target",
                "met",
            ],
            rows,
        )
    )
    rows = []
    for name, h in r.get("hook_path", {}).items():
        parts = ", ".join(f"{k} {v:.3f}" for k, v in h["per_step_ms"].items())
        rows.append(
            [
                name,
                f"{h['extension_ms_per_step']:.3f}",
                f"{100 * h['share_of_baseline_step']:.3f} %",
                parts,
            ]
        )
    if rows:
        out.append("Host time in the extension's code per step (instrumented):")
        out.append(_table(["variant", "ms/step", "of baseline step", "ms by entry point"], rows))
    layer_calls = r.get("layer_calls")
    if layer_calls:
        out.append(
            f"One attn2 module called alone ({layer_calls['calls_per_sample']} calls x "
            f"{layer_calls['samples']} interleaved samples), microseconds per call (first "
            "layer and middle block shown; every layer in the JSON):"
        )
        out.extend(_layer_tables(layer_calls))
    host_only = r.get("layer_calls_host_only")
    if host_only:
        out.append(
            "Host-only view: the same with one query token per row (a 1x1 latent), so the image "
            f"term's arithmetic is negligible ({host_only['calls_per_sample']} calls x "
            f"{host_only['samples']} samples; the engine's auto form as on a GPU):"
        )
        out.extend(_layer_tables(host_only))
    host_ops = r.get("host_ops_per_attn2_call")
    if host_ops:
        out.append(
            "Python-level torch calls and hooks added per attn2 call (TorchFunctionMode around "
            "one steady-state UNet call; (hijacked - plain) / attn2 calls; the UNet-level work "
            "per UNet call apart):"
        )
        rows = []
        for name, v in host_ops.items():
            unet = v["per_unet_call"]
            rows.append(
                [
                    name,
                    f"{v['torch_calls']:g}",
                    f"{v['hooks']:g}",
                    f"{v['in_layer_hooks']['torch_calls']:g}",
                    v["layers_block_diagonal"],
                    str(v.get("entries_mib", "-")),
                    f"{unet['torch_calls']} / {unet['hooks']}",
                    str(unet["conditioning_and_batching_torch_calls"]),
                ]
            )
        out.append(
            _table(
                ["variant", "torch calls", "hooks", "in attn2 hooks", "block-diagonal layers",
                 "entries MiB", "per UNet call: calls / hooks", "conditioning + cat calls"],
                rows,
            )
        )  # fmt: skip
    profile = r.get("profile")
    if profile:
        out.append(f"cProfile of one {profile['variant']} step, calls out of lib_negip:")
        rows = [
            [e["caller"], e["callee"], str(e["calls"]), f"{e['cumulative_ms']:.3f}"]
            for e in profile["calls_out_of_lib_negip"][:10]
        ]
        out.append(_table(["caller", "callee", "calls", "cumulative ms"], rows))
    return "\n\n".join(out)


def _layer_tables(layer_calls: dict[str, Any]) -> list[str]:
    out = []
    rows = []
    for name in layer_calls.get("shown", list(layer_calls["layers"])):
        entry = layer_calls["layers"][name]
        for variant, us in entry["us"].items():
            added = entry["added_us"].get(variant)
            rows.append(
                [
                    name,
                    "x".join(map(str, entry["x"])),
                    variant,
                    f"{us:.1f}",
                    "-" if added is None else f"{added:+.1f}",
                ]
            )
    out.append(_table(["layer", "input", "variant", "us/call", "added us"], rows))
    per_call = layer_calls.get("per_unet_call")
    if per_call:
        out.append(
            f"Summed over all {len(layer_calls['layers'])} attn2 layers (added time per UNet "
            "call, per attn2 call, and 1 + that / the baseline's median step):"
        )
        rows = [
            [
                name,
                f"{v['added_ms']:.3f}",
                str(v.get("added_us_per_attn2_call", "-")),
                f"{v['estimated_ratio']:.4f}" if "estimated_ratio" in v else "-",
            ]
            for name, v in per_call.items()
        ]
        out.append(
            _table(
                ["variant", "added ms per UNet call", "added us per attn2 call",
                 "estimated ratio"],
                rows,
            )
        )  # fmt: skip
    return out


def render_models(results: dict[str, Any]) -> str:
    out = []
    rows = []
    for unit in ("load:base", "load:plus"):
        r = results.get(unit)
        if r:
            rows.append(
                [
                    r["file"],
                    f"{r['file_mib']}",
                    f"{r['first_load_s'] * 1e3:.0f}",
                    f"{r['cached_use_s']['median'] * 1e6:.1f}",
                    f"{r['file_reads_after_first']} -> {r['file_reads_after_cached_uses']}",
                    f"{r['project_tokens_s']['median'] * 1e3:.2f}",
                    f"{r['rss_after_imports_mib']:.0f} / {r['peak_rss_mib']:.0f}",
                ]
            )
    encoder = results.get("encoder")
    if encoder:
        rows.append(
            [
                "image_encoder/model.safetensors",
                f"{encoder['file_mib']}",
                f"{encoder['first_load_s'] * 1e3:.0f}",
                f"{encoder['cached_use_s'] * 1e6:.1f}",
                f"{encoder['file_reads_after_first']} -> {encoder['file_reads_after_cached_use']}",
                "-",
                f"{encoder['rss_after_imports_mib']:.0f} / {encoder['peak_rss_after_load_mib']:.0f}",
            ]
        )
    if rows:
        out.append("### Loading through host.Models (files written by the benchmark)")
        out.append(
            _table(
                [
                    "file",
                    "MiB",
                    "first load ms",
                    "cached use us",
                    "file_reads",
                    "tokens ms",
                    "RSS MiB start / peak",
                ],
                rows,
            )
        )
    rows = []
    for unit, label in (("load:base", "adapter base"), ("load:plus", "adapter plus"),
                        ("encoder", "image encoder")):  # fmt: skip
        for phase, m in (results.get(unit) or {}).get("memory", {}).items():
            if "steady_increase_mib" not in m:
                continue
            peak = m.get("peak_increase_mib")
            ratio = m.get("steady_over_tensors")
            rows.append(
                [
                    f"{label}: {phase}",
                    f"{m['start']['rss']:.0f}",
                    "-" if peak is None else f"{m['peak_mib']:.0f} (+{peak:.0f})",
                    f"{m['after']['rss']:.0f} ({m['steady_increase_mib']:+.0f})",
                    "-"
                    if "anon_increase_mib" not in m
                    else f"{m['anon_increase_mib']:+.0f} / {m['file_increase_mib']:+.0f}",
                    "-" if not m.get("tensors_mib") else f"{m['tensors_mib']:.0f}",
                    "-" if ratio is None else f"{ratio:.3f}",
                ]
            )
    if rows:
        out.append("### Resident memory per phase (MiB; peak since the phase began)")
        out.append(
            _table(
                ["phase", "start", "peak (increase)", "after (steady increase)",
                 "anon / file pages increase", "tensors", "steady / tensors"],
                rows,
            )
        )  # fmt: skip
    if encoder:
        rows = []
        for output, o in encoder["outputs"].items():
            rows.append(
                [
                    f"{output} ({o['adapter']})",
                    _spread(o["encode_per_image_s"], 1.0, "{:.2f}"),
                    f"{o['first_encode_s']:.2f}" if "first_encode_s" in o else "-",
                    str(o["encoder_calls_for_new_images"]),
                    f"{o['cache_hit_per_image_s']['median'] * 1e3:.2f}",
                    str(o["encoder_calls_for_repeated_images"]),
                ]
            )
        out.append(
            f"### Encoding one image through the feature cache ({rows and o['images']} "
            f"images each; peak RSS {encoder['peak_rss_mib']:.0f} MiB)"
        )
        out.append(
            _table(
                [
                    "output",
                    "new image s median [IQR]",
                    "first image s",
                    "encoder calls",
                    "same image again ms",
                    "encoder calls",
                ],
                rows,
            )
        )
    return "\n\n".join(out)


def render(report: dict[str, Any]) -> str:
    machine = report.get("machine", {})
    lines = [
        "## Results",
        "machine: "
        + ", ".join(f"{k} {v}" for k, v in machine.items() if k not in ("platform",))
        + f"; total {report.get('total_s')} s",
    ]
    results = report.get("results", {})
    for unit, r in results.items():
        if unit.startswith("step:"):
            lines.append(render_step(unit, r))
    models = render_models(results)
    if models:
        lines.append(models)
    for unit, reason in report.get("skipped", {}).items():
        lines.append(f"SKIPPED {unit}: {reason}")
    for unit, reason in report.get("failed", {}).items():
        lines.append(f"FAILED {unit}: {reason}")
    return "\n\n".join(lines)
