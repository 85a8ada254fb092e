"""The benchmark's environment: optional packages, thread pinning and a description of the machine.

The GPU machine the lead rents has torch, safetensors, numpy and einops but not ``ldm``
(PyPI's ``stable-diffusion-sdkit``), open_clip or Pillow. ``ldm`` is a pure-python wheel: with
``--ldm-wheel-dir`` every ``*.whl`` there whose packages are missing is unpacked into a
temporary folder put on ``sys.path`` (no pip, no network). ``ldm.util`` imports Pillow at module
level but uses it only to draw captions into images, which the UNet never does: where Pillow is
missing, an empty stand-in module is registered so that the import succeeds, and the run says so.
"""

from __future__ import annotations

import importlib.util
import os
import platform
import sys
import tempfile
import types
import zipfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent

#: Notes about the environment, collected while preparing it; printed and written to the JSON.
NOTES: list[str] = []


def note(message: str) -> None:
    if message not in NOTES:
        NOTES.append(message)
        print(f"[bench] {message}", flush=True)


def pin_threads(threads: int) -> None:
    """Set the thread count before torch starts its pools (call before importing torch)."""
    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[name] = str(threads)


def has_module(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def add_wheels(wheel_dir: str | None) -> None:
    """Put the packages of pure-python wheels in ``wheel_dir`` on ``sys.path`` where missing."""
    if not wheel_dir:
        return
    folder = Path(wheel_dir)
    wheels = sorted(folder.glob("*.whl"))
    if not wheels:
        note(f"--ldm-wheel-dir {folder}: no *.whl files there")
        return
    target = Path(tempfile.mkdtemp(prefix="negip-bench-wheels-"))
    for wheel in wheels:
        if "-py3-none-any" not in wheel.name and "-py2.py3-none-any" not in wheel.name:
            note(f"skipping {wheel.name}: not a pure-python wheel")
            continue
        with zipfile.ZipFile(wheel) as archive:
            names = archive.namelist()
            # Packages (folders) and top-level modules (pytest's py.py, for one).
            tops = {n.split("/")[0] if "/" in n else n for n in names}
            packages = sorted(
                t.removesuffix(".py")
                for t in tops
                if not t.endswith((".dist-info", ".data")) and ("." not in t or t.endswith(".py"))
            )
            missing = [p for p in packages if not has_module(p)]
            if not missing:
                continue
            # Only the missing packages: an unpacked copy must not shadow an installed one.
            wanted = set(missing) | {f"{m}.py" for m in missing}
            archive.extractall(target, [n for n in names if n.split("/")[0] in wanted])
        note(f"using {', '.join(missing)} from {wheel.name} (unpacked, not installed)")
    if str(target) not in sys.path:
        sys.path.insert(0, str(target))
    importlib.invalidate_caches()
    # Children (one per stage) find the unpacked packages through the environment.
    os.environ["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(target), os.environ.get("PYTHONPATH", "")) if p
    )


def ensure_pillow_importable() -> None:
    """Register an empty ``PIL`` stand-in where Pillow is missing (see the module docstring)."""
    if has_module("PIL"):
        return
    package = types.ModuleType("PIL")
    package.__path__ = []  # a package, so that "from PIL import Image" finds the submodules
    for name in ("Image", "ImageDraw", "ImageFont", "ImageOps"):
        module = types.ModuleType(f"PIL.{name}")
        module.Image = type("Image", (), {})  # only used in annotations on the UNet's path
        module.UnidentifiedImageError = type("UnidentifiedImageError", (OSError,), {})
        setattr(package, name, module)
        sys.modules[f"PIL.{name}"] = module
    sys.modules["PIL"] = package
    note("Pillow is missing: an empty stand-in PIL module was registered (ldm.util imports it)")


def ensure_omegaconf_importable() -> None:
    """ldm's ``UNetModel.__init__`` imports ``omegaconf.listconfig.ListConfig`` only to turn a
    ListConfig ``context_dim`` into a list. omegaconf needs antlr4 and PyYAML (a compiled
    wheel); where it does not import, a stand-in module with an unrelated ``ListConfig`` class
    is registered (no real ``context_dim`` is one), and the run says so."""
    try:
        import omegaconf.listconfig  # noqa: F401
    except Exception:
        package = types.ModuleType("omegaconf")
        package.__path__ = []
        listconfig = types.ModuleType("omegaconf.listconfig")
        listconfig.ListConfig = type("ListConfig", (list,), {})
        package.listconfig = listconfig
        sys.modules["omegaconf"] = package
        sys.modules["omegaconf.listconfig"] = listconfig
        note("omegaconf does not import: a stand-in omegaconf.listconfig was registered for ldm")


def require(stage: str, *modules: str) -> str | None:
    """None if every module imports, else a sentence saying what is missing for ``stage``."""
    missing = [m for m in modules if not has_module(m)]
    if not missing:
        return None
    hint = (
        " (carry the stable-diffusion-sdkit wheel and pass --ldm-wheel-dir)"
        if "ldm" in missing
        else ""
    )
    return f"{stage} skipped: missing package(s) {', '.join(missing)}{hint}"


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def git_revision() -> str | None:
    """The commit the benchmark ran on, with "+dirty" for uncommitted changes (None without git)."""
    import subprocess

    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True
        )
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no", "lib_negip", "bench"],
            cwd=ROOT,
            capture_output=True,
            text=True,
        )
    except OSError:
        return None
    if head.returncode != 0:
        return None
    return head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


def machine(device: str) -> dict[str, Any]:
    """What the numbers were measured on."""
    import torch

    info: dict[str, Any] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu": cpu_model(),
        "logical_cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "platform": platform.platform(),
    }
    if device.startswith("cuda") and torch.cuda.is_available():
        props = torch.cuda.get_device_properties(torch.device(device))
        info.update(
            gpu=props.name,
            gpu_memory_gib=round(props.total_memory / 2**30, 1),
            cuda=torch.version.cuda,
            cudnn=torch.backends.cudnn.version(),
        )
    return info
