"""Run the issue-14 measurements on the lent GPU (or, with --cpu-smoke, the same path on the CPU)
as phases under one deadline.  Everything goes to ``--out`` as it happens, so a phase or the whole
call cut at its limit still leaves its results:

* ``phases.jsonl``: environment, nerfacc JIT build, models, and one line per phase (status, seconds);
* ``step.jsonl``: rfds-benchmark-step's JSON lines, one per case and lever;
* ``train.jsonl``: per threestudio run, s/iteration per render size and peak memory;
* ``train-steps.jsonl``: every timed training step; ``profile.txt``; ``run.log``: all output;
* ``summary.txt``: the table printed last.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from typing import Dict, List, Optional

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import phases as plan_mod  # noqa: E402
import summary  # noqa: E402
import train as train_mod  # noqa: E402

REPO = train_mod.REPO


class Out:
    """Appends JSON lines to files under the output folder (flushed per line) and logs to run.log."""

    def __init__(self, folder: str):
        self.folder = folder
        os.makedirs(folder, exist_ok=True)
        self.log = open(os.path.join(folder, "run.log"), "a", buffering=1)

    def line(self, name: str, rec: Dict) -> None:
        with open(os.path.join(self.folder, name), "a") as f:
            f.write(json.dumps(rec) + "\n")
        print(json.dumps(rec), flush=True)

    def say(self, text: str) -> None:
        print(text, flush=True)
        self.log.write(text + "\n")


def environment(smoke: bool) -> Dict:
    import torch

    rec = {"phase": "env", "python": sys.version.split()[0], "torch": torch.__version__,
           "cuda": torch.version.cuda, "cuda_available": torch.cuda.is_available(), "smoke": smoke}
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        rec.update(gpu=p.name, capability=f"{p.major}.{p.minor}", gpu_mem_gib=round(p.total_memory / 2**30, 1))
    for mod in ("diffusers", "transformers", "pytorch_lightning", "omegaconf", "nerfacc", "torchao", "triton"):
        try:
            rec[mod] = __import__(mod).__version__
        except Exception as e:
            rec[mod] = f"unavailable: {type(e).__name__}"
    rec["nvcc"] = shutil.which("nvcc")
    return rec


def start_nerfacc_jit(work: str, log) -> Optional[subprocess.Popen]:
    """Build nerfacc's CUDA kernels with nvcc in the background (their import triggers the JIT build)."""
    if not shutil.which("nvcc"):
        return None
    env = dict(os.environ, MAX_JOBS="8", TORCH_EXTENSIONS_DIR=os.path.join(work, "torch_extensions"))
    code = "from nerfacc.cuda._backend import _C; assert _C is not None, 'nerfacc JIT build gave no module'"
    return subprocess.Popen([sys.executable, "-c", code], env=env, stdout=log, stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL, start_new_session=True)


def run_streaming(cmd: List[str], timeout: float, out: Out, jsonl: str, cwd: str = REPO) -> object:
    """Run ``cmd``; its stdout lines that are JSON objects go to ``jsonl`` as they come; returns the
    exit code or "timeout" (the process group is killed)."""
    proc = subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=out.log, text=True,
                            stdin=subprocess.DEVNULL, start_new_session=True)

    def pump():
        for line in proc.stdout:
            out.log.write(line)
            if line.startswith("{"):
                try:
                    out.line(jsonl, json.loads(line))
                except json.JSONDecodeError:
                    pass

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    rc = train_mod.wait_or_kill(proc, timeout)
    reader.join(timeout=5)
    return rc


