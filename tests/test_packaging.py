"""Packaging for the Comfy Registry: `comfy node validate` passes, the archive
`comfy node pack` builds holds what the pack needs at runtime and none of the
development files (.comfyignore), the icon, and the metadata the Registry reads.

comfy-cli runs from a venv of its own (scripts/setup_env.sh writes its path as
DTC_COMFY_CLI; its pins would clash with ComfyUI's). Neither command needs the
network: HOME is a temporary folder (comfy-cli writes its config there),
telemetry and the update check are off, and ruff (which validate runs) keeps
no cache in the repository.
"""
import ast
import json
import os
import re
import shutil
import subprocess
import zipfile
from pathlib import Path

import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]

# What a user needs at runtime; the archive holds these and nothing else at its top.
RUNTIME_FILES = {"__init__.py", "LICENSE", "README.md", "requirements.txt", "pyproject.toml"}
RUNTIME_DIRS = {"nodes", "accel_core", "reference", "workflows"}
ALLOWED_TOP = RUNTIME_FILES | RUNTIME_DIRS | {"docs"}  # docs/: the images README.md shows
DEV_DIRS = {"tests", "bench", ".ci", "harness", "scripts"}
# development modules inside a runtime folder: the reference model converted to diffusers imports the
# diffusers adapter (integrations/), which the archive leaves out; only the peers benchmark and its tests use it
DEV_MODULES = {"reference/diffusers_model.py"}
DEV_FILES = {"Makefile", "requirements-dev.txt", ".gitignore", ".comfyignore", "BENCHMARKS.md"}

# Reads the configuration the way `comfy node publish` does and prints it with
# the raw pyproject, from comfy-cli's own interpreter.
READ_CONFIG = """
import dataclasses, json, tomlkit
from comfy_cli.registry.config_parser import extract_node_configuration

def plain(value):
    if dataclasses.is_dataclass(value):
        return {f.name: plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    value = value.unwrap() if hasattr(value, "unwrap") else value
    if isinstance(value, dict):
        return {key: plain(item) for key, item in value.items()}
    return [plain(item) for item in value] if isinstance(value, (list, tuple)) else value

config = extract_node_configuration("pyproject.toml")
print(json.dumps({"config": plain(config),
                  "raw": tomlkit.parse(open("pyproject.toml", encoding="utf-8").read()).unwrap()}))
"""


def comfy_cli_path():
    path = os.environ.get("DTC_COMFY_CLI")
    env_file = REPO / ".dtc" / "env"
    if not path and env_file.is_file():
        for line in env_file.read_text().splitlines():
            if line.startswith("DTC_COMFY_CLI="):
                path = line.split("=", 1)[1]
    if not path or not Path(path).is_file():
        pytest.fail(f"no comfy-cli at {path!r}: run `make test` (scripts/setup_env.sh builds it) "
                    "or set DTC_COMFY_CLI")
    return Path(path)


@pytest.fixture(scope="module")
def comfy_cli(tmp_path_factory):
    cli = comfy_cli_path()
    env = dict(os.environ, HOME=str(tmp_path_factory.mktemp("comfy_cli_home")), DO_NOT_TRACK="1",
               COMFY_NO_UPDATE_CHECK="1", RUFF_NO_CACHE="true")

    def run(*args, cwd=REPO):
        result = subprocess.run([str(cli), "--skip-prompt", "--no-json", *args], cwd=cwd, env=env,
                                capture_output=True, text=True, timeout=300)
        return result.returncode, result.stdout + result.stderr
    run.python = cli.parent / "python"
    run.env = env
    return run


@pytest.fixture(scope="module")
def registry_config(comfy_cli):
    result = subprocess.run([str(comfy_cli.python), "-c", READ_CONFIG], cwd=REPO, env=comfy_cli.env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    return dict(json.loads(lines[-1]), printed=lines[:-1])


def worktree_files():
    """Tracked and new (not ignored) files that exist: what a commit of this tree would hold."""
    listing = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                             cwd=REPO, capture_output=True, text=True, check=True).stdout
    return sorted({name for name in listing.split("\0") if name and (REPO / name).is_file()})


@pytest.fixture(scope="module")
def archive(comfy_cli, tmp_path_factory):
    """Names in the zip `comfy node pack` builds (git-tracked files less .comfyignore)
    from a git copy of this working tree, so files not committed yet count too."""
    files = worktree_files()
    copy = tmp_path_factory.mktemp("pack") / "dit-token-cache"
    for name in files:
        (copy / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / name, copy / name)
    subprocess.run(["git", "init", "-q"], cwd=copy, check=True)
    subprocess.run(["git", "add", "-A"], cwd=copy, check=True)
    rc, out = comfy_cli("node", "pack", cwd=copy)
    assert rc == 0, out
    with zipfile.ZipFile(copy / "node.zip") as zf:
        names = set(zf.namelist())
    return files, names


def test_comfy_node_validate_passes(comfy_cli):
    rc, out = comfy_cli("node", "validate")
    assert rc == 0, out
    assert "All validation checks passed successfully" in out, out
    # validate exits 0 even when it drops a field (bad classifier, bad
    # requires-comfyui, license format) or ruff warns (exec/eval, `a; b`)
    for word in ("Warning", "Error", "warnings found"):
        assert word not in out, out


