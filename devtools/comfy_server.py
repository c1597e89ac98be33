"""Install this pack the way ComfyUI-Manager does and run a real ComfyUI server on it (tests only).

Manager clones the repository into custom_nodes/ and pip-installs requirements.txt
into ComfyUI's Python. Here: the repository's tracked files are copied (not
linked) into a fresh base directory's custom_nodes/, and the server runs from a
throw-away venv that sees ComfyUI's installed requirements through a .pth file,
so nothing is downloaded and the developer's .venv is never modified.
"""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import sysconfig
import time
import urllib.request

from .comfy_runtime import REPO, comfy_path

PACK_DIR_NAME = "ComfyUI-HyperDreamBooth"


def tracked_files(repo: str = REPO) -> list[str]:
    """Paths a clone would contain: tracked files plus new ones git does not ignore (work in progress).

    Falls back to everything outside the ignored folders when `repo` is not a git checkout.
    """
    try:
        out = subprocess.run(["git", "-C", repo, "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                             check=True, capture_output=True).stdout
        files = [p for p in out.decode().split("\0") if p]
    except (OSError, subprocess.CalledProcessError):
        files = []
        skip = {".git", ".venv", ".comfyui", "__pycache__", ".pytest_cache", "test-artifacts"}
        for root, dirs, names in os.walk(repo):
            dirs[:] = [d for d in dirs if d not in skip]
            files += [os.path.relpath(os.path.join(root, n), repo) for n in names]
    return [f for f in files if os.path.isfile(os.path.join(repo, f))]


def copy_pack(custom_nodes_dir: str, repo: str = REPO) -> str:
    """Copy the pack's tracked files into custom_nodes_dir/ComfyUI-HyperDreamBooth; returns that path."""
    dest = os.path.join(custom_nodes_dir, PACK_DIR_NAME)
    for rel in tracked_files(repo):
        target = os.path.join(dest, rel)
        os.makedirs(os.path.dirname(target), exist_ok=True)
        shutil.copy2(os.path.join(repo, rel), target)
    return dest


def make_venv(path: str) -> str:
    """A new venv whose Python also sees the current interpreter's site-packages; returns its python."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", path], check=True)
    python = os.path.join(path, "bin", "python")
    site = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          check=True, capture_output=True, text=True).stdout.strip()
    with open(os.path.join(site, "comfyui_env.pth"), "w") as f:
        f.write(sysconfig.get_paths()["purelib"] + "\n")
    return python


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ComfyServer:
    """A `python main.py --cpu ...` process on a free port, its log in a file; use as a context manager."""

    def __init__(self, python: str, base_dir: str, log_path: str, extra_args: tuple = ()):
        self.python, self.base_dir, self.log_path = python, base_dir, log_path
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.extra_args = list(extra_args)
        self.proc: subprocess.Popen | None = None

    def __enter__(self) -> "ComfyServer":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self, timeout: float = 120.0) -> None:
        cmd = [self.python, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(self.port),
               "--disable-auto-launch", "--use-pytorch-cross-attention", "--base-directory", self.base_dir,
               *self.extra_args]
        self._log = open(self.log_path, "w")
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        self.proc = subprocess.Popen(cmd, cwd=comfy_path(), stdout=self._log, stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"ComfyUI exited with {self.proc.returncode}:\n{self.log()[-4000:]}")
            try:
                with urllib.request.urlopen(self.url + "/system_stats", timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"ComfyUI did not answer within {timeout:.0f} s:\n{self.log()[-4000:]}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if getattr(self, "_log", None):
            self._log.close()

    def log(self) -> str:
        with open(self.log_path, encoding="utf-8", errors="replace") as f:
            return f.read()

    def get_json(self, route: str):
        import json

        with urllib.request.urlopen(self.url + route, timeout=30) as r:
            return json.loads(r.read())


def install_like_manager(root: str) -> tuple[str, str, str]:
    """Fresh base dir + copied pack + venv with requirements installed; returns (python, base_dir, pip_log)."""
    base = os.path.join(root, "base")
    for d in ("custom_nodes", "models", "input", "output", "temp", "user"):
        os.makedirs(os.path.join(base, d), exist_ok=True)
    pack = copy_pack(os.path.join(base, "custom_nodes"))
    python = make_venv(os.path.join(root, "venv"))
    pip = subprocess.run([python, "-m", "pip", "install", "--disable-pip-version-check", "--no-index",
                          "-r", os.path.join(pack, "requirements.txt")],
                         cwd=pack, capture_output=True, text=True)
    if pip.returncode != 0:
        raise RuntimeError(f"pip install -r requirements.txt failed:\n{pip.stdout}\n{pip.stderr}")
    return python, base, pip.stdout + pip.stderr
