"""The benchmark's one command: ``python -m bench.run --out bench/results/cpu.json``.

Stages, each measured in its own child process (so that peak memory is per stage and a crash
or a timeout of one stage keeps the others' numbers; the JSON is rewritten after each stage):

- ``step``: step time with the image prompts against the same UNet without them
  (:mod:`bench.step`); one child per model family.
- ``load``: first load and cached use of full-size adapters (:mod:`bench.models`).
- ``encode``: first load and cached use of the ViT-H-14 encoder, per-image encoding and the
  feature cache's hits (:mod:`bench.models`).

CPU (default): SD1.5 at a 32x32 latent, float32, every stage, one thread.
GPU: ``--device cuda --dtype float16``: SD1.5 at 64x64 and SDXL at 128x128, stage ``step``.
``--tiny`` runs the same code on tiny models (a check that a run will not crash); ``--quick``
bounds the number of rounds. Missing packages skip the stages that need them, with a line
saying which.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench import env

STAGES = ("step", "load", "encode")
LATENTS = {("cpu", "sd15"): 32, ("cpu", "sdxl"): 32, ("cuda", "sd15"): 64, ("cuda", "sdxl"): 128}
TINY_LATENT = 16

# rounds, min rounds, per-family budget (s), warm-up rounds, instrumented steps, encode repeats
PLANS = {
    "cpu": {"rounds": 16, "min_rounds": 5, "budget_s": 1200, "warmup": 1, "hook_steps": 3,
            "repeats": 3, "layer_calls": 10},
    "cpu-quick": {"rounds": 3, "min_rounds": 2, "budget_s": 120, "warmup": 1, "hook_steps": 2,
                  "repeats": 1, "layer_calls": 5},
    "cuda": {"rounds": 100, "min_rounds": 10, "budget_s": 75, "warmup": 3, "hook_steps": 10,
             "repeats": 3, "layer_calls": 50},
    "cuda-quick": {"rounds": 40, "min_rounds": 5, "budget_s": 45, "warmup": 2, "hook_steps": 5,
                   "repeats": 1, "layer_calls": 30},
    "tiny": {"rounds": 3, "min_rounds": 2, "budget_s": 60, "warmup": 1, "hook_steps": 10,
             "repeats": 1, "layer_calls": 10},
}  # fmt: skip

# glibc's default allocator returns large freed blocks to the OS and faults them in again on
# the next step (~1.8 GB of page faults per full-size SD1.5 CPU step, 15-20 % of it in system
# time, and most of the run-to-run noise). A1111's webui.sh preloads tcmalloc on Linux, which
# keeps freed memory; these settings make glibc do the same (32 MiB is glibc's largest mmap
# threshold). --malloc default leaves the allocator alone.
MALLOC_CACHE_ENV = {
    "MALLOC_MMAP_THRESHOLD_": str(32 * 2**20),
    "MALLOC_TRIM_THRESHOLD_": str(16 * 2**30),
    "MALLOC_TOP_PAD_": str(256 * 2**20),
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.run",
        description="Benchmark of the image prompts' cost per step, encoding and loading.",
    )
    parser.add_argument(
        "--out", type=Path, help="JSON results file (default bench/results/<device>.json)"
    )
    parser.add_argument("--device", default="cpu", help="cpu or cuda (cuda:N)")
    parser.add_argument("--dtype", choices=("float32", "float16", "bfloat16"),
                        help="UNet dtype (default float32 on cpu, float16 on cuda)")  # fmt: skip
    parser.add_argument(
        "--stages", help=f"comma list of {STAGES} (default: all on cpu, step on cuda)"
    )
    parser.add_argument(
        "--families", help="comma list of sd15, sdxl (default sd15 on cpu, both on cuda)"
    )
    parser.add_argument("--baselines", default="stock,sdpa",
                        help="attention implementations to compare against: stock (ldm's), sdpa")  # fmt: skip
    parser.add_argument(
        "--latent", type=int, help="latent side for every family (overrides defaults)"
    )
    parser.add_argument(
        "--batch",
        type=int,
        default=1,
        help="images per step, A1111's batch size (the UNet runs cond and uncond: 2x rows)",
    )
    parser.add_argument(
        "--tiny",
        action="store_true",
        help="tiny models with the same layouts: a quick check of the code path",
    )
    parser.add_argument("--quick", action="store_true", help="few rounds; bounded runtime")
    parser.add_argument("--rounds", type=int, help="interleaved rounds per family (upper bound)")
    parser.add_argument(
        "--budget-s",
        type=float,
        help="stop a family's rounds after this many seconds (after a minimum)",
    )
    parser.add_argument("--time-limit-s", type=float,
                        help="stop starting stages after this many seconds in all; a running stage is killed at the limit")  # fmt: skip
    parser.add_argument(
        "--threads",
        type=int,
        help="torch threads (default 1 on cpu; pinned via OMP_NUM_THREADS too)",
    )
    parser.add_argument(
        "--ldm-wheel-dir",
        help="folder with the stable-diffusion-sdkit wheel (and other pure-python wheels) to use where packages are missing",
    )
    parser.add_argument(
        "--work-dir",
        type=Path,
        help="folder for the model files the benchmark writes (default: a temporary folder, removed)",
    )
    parser.add_argument("--malloc", choices=("cache", "default"), default="cache",
                        help="cache: keep freed memory in the process, as A1111's tcmalloc does (glibc settings, Linux); default: leave glibc alone")  # fmt: skip
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--child-out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.device_type = args.device.split(":")[0]
    if args.device_type not in ("cpu", "cuda"):
        parser.error(f"--device must be cpu or cuda[:N], not {args.device}")
    if args.batch < 1:
        parser.error(f"--batch must be at least 1, not {args.batch}")
    args.dtype = args.dtype or ("float32" if args.device_type == "cpu" else "float16")
    default_stages = "step,load,encode" if args.device_type == "cpu" else "step"
    args.stages = [s for s in (args.stages or default_stages).split(",") if s]
    for stage in args.stages:
        if stage not in STAGES:
            parser.error(f"unknown stage {stage!r}; choose from {STAGES}")
    default_families = "sd15" if args.device_type == "cpu" else "sd15,sdxl"
    args.families = [f for f in (args.families or default_families).split(",") if f]
    args.baselines = [b for b in args.baselines.split(",") if b]
    if not set(args.baselines) <= {"stock", "sdpa"} or not args.baselines:
        parser.error("--baselines takes stock and/or sdpa")
    plan_name = "tiny" if args.tiny else args.device_type + ("-quick" if args.quick else "")
    plan = dict(PLANS[plan_name])
    if args.rounds:
        plan["rounds"] = args.rounds
        plan["min_rounds"] = min(plan["min_rounds"], args.rounds)
    if args.budget_s:
        plan["budget_s"] = args.budget_s
    args.plan = plan
    if args.threads is None and args.device_type == "cpu":
        args.threads = 1
    if args.out is None:
        args.out = (
            env.ROOT
            / "bench"
            / "results"
            / f"{args.device_type}{'-tiny' if args.tiny else ''}.json"
        )
    return args


# --------------------------------------------------------------------------------------------
# Child: one stage unit


def child_main(args: argparse.Namespace) -> int:
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.child.startswith(("step", "load")):
        env.ensure_pillow_importable()  # the encoder stage needs the real Pillow
    if args.child.startswith("step"):
        env.ensure_omegaconf_importable()
    unit, _, part = args.child.partition(":")
    work = Path(args.work_dir)

    def write(result: dict[str, Any], partial: bool = False) -> None:
        from bench.models import peak_rss_mib

        result = dict(result)
        if partial:
            result["partial"] = True  # cleared by the final write
        result.setdefault("peak_rss_mib", peak_rss_mib())
        result["machine"] = env.machine(args.device)
        result["notes"] = list(env.NOTES)
        temporary = args.child_out.with_suffix(".tmp")
        temporary.write_text(json.dumps(result, indent=1))
        temporary.replace(args.child_out)  # never half a file for the parent to read

    if unit == "step":
        from bench.step import run_step_stage

        device = torch.device(args.device)
        latent = args.latent or (TINY_LATENT if args.tiny else LATENTS[(args.device_type, part)])
        plan = args.plan
        result = run_step_stage(
            part,
            tiny=args.tiny,
            latent=latent,
            device=device,
            dtype=getattr(torch, args.dtype),
            baselines=args.baselines,
            warmup=plan["warmup"],
            rounds=plan["rounds"],
            min_rounds=plan["min_rounds"],
            budget_s=float(plan["budget_s"]),
            hook_steps=plan["hook_steps"],
            layer_calls=plan["layer_calls"],
            batch=args.batch,
            checkpoint=lambda partial: write(partial, partial=True),
        )
    elif unit == "write":
        from bench.models import write_files

        result = {"files_mib": write_files(work, tiny=args.tiny)}
    elif unit == "load":
        from bench.models import run_load_adapter

        result = run_load_adapter(work, part, repeats=5)
    elif unit == "encoder":
        from bench.models import run_encoder

        result = run_encoder(work, repeats=args.plan["repeats"])
    else:
        msg = f"unknown unit {args.child}"
        raise ValueError(msg)
    write(result)
    return 0


# --------------------------------------------------------------------------------------------
# Parent: plan the units, run each in a child, collect, print, write


def units_for(args: argparse.Namespace) -> list[tuple[str, str | None]]:
    """(unit, reason it is skipped or None)."""
    units: list[tuple[str, str | None]] = []
    if "step" in args.stages:
        missing = env.require("step", "ldm", "einops")
        for family in args.families:
            units.append((f"step:{family}", missing))
    if "load" in args.stages or "encode" in args.stages:
        missing_write = env.require("writing model files", "safetensors")
        units.append(("write", missing_write))
        if "load" in args.stages:
            for variant in ("base", "plus"):
                units.append((f"load:{variant}", missing_write))
        units.append(
            ("encoder", missing_write or env.require("encoder load/encode", "open_clip", "PIL"))
        )
    return units


def child_command(args: argparse.Namespace, unit: str, out: Path, argv: list[str]) -> list[str]:
    return [sys.executable, "-m", "bench.run", *argv, "--child", unit, "--child-out", str(out),
            "--work-dir", str(args.work_dir)]  # fmt: skip


def parent_main(args: argparse.Namespace, argv: list[str]) -> int:
    started = time.perf_counter()
    env.add_wheels(args.ldm_wheel_dir)
    if args.malloc == "cache" and sys.platform.startswith("linux"):
        os.environ.update(MALLOC_CACHE_ENV)  # read by each child's allocator at start
    own_work_dir = args.work_dir is None
    if own_work_dir:
        args.work_dir = Path(tempfile.mkdtemp(prefix="negip-bench-"))
    passthrough = [a for a in argv if a not in ("--work-dir",)]
    if "--work-dir" in argv:
        index = argv.index("--work-dir")
        passthrough = argv[:index] + argv[index + 2 :]
    report: dict[str, Any] = {
        "command": "python -m bench.run " + " ".join(argv),
        "revision": env.git_revision(),
        "settings": {
            "device": args.device,
            "dtype": args.dtype,
            "tiny": args.tiny,
            "quick": args.quick,
            "families": args.families,
            "batch": args.batch,
            "baselines": args.baselines,
            "threads": args.threads,
            "malloc": args.malloc,
            "plan": args.plan,
        },
        "results": {},
        "skipped": {},
        "failed": {},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    try:
        for unit, skip in units_for(args):
            if skip:
                report["skipped"][unit] = skip
                env.note(skip if unit.startswith("step") or unit == "write" else f"{unit}: {skip}")
                continue
            if unit.startswith(("load", "encoder")) and "write" in report["failed"]:
                report["skipped"][unit] = "the model files could not be written"
                continue
            elapsed = time.perf_counter() - started
            timeout = None
            if args.time_limit_s:
                timeout = args.time_limit_s - elapsed
                if timeout < 20:
                    report["skipped"][unit] = f"time limit {args.time_limit_s:.0f} s reached"
                    env.note(f"{unit} skipped: time limit reached")
                    continue
            print(f"[bench] --- {unit} ---", flush=True)
            out = args.work_dir / f"result-{unit.replace(':', '-')}.json"
            command = child_command(args, unit, out, passthrough)
            unit_started = time.perf_counter()
            try:
                completed = subprocess.run(command, cwd=env.ROOT, timeout=timeout, check=False)
                rc = completed.returncode
            except subprocess.TimeoutExpired:
                rc = "timeout"
            if out.is_file():  # a step stage stopped early leaves its first tables
                result = json.loads(out.read_text())
                result["unit_s"] = round(time.perf_counter() - unit_started, 1)
                report.setdefault("machine", result.pop("machine"))
                result.pop("machine", None)
                for line in result.pop("notes", []):
                    env.note(line)
                report["results"][unit] = result
            kept = unit in report["results"]
            if rc != 0 or not kept:
                report["failed"][unit] = f"exit status {rc}" + (
                    "; the tables measured before it are kept" if kept else ""
                )
                env.note(f"{unit} FAILED ({rc}); see the output above")
            report["notes"] = list(env.NOTES)
            report["total_s"] = round(time.perf_counter() - started, 1)
            args.out.write_text(json.dumps(report, indent=1))
    finally:
        if own_work_dir:
            shutil.rmtree(args.work_dir, ignore_errors=True)
    if "machine" not in report:  # no stage ran: describe the host without touching a GPU
        report["machine"] = env.machine("cpu")
    report["notes"] = list(env.NOTES)
    report["total_s"] = round(time.perf_counter() - started, 1)
    args.out.write_text(json.dumps(report, indent=1))
    from bench.table import render

    print(render(report), flush=True)
    print(f"[bench] wrote {args.out}", flush=True)
    return 1 if report["failed"] else 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.threads:
        env.pin_threads(args.threads)  # before torch is imported anywhere
    if args.child:
        return child_main(args)
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    return parent_main(args, argv)


if __name__ == "__main__":
    sys.exit(main())
