"""The pluggy markers of project "qbench": `hookimpl` marks a plugin's hook functions.

They live apart from `qbench.hookspecs` so that `from qbench import hookimpl` stays cheap and
acyclic: the hookspecs' annotations name types from every corner of the package (quantizers,
device profiles, model cards), which `import qbench` must not reach.
"""

import pluggy

hookspec = pluggy.HookspecMarker("qbench")
hookimpl = pluggy.HookimplMarker("qbench")
