"""Local mode: run an Endpoint's plan as processes on this machine, no cluster needed.

The same ``EndpointPlan`` that ``render/`` turns into Kubernetes objects becomes
here one gateway process plus one model-server process per variant replica, all
on free 127.0.0.1 ports. One supervisor process per endpoint owns them:

* ``paths``      where an endpoint's state lives ($KUBEINFER_HOME/local/<name>/)
* ``manifest``   YAML documents → validated ``Endpoint`` objects (pure parsing)
* ``state``      state.json / desired.json models, atomic writes, liveness checks
* ``backoff``    PURE restart policy of crashed children
* ``memory``     PURE memory limits: which one applies, when a process is over it
* ``rss``        how much memory a process tree uses (/proc)
* ``view``       PURE rows of ``kubeinfer status``
* ``process``    spawning and stopping children (process groups, parent-death signal)
* ``children``   one supervised runtime process: spawn, health, crash bookkeeping
* ``supervisor`` the per-endpoint supervisor loop (applies ``reconcile.local_diff``)
* ``control``    what the CLI does to supervisors: start, hand over a spec, wait, stop

TransformJobs run to completion instead, under one runner process per job:

* ``transform_manifest``  TransformJob documents → validated, model-resolved plans
* ``transform_state``     $KUBEINFER_HOME/jobs/<name>/: job.json, state.json, progress
* ``transform_policy``    PURE: what a batch process's exit means (the podFailurePolicy's rules)
* ``transform_view``      PURE: progress (bar, ETA) and ``status`` rows
* ``transform_runner``    the runner: planner, workers, finalizer as processes
* ``transform_control``   what the CLI does to runners: start, watch, stop
"""
