"""Everything gpu_bench.py needs on the lent GPU machine that is not in its
image or in the working tree, in one ignored folder that travels with a run
(`carry`): a pruned copy of the pinned ComfyUI (its Python sources, without
tokenizer data, tests, the server's front end or the API nodes) and the
wheels of wheels.txt for Python 3.12. Prints the folder's size: with the
working tree it must stay under the device's 64 MiB.

    python3 bench/gpu/make_bundle.py            # -> .dtc/gpu_bundle/{ComfyUI,wheels}
    python3 bench/gpu/make_bundle.py --no-wheels --out DIR   # the ComfyUI copy alone (tests)
"""
import argparse
import shutil
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
PACKAGES = ("comfy", "comfy_extras", "comfy_api", "comfy_execution", "comfy_config", "app", "utils")
TOP_LEVEL = ("folder_paths.py", "node_helpers.py", "latent_preview.py", "nodes.py", "comfyui_version.py",
             "protocol.py", "hook_breaker_ac10a0.py")
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64",
             "manylinux_2_12_x86_64", "manylinux1_x86_64")


def copy_comfyui(source: Path, target: Path) -> None:
    """ComfyUI's Python sources: what imports as a library."""
    if target.exists():
        shutil.rmtree(target)
    for package in PACKAGES:
        for path in (source / package).rglob("*.py"):
            if "__pycache__" in path.parts:
                continue
            destination = target / path.relative_to(source)
            destination.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, destination)
    for name in TOP_LEVEL:
        if (source / name).exists():
            shutil.copy2(source / name, target / name)


def wheel_requirements() -> list:
    lines = (line.split("#")[0].strip() for line in (HERE / "wheels.txt").read_text().splitlines())
    return [line for line in lines if line]


def download_wheels(target: Path) -> None:
    if target.exists():
        shutil.rmtree(target)
    command = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
               "--python-version", "3.12", "--implementation", "cp", "-d", str(target)]
    for platform in PLATFORMS:
        command += ["--platform", platform]
    subprocess.run(command + wheel_requirements(), check=True)


def size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--comfyui", type=Path, default=REPO / ".dtc" / "ComfyUI", help="the pinned checkout")
    parser.add_argument("--out", type=Path, default=REPO / ".dtc" / "gpu_bundle")
    parser.add_argument("--no-wheels", action="store_true")
    args = parser.parse_args(argv)
    if not (args.comfyui / "comfy").is_dir():
        raise SystemExit(f"no ComfyUI at {args.comfyui}: run `make test` once (it sets the pinned one up)")
    copy_comfyui(args.comfyui, args.out / "ComfyUI")
    if not args.no_wheels:
        download_wheels(args.out / "wheels")
    print(f"{args.out}: {size(args.out) / 2**20:.1f} MiB (ComfyUI {size(args.out / 'ComfyUI') / 2**20:.1f} MiB)")


if __name__ == "__main__":
    main()
