"""Prefect flows and the ``pruneflow`` command line: the entry points users run and schedule."""
