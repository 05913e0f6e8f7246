"""stable-diffusion.cpp as a peer: stable-diffusion-cpp-python in its own virtual environment
(.cache/bench/sdcpp-venv, built on first use: pip compiles stable-diffusion.cpp, several minutes),
driven through bench/sdcpp_worker.py, which stays up so its runs interleave with ours."""
import json
import subprocess
import sys

from bench.util import CACHE, NEGATIVE, PROMPT, ROOT, log

VENV = CACHE / "sdcpp-venv"
PACKAGE = "stable-diffusion-cpp-python==0.4.7"


def ensure_venv():
    python = VENV / "bin" / "python"
    if python.exists() and subprocess.run([python, "-c", "import stable_diffusion_cpp"], capture_output=True).returncode == 0:
        return python
    log(f"installing {PACKAGE} into {VENV} (compiles stable-diffusion.cpp; several minutes)")
    subprocess.run([sys.executable, "-m", "venv", "--clear", VENV], check=True)
    subprocess.run([python, "-m", "pip", "install", "--quiet", PACKAGE, "pillow"], check=True)
    return python


class SdCpp:
    def __init__(self, checkpoint, threads: int, wtype: str = "default"):
        python = ensure_venv()
        self.proc = subprocess.Popen([str(python), str(ROOT / "bench" / "sdcpp_worker.py"), str(checkpoint), str(threads), wtype],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=ROOT)
        first = self._reply()
        self.load_s, self.peak = first["load_s"], first["peak"]
        log(f"stable-diffusion.cpp loaded in {self.load_s:.2f} s (RSS {first['rss']:.0f} MiB)")

    def _reply(self) -> dict:
        for line in self.proc.stdout:        # the library may print its own lines on stdout
            if line.startswith("{"):
                try:
                    return json.loads(line)
                except ValueError:
                    pass
        raise RuntimeError(f"stable-diffusion.cpp worker ended (exit {self.proc.wait()})")

    def generate(self, size: int, steps: int, seed: int = 1) -> dict:
        self.proc.stdin.write(json.dumps({"prompt": PROMPT, "negative": NEGATIVE, "size": size, "steps": steps,
                                          "seed": seed, "sampler": "euler_a"}) + "\n")
        self.proc.stdin.flush()
        out = self._reply()
        self.peak = max(self.peak, out["peak"])
        return out

    def close(self):
        if self.proc.poll() is None:
            self.proc.stdin.write("\n")
            self.proc.stdin.close()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
