"""``zrepl sim``: the whole cluster in a deterministic simulator under
seeded faults (``docs/simulation.md``).

- :mod:`.world` - one seeded run: the cluster, the faults, the invariants;
- :mod:`.storage` - storage that knows what each fsync policy made durable;
- :mod:`.workload` - what the simulated clients do, per App;
- :mod:`.linear` - the linearizability checker for register histories;
- :mod:`.runner` - many seeds, the summary, shrinking (the command);
- :mod:`.bugs` - known bugs planted on purpose, for the simulator's tests.
"""