def test_archive_keeps_runtime_files(archive):
    files, names = archive
    assert RUNTIME_FILES <= names, sorted(RUNTIME_FILES - names)
    for folder in RUNTIME_DIRS:
        wanted = {name for name in files if name.startswith(folder + "/")} - DEV_MODULES
        assert wanted, folder
        assert wanted <= names, sorted(wanted - names)
    assert not DEV_MODULES & names
    assert "reference/weights/shapes_dit.safetensors" in names
    readme_images = set(re.findall(r"!\[[^\]]*\]\(([^)\s]+)\)", (REPO / "README.md").read_text()))
    local_images = {path for path in readme_images if "://" not in path}
    assert local_images and local_images <= names, sorted(local_images - names)


def test_archive_leaves_development_files_out(archive):
    _, names = archive
    tops = {name.split("/", 1)[0] for name in names}
    assert tops <= ALLOWED_TOP, f"not a runtime file, add it to .comfyignore: {sorted(tops - ALLOWED_TOP)}"
    assert not tops & (DEV_DIRS | DEV_FILES)
    docs = {name for name in names if name.startswith("docs/")}
    assert docs <= set(re.findall(r"\]\((docs/[^)\s]+)\)", (REPO / "README.md").read_text())), sorted(docs)


def test_archive_imports_nothing_left_out(archive):
    """No kept module imports a left-out one, absolutely (the scripts' sys.path
    names: tiny_models, pack_loader, ...) or relatively."""
    files, names = archive
    left_out = {Path(name).stem for name in files if name.endswith(".py") and name not in names}
    left_out |= DEV_DIRS
    left_out -= {"__init__"}

    def resolves(parts):
        base = "/".join(parts)
        return (f"{base}.py" in names or f"{base}/__init__.py" in names) if parts else "__init__.py" in names

    problems = []
    for name in sorted(n for n in names if n.endswith(".py")):
        package = name.split("/")[:-1]
        for node in ast.walk(ast.parse((REPO / name).read_text(), name)):
            if isinstance(node, ast.Import):
                problems += [f"{name}: import {a.name}" for a in node.names if a.name.split(".")[0] in left_out]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                if node.module.split(".")[0] in left_out:
                    problems.append(f"{name}: from {node.module}")
            elif isinstance(node, ast.ImportFrom):
                if node.level - 1 > len(package):
                    problems.append(f"{name}: from {'.' * node.level}{node.module or ''} leaves the pack")
                    continue
                base = package[:len(package) - (node.level - 1)]
                targets = [base + node.module.split(".")] if node.module else \
                    [base + [a.name] for a in node.names if not resolves(base)]
                problems += [f"{name}: from {'.' * node.level}{node.module or ''} ({'/'.join(t)})"
                             for t in targets if not resolves(t)]
    assert not problems, problems


def test_icon_is_square_png_at_its_url(registry_config):
    icon_url = registry_config["config"]["tool_comfy"]["icon"]
    repository = registry_config["config"]["project"]["urls"]["repository"]
    owner_repo = re.fullmatch(r"https://github\.com/([^/]+/[^/]+?)/?", repository)
    assert owner_repo, repository
    prefix = f"https://raw.githubusercontent.com/{owner_repo.group(1)}/main/"
    assert icon_url.startswith(prefix), icon_url
    path = REPO / icon_url[len(prefix):]
    assert path.is_file(), path
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(path) as image:
        assert image.format == "PNG"
        assert image.width == image.height >= 200, image.size
    # the raw URL serves what git has: the icon must not be ignored
    ignored = subprocess.run(["git", "check-ignore", "-q", str(path)], cwd=REPO)
    assert ignored.returncode == 1, f"{path} is git-ignored"


def test_registry_metadata(registry_config):
    config, raw = registry_config["config"], registry_config["raw"]
    project, comfy = config["project"], config["tool_comfy"]
    # extract_node_configuration prints a warning for each field it drops
    assert registry_config["printed"] == [], registry_config["printed"]
    assert re.fullmatch(r"[a-z][a-z0-9-]*", comfy["publisher_id"]), comfy["publisher_id"]
    assert comfy["display_name"].strip()
    assert re.fullmatch(r"[a-z0-9][a-z0-9-]*", project["name"]), project["name"]
    assert project["description"].strip()
    assert re.fullmatch(r"\d+\.\d+\.\d+", project["version"]), project["version"]
    assert project["license"]["file"] and (REPO / project["license"]["file"]).stat().st_size > 0
    assert "GNU GENERAL PUBLIC LICENSE" in (REPO / project["license"]["file"]).read_text()
    # comfy-cli blanks a requires-comfyui it cannot read, and drops every
    # classifier of a kind when one of them is unknown
    assert raw["tool"]["comfy"]["requires-comfyui"]
    assert project["supported_comfyui_version"] == raw["tool"]["comfy"]["requires-comfyui"]
    assert project["supported_os"] == ["OS Independent"]
    assert project["supported_accelerators"] == ["GPU :: NVIDIA CUDA"]
    assert project["urls"]["repository"] and project["urls"]["issues"]
    # the Registry installs [project] dependencies, a git install requirements.txt
    requirements = [line.split("#", 1)[0].strip() for line in (REPO / "requirements.txt").read_text().splitlines()]
    assert project["dependencies"] == [line for line in requirements if line]
