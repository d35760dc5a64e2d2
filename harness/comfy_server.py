"""A real headless ComfyUI server for the tests and the demo.

    with start_server(base_dir, models={"diffusion_models/tiny.safetensors": path}) as server:
        entry, log = server.run(api_prompt)

It runs `main.py --cpu` from the ComfyUI tree on a free loopback port; its models, input,
output, temp, user and datasets folders are under `base_dir` (the listed model files are copied
there), its log goes to `base_dir/server.log`, and it is always stopped by its own pid.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

DEFAULT_COMFYUI = Path(__file__).resolve().parents[1] / ".dtc" / "ComfyUI"
START_TIMEOUT = 90.0
PROMPT_TIMEOUT = 90.0
CLIENT_ID = "dit-token-cache"
ANSI = re.compile(r"\x1b\[[0-9;]*m")


class ServerError(RuntimeError):
    pass


class ComfyServer:
    """A running ComfyUI server process; start_server() makes one."""

    def __init__(self, url: str, proc: subprocess.Popen, log_path: Path, output_dir: Path):
        self.url = url
        self.proc = proc
        self.log_path = log_path
        self.output_dir = output_dir
        self.models_dir = output_dir.parent / "models"
        self.started_in = None  # seconds from launch to ready, set by wait_ready()

    def log(self) -> str:
        return ANSI.sub("", self.log_path.read_text(errors="replace"))

    def log_tail(self, chars=6000) -> str:
        return self.log()[-chars:]

    def request(self, method, path, body=None, timeout=30.0):
        """(HTTP status, parsed JSON body or text)."""
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.url + path, data=data, method=method,
                                     headers={"Content-Type": "application/json"} if data else {})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as response:
                status, raw = response.status, response.read()
        except urllib.error.HTTPError as err:
            status, raw = err.code, err.read()
        try:
            return status, json.loads(raw)
        except ValueError:
            return status, raw.decode(errors="replace")

    def get(self, path):
        status, body = self.request("GET", path)
        if status != 200:
            raise ServerError(f"GET {path}: HTTP {status}: {body}")
        return body

    def alive(self) -> bool:
        if self.proc.poll() is not None:
            return False
        try:
            return self.request("GET", "/system_stats", timeout=5)[0] == 200
        except OSError:
            return False

    def wait_ready(self, timeout=START_TIMEOUT):
        started = time.monotonic()
        while not self.alive():
            if self.proc.poll() is not None:
                raise ServerError(f"ComfyUI exited with code {self.proc.returncode} while starting:\n{self.log_tail()}")
            if time.monotonic() - started > timeout:
                raise ServerError(f"ComfyUI was not ready within {timeout} s:\n{self.log_tail()}")
            time.sleep(0.25)
        self.started_in = time.monotonic() - started

    def output_files(self, entry, node_id) -> list[Path]:
        """Files an output node of a finished prompt saved in the output folder (images, latents...)."""
        return [self.output_dir / item["subfolder"] / item["filename"]
                for items in entry["outputs"].get(node_id, {}).values() if isinstance(items, list)
                for item in items if isinstance(item, dict) and item.get("type") == "output"]

    def queue(self, prompt):
        """POST /prompt; returns (HTTP status, response body)."""
        return self.request("POST", "/prompt", {"prompt": prompt, "client_id": CLIENT_ID})

    def run(self, prompt, timeout=PROMPT_TIMEOUT):
        """Queue a prompt that must pass validation and wait until it succeeds or fails.

        Returns (history entry, server log written meanwhile).
        """
        log_start = len(self.log())
        status, body = self.queue(prompt)
        if status != 200:
            raise ServerError(f"/prompt refused the prompt: HTTP {status}: {json.dumps(body, indent=1)[:4000]}")
        return self.wait_for(body["prompt_id"], timeout, log_start)

    def wait_for(self, prompt_id, timeout=PROMPT_TIMEOUT, log_start=0):
        """Wait until a queued prompt (queued here or by a browser) succeeds or fails.

        Returns (history entry, server log from `log_start` on).
        """
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            entry = self.get(f"/history/{prompt_id}").get(prompt_id)
            if entry and entry.get("status", {}).get("completed") is not None and (
                    entry["status"]["completed"] or entry["status"].get("status_str") == "error"):
                return entry, self.log()[log_start:]
            if self.proc.poll() is not None:
                raise ServerError(f"server died while running {prompt_id}:\n{self.log_tail()}")
            time.sleep(0.2)
        raise ServerError(f"prompt {prompt_id} did not finish within {timeout} s:\n{self.log_tail()}")


def execution_errors(entry) -> list[dict]:
    """The execution_error messages of a finished prompt's history entry."""
    return [data for kind, data in entry["status"].get("messages", []) if kind == "execution_error"]


def execution_seconds(entry) -> float:
    """Time the server spent executing a finished prompt, from its history's status messages."""
    stamps = {kind: data["timestamp"] for kind, data in entry["status"]["messages"]}
    return (stamps["execution_success"] - stamps["execution_start"]) / 1000


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _stop(proc):
    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=15)


def _die_with_parent():
    """Linux: the server gets SIGTERM if this process dies without stopping it."""
    try:
        import ctypes
        import signal

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


@contextlib.contextmanager
def start_server(base_dir, models=None, comfyui=None, python=sys.executable, timeout=START_TIMEOUT):
    """Start ComfyUI, wait until it answers, yield a ComfyServer; stop it on exit.

    `models` maps paths under the models folder ("diffusion_models/x.safetensors") to the
    files to copy there. `comfyui` defaults to $DTC_COMFYUI, else <repo>/.dtc/ComfyUI.
    """
    comfyui = Path(comfyui or os.environ.get("DTC_COMFYUI") or DEFAULT_COMFYUI).resolve()
    base = Path(base_dir)
    for name, source in (models or {}).items():
        target = base / "models" / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, target)
    for sub in ("models", "output", "input", "temp", "user", "datasets"):
        (base / sub).mkdir(parents=True, exist_ok=True)
    # no command-line flag moves the datasets folder (LoadTrainingDataset) out of the ComfyUI tree
    paths_file = base / "extra_model_paths.yaml"
    paths_file.write_text(f"dtc_test:\n  datasets: {base / 'datasets'}\n")
    port = free_port()
    log_path = base / "server.log"
    command = [
        str(python), "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(port),
        "--models-directory", str(base / "models"), "--output-directory", str(base / "output"),
        "--input-directory", str(base / "input"), "--temp-directory", str(base / "temp"),
        "--user-directory", str(base / "user"), "--database-url", "sqlite:///:memory:",
        "--extra-model-paths-config", str(paths_file), "--disable-auto-launch",
    ]
    with open(log_path, "wb") as log_file:
        proc = subprocess.Popen(command, cwd=comfyui, stdin=subprocess.DEVNULL, stdout=log_file,
                                stderr=subprocess.STDOUT,
                                preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None)
    try:
        server = ComfyServer(f"http://127.0.0.1:{port}", proc, log_path, base / "output")
        server.wait_ready(timeout)
        yield server
    finally:
        _stop(proc)
