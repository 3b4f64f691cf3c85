"""Serving stores kept in step with the published versions: the sink interface, LanceDB and Qdrant sinks, and the
sync that brings a store to a version from the versions' change files."""
