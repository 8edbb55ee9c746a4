"""``kernelgen loadtest``: closed- and open-loop load against a kernelgen server.

Modules, each usable alone:

- ``workload``: what to send (models or groups, seq_lens, rows, cache traffic, dtype),
  from flags or a YAML/JSON file, checked against the server's models; seeded requests.
- ``runner``: one step (a concurrency or a rate) on one ``AsyncKernelClient``.
- ``processes``: the same step fanned out over client processes (``--workers``), raw
  samples merged.
- ``stats``: raw samples to per-step results (percentiles, histograms, gates).
- ``correctness``: sampled responses recomputed with a reference model that the
  server package contributes through the ``kernelgen.reference`` entry points.
- ``outputs``/``progress``: the live display, the final table, JSON, CSV and PNG.
- ``cli``: the ``loadtest`` subcommand, contributed to ``kernelgen`` through the
  ``kernelgen.commands`` entry points; ``session``: one run of it; ``exit_codes``.

Importing this package (and ``cli``) is cheap: numpy, rich and matplotlib are
imported where they are used, so ``kernelgen health`` stays fast.
"""
