"""Test doubles for the external process that ``rfds-bench run`` drives: a fake threestudio checkout
whose ``launch.py`` parses the real command line (OmegaConf dotlist, as threestudio does), then writes
test renders in threestudio's layout ``<exp_root_dir>/<name>/<tag>/save/it<N>-test/<i>.png``.

The fake's behaviour is steered by the prompt: ``FAIL`` → exits 1 after printing an error;
``KILL`` → if the file ``kill-flag`` exists in the checkout, deletes it and SIGKILLs its parent
(the benchmark runner), simulating a crash mid-benchmark; ``SLOW`` → if ``slow-flag`` exists, deletes it,
creates ``sleeping`` and sleeps (for Ctrl-C tests); ``STUBBORN`` → ignores SIGINT, creates ``sleeping``
and sleeps 60 s.  With ``$FAKE_STEP_S`` set it sleeps that long per
training step, printing a tqdm-like progress bar.  Every call is appended to ``calls.jsonl`` with its
pid, ``$CUDA_VISIBLE_DEVICES`` and ``live_twins``: pids of earlier launches of the same run still alive
when it started (must stay empty: never two live copies of one run).
"""
import os
import textwrap

import yaml

FAKE_LAUNCH = textwrap.dedent(
    r'''
    import argparse, json, os, signal, sys
    import numpy as np
    from omegaconf import OmegaConf
    from PIL import Image

    ap = argparse.ArgumentParser()
    ap.add_argument("--config", required=True)
    ap.add_argument("--gpu", default="0")
    ap.add_argument("--train", action="store_true")
    args, extras = ap.parse_known_args()
    cfg = OmegaConf.merge(OmegaConf.load(args.config), OmegaConf.from_cli(extras))
    prompt = cfg.system.prompt_processor.prompt
    here = os.path.dirname(os.path.abspath(__file__))

    def alive(pid):  # a live, non-zombie process
        try:
            with open(f"/proc/{pid}/stat") as f:
                return f.read().rsplit(")", 1)[1].split()[0] != "Z"
        except OSError:
            return False

    earlier = [json.loads(l) for l in open(os.path.join(here, "calls.jsonl"))] if os.path.exists(os.path.join(here, "calls.jsonl")) else []
    twin = [c["pid"] for c in earlier if c.get("tag") == cfg.tag and alive(c["pid"])]
    with open(os.path.join(here, "calls.jsonl"), "a") as f:
        f.write(json.dumps({"prompt": prompt, "prompt_type": type(prompt).__name__, "seed": cfg.seed,
                            "cwd": os.getcwd(), "train": args.train, "gpu": args.gpu,
                            "max_steps": cfg.trainer.max_steps, "name": cfg.name, "tag": cfg.tag, "pid": os.getpid(),
                            "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
                            "live_twins": twin}) + "\n")
    step_s = float(os.environ.get("FAKE_STEP_S", "0"))
    if step_s:
        import time
        n = cfg.trainer.max_steps
        for i in range(1, n + 1):
            time.sleep(step_s)
            print(f"\rEpoch 0: {100 * i // n}%| | {i}/{n} [00:00<00:00]", end="", flush=True)
        print()
    if "FAIL" in prompt:
        print("Traceback (most recent call last):")
        print("RuntimeError: fake launch failed for " + prompt)
        sys.exit(1)
    if "SLOW" in prompt and os.path.exists(os.path.join(here, "slow-flag")):
        os.remove(os.path.join(here, "slow-flag"))
        open(os.path.join(here, "sleeping"), "w").close()
        import time
        time.sleep(120)
    if "STUBBORN" in prompt:  # ignores SIGINT, like a launch stuck in a CUDA call
        import time
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        open(os.path.join(here, "sleeping"), "w").close()
        time.sleep(60)
    flag = os.path.join(here, "kill-flag")
    if "KILL" in prompt and os.path.exists(flag):
        os.remove(flag)
        os.kill(os.getppid(), signal.SIGKILL)
        sys.exit(3)
    save = os.path.join(cfg.exp_root_dir, cfg.name, cfg.tag + ("" if not cfg.use_timestamp else "@20990101-000000"), "save")
    rng = np.random.default_rng(cfg.seed + len(prompt))
    n = cfg.trainer.max_steps
    for step, views in ((n // 2, 1), (n, 4)):
        d = os.path.join(save, f"it{step}-test")
        os.makedirs(d, exist_ok=True)
        for i in range(views):
            rgb = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)
            grid = np.concatenate([rgb, np.full((16, 16, 3), 128, np.uint8), np.zeros((16, 16, 3), np.uint8)], 1)
            Image.fromarray(grid).save(os.path.join(d, f"{i}.png"))
    print("fake training done")
    '''
)


def make_fake_threestudio(root: str) -> str:
    """A folder with the fake launch.py, a plugin config at custom/threestudio-rfds/configs/fake.yaml and an
    importable (empty) ``threestudio`` package, which rfds-bench's preflight imports as launch.py would."""
    os.makedirs(os.path.join(root, "custom", "threestudio-rfds", "configs"), exist_ok=True)
    os.makedirs(os.path.join(root, "threestudio"), exist_ok=True)
    with open(os.path.join(root, "threestudio", "__init__.py"), "w") as f:
        f.write('"""The fake checkout\'s package: importable, as a real one is where training can run."""\n')
    with open(os.path.join(root, "launch.py"), "w") as f:
        f.write(FAKE_LAUNCH)
    cfg = {"name": "fake", "tag": "", "seed": 0, "use_timestamp": True, "exp_root_dir": "outputs",
           "trainer": {"max_steps": 10}, "system": {"prompt_processor": {"prompt": "???"}}}
    with open(os.path.join(root, "custom", "threestudio-rfds", "configs", "fake.yaml"), "w") as f:
        yaml.safe_dump(cfg, f)
    return root


def write_suite(path: str, prompts, seeds=(0,), **extra) -> str:
    data = {"name": "fake-suite", "configs": [{"path": "custom/threestudio-rfds/configs/fake.yaml", "label": "fake"}],
            "seeds": list(seeds), "prompts": list(prompts), **extra}
    with open(path, "w") as f:
        yaml.safe_dump(data, f)
    return path


def calls(root: str):
    import json

    p = os.path.join(root, "calls.jsonl")
    if not os.path.exists(p):
        return []
    with open(p) as f:
        return [json.loads(line) for line in f if line.strip()]
