"""``rfds-bench``: run a text-to-3D prompt suite through threestudio — on this machine's GPUs or as a
SLURM job array — score the renders with CLIP, and report (docs/tools.md).  Running and reporting
need only the standard library, PyYAML, numpy, PIL and matplotlib; scoring needs transformers;
``--executor slurm`` needs submitit (the ``slurm`` extra).  threestudio itself runs as a subprocess.

Modules, each importing only from those above it (tests/test_bench_structure.py):

1. data: ``errors``, ``options`` (the ``slurm:`` section), ``suite`` (YAML schema, runs);
2. the launch and its files: ``paths`` (results-folder layout, attempt folders), ``command`` (launch
   command, run definition and digest, preflight), ``ledger`` (append-only index under a lock),
   ``results`` (trial-folder records, merged state, rebuild, suite revisions), ``logs``, ``owner``
   (who runs what, liveness), ``procs`` (children and signals), ``memwrap`` (a launch's peak memory);
3. executors: ``scheduler`` (the run queue every executor ends in), ``executors`` (local),
   ``slurm`` (submitit job arrays);
4. on top: ``runner`` (``run_suite``), ``status``, ``score``, ``report``, ``cli``, ``measure_fanout``.
"""
