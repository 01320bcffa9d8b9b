"""`qbench sweep`: a grid of runs, sharded by utterance over a local process pool or a Ray cluster.

A sweep is a list of points, each exactly a `qbench.run.RunSpec` (`spec.SweepSpec` expands a
TOML/JSON file or `--grid plugin=rtn,gptq bits=2,3,4` into them). Each point is carried out as
tasks (`tasks`): one *prepare* task (load, quantize once into an artifact, choose the device's
batch size: `qbench.run.prepare_run`, the first half of a single run), then *shard* tasks that
evaluate contiguous runs of its utterances cut on the batch boundaries a single run uses
(`qbench.run.evaluate_prepared` on the artifact: no plugin code), each journaled like a run.
`merge` joins a point's shards into the `RunResult` a single `qbench run` of the point writes:
the same identity, utterances, hypotheses digest and metrics (timing and memory measurements
aside). `runner` schedules the tasks on an executor (`local`: a process pool sized to the cores
and the memory; `ray_executor`: a Ray cluster), keeps the state in the sweep's folder (`state`)
so an interrupted sweep resumes without recomputing a finished point or shard, and reports to
one display (`progress`).
"""
