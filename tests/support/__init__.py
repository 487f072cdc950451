"""Helpers shared by the tests: summary records, a daemon subprocess, topic readers."""
