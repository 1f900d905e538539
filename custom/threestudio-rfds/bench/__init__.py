"""``rfds-bench``: run a text-to-3D prompt suite through threestudio — on this machine's GPUs or as a
SLURM job array — score the renders with CLIP, and report (docs/tools.md).  Running and reporting
need only the standard library, PyYAML, numpy, PIL and matplotlib; scoring needs transformers;
``--executor slurm`` needs submitit (the ``slurm`` extra).  threestudio itself runs as a subprocess.

Modules: ``suite`` (YAML schema), ``runner`` (commands, ``run_suite``), ``executors`` / ``slurm``
(where runs go), ``scheduler`` (the run queue), ``ledger`` (append-only records under a lock),
``owner`` (who runs what, liveness), ``procs`` (children and signals), ``logs``, ``paths``,
``status``, ``score``, ``report``, ``memwrap`` (peak memory of a launch), ``measure_fanout``.
"""
