"""A save, stage by stage: snapshot each component, plan who writes what (pure functions of what every rank
declared), check that replicas are replicas, write this rank's files, and commit (the manifest last)."""