def threestudio_root(arg: Optional[str]) -> Optional[str]:
    for root in (arg, os.path.join(REPO, ".threestudio"), os.environ.get("THREESTUDIO_ROOT")):
        if root and os.path.isfile(os.path.join(root, "launch.py")):
            return os.path.abspath(root)
    return None


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--work", default="/tmp/rfds-device", help="models, launch dir, training outputs")
    p.add_argument("--cpu-smoke", action="store_true", help="tiny models and sizes on the CPU (same path)")
    p.add_argument("--budget-s", type=float, default=None, help="whole run (default 540 on the GPU, 3000 smoke)")
    p.add_argument("--phases", default="", help="comma-separated name prefixes, e.g. models,step-eager,train")
    p.add_argument("--train-steps", type=int, default=None, help="steps per training (default 100; smoke 3)")
    p.add_argument("--threestudio", default=None, help="checkout (default: .threestudio, then $THREESTUDIO_ROOT)")
    args = p.parse_args(argv)
    smoke = args.cpu_smoke
    t_start = time.perf_counter()  # the budget counts from run.sh's start (wheel install included)
    already = max(0.0, time.time() - float(os.environ.get("RFDS_DEVICE_T0", time.time())))
    deadline = t_start - already + (args.budget_s or (3000 if smoke else 540))
    steps = args.train_steps or (3 if smoke else 100)
    out = Out(args.out)
    os.makedirs(args.work, exist_ok=True)
    out.line("phases.jsonl", environment(smoke))

    todo = plan_mod.select(plan_mod.plan(smoke), args.phases)
    jit = None if smoke or not any(ph.kind == "train" for ph in todo) else start_nerfacc_jit(args.work, out.log)
    models_dir = os.path.join(args.work, "models")
    root = threestudio_root(args.threestudio)
    launch_dir = train_mod.make_launch_dir(root, os.path.join(args.work, "threestudio")) if root else None
    nerfacc = "torch" if smoke else None

    for i, ph in enumerate(todo):
        reserve = sum(later.min_s for later in todo[i + 1:])
        budget = min(ph.timeout_s, deadline - time.perf_counter() - reserve)
        rec = {"phase": ph.name, "timeout_s": round(budget, 1)}
        if budget < ph.min_s:
            out.line("phases.jsonl", {**rec, "status": "skipped: budget"})
            continue
        t0 = time.perf_counter()
        if ph.kind == "models":
            rc = run_streaming([sys.executable, os.path.join(HERE, "models.py"), "tiny" if smoke else "full", models_dir],
                               budget, out, "phases.jsonl")
        elif ph.kind == "step":
            cmd = [sys.executable, *plan_mod.STEP,
                   *[os.path.join(args.out, "profile.txt") if a == "PROFILE" else a for a in ph.args]]
            rc = run_streaming(cmd, budget, out, "step.jsonl")
        else:
            model = "instaflow" if "instaflow" in ph.args[0] else "sd3"
            if launch_dir is None or not os.path.isdir(os.path.join(models_dir, model)):
                out.line("phases.jsonl", {**rec, "status": "skipped: no threestudio checkout or no models"})
                continue
            if nerfacc is None:  # first training: wait for the JIT build (bounded by this phase's budget)
                nerfacc = "torch"
                if jit is not None:
                    try:
                        nerfacc = "jit" if jit.wait(timeout=max(1.0, budget / 2)) == 0 else "torch"
                    except subprocess.TimeoutExpired:
                        os.killpg(jit.pid, 9)
                    out.line("phases.jsonl", {"phase": "nerfacc-jit", "used": nerfacc,
                                              "seconds_since_start": round(time.perf_counter() - t_start, 1)})
                    budget = min(ph.timeout_s, deadline - time.perf_counter() - reserve)
            if nerfacc == "jit":
                os.environ["TORCH_EXTENSIONS_DIR"] = os.path.join(args.work, "torch_extensions")
            result = train_mod.train(ph.args[0], os.path.join(models_dir, model), launch_dir, args.work, steps,
                                     budget, smoke, nerfacc, out.log)
            out.line("train.jsonl", result)
            src = os.path.join(args.work, ph.args[0].rsplit(".", 1)[0] + ".steps.jsonl")
            if os.path.isfile(src):
                with open(src) as f, open(os.path.join(args.out, "train-steps.jsonl"), "a") as g:
                    g.writelines(json.dumps({"config": ph.args[0], **json.loads(x)}) + "\n" for x in f if x.strip())
            rc = result["returncode"]
        out.line("phases.jsonl", {**rec, "status": "ok" if rc == 0 else f"rc={rc}",
                                  "seconds": round(time.perf_counter() - t0, 1)})
    if jit is not None and jit.poll() is None:
        os.killpg(jit.pid, 9)
    text = summary.render(args.out, time.perf_counter() - t_start)
    with open(os.path.join(args.out, "summary.txt"), "w") as f:
        f.write(text)
    out.say(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
