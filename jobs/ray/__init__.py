"""The only code of the project that imports ray.

cluster: the Ray session (a local cluster or the one named), worker counts, the job's own encoder, the version a
reading job reads. dispatch: calls on actors and tasks, waiting, retries, failures named, the stop signal.
actors: the actor classes and remote tasks. query_encoding: queries encoded in the driver or on actors.
"""
